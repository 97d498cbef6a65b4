#!/usr/bin/python3
"""Memory per rank against N from `ringattn scale-test --csv` files: measured peak (solid) and
planned (dashed), one colour per (P, mode). Several CSVs (runs at different P) go in one plot.

usage: plot_memory.py --out FILE.png RESULTS.csv [MORE.csv ...]
matplotlib is optional: without it this prints one line and exits 0.
"""
import argparse
import csv
import sys
from collections import defaultdict


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("csv", nargs="+", help="scale-test --csv files")
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # missing or broken install: the plot is optional
        print(f"plot skipped: matplotlib is not available ({type(e).__name__})")
        return 0

    # (ranks, mode) -> seq_len -> (planned, measured), the largest rank of each run.
    series = defaultdict(dict)
    for path in args.csv:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                key = (int(row["ranks"]), row["mode"])
                n = int(row["seq_len"])
                planned, measured = int(row["planned_bytes"]), int(row["measured_bytes"])
                old = series[key].get(n, (0, 0))
                series[key][n] = (max(old[0], planned), max(old[1], measured))

    gib = float(1 << 30)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, ((ranks, mode), points) in enumerate(sorted(series.items())):
        ns = sorted(points)
        color = f"C{i % 10}"
        ax.plot(ns, [points[n][1] / gib for n in ns], "o-", color=color,
                label=f"P={ranks} {mode} measured")
        ax.plot(ns, [points[n][0] / gib for n in ns], "x--", color=color,
                label=f"P={ranks} {mode} planned")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sequence length N (tokens)")
    ax.set_ylabel("peak memory per rank (GiB, largest rank)")
    ax.set_title("ringattn: accounted peak per rank, measured vs planned")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

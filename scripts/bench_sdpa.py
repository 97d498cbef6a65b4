#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention TFLOP/s, the yardstick of `ringattn bench gpu`.

Same shapes and FLOP convention as `ringattn bench gpu`: bf16 (--dtype), B=1, H=16, D=128,
N in 4k/16k/64k, causal and not; forward 4*B*H*N*N*D (half for causal), backward 2.5x the
forward (FlashAttention's count). Inputs are [B, N, H, D] tensors seen as [B, H, N, D] (the
layout our kernels take, and FlashAttention's native one), fresh torch.randn per length.

The backend is pinned: each of FLASH_ATTENTION and CUDNN_ATTENTION runs alone inside
torch.nn.attention.sdpa_kernel([backend]), so PyTorch cannot fall back to another kernel; a
backend that refuses the shape is reported as 'unavailable' with its reason. Timing: CUDA events
around --iters calls after --warmup calls (the mean per call).

    python3 scripts/bench_sdpa.py --json sdpa.json
"""

import argparse
import json
import sys
import warnings


def parse_count(text):
    text = text.strip()
    mult = {"k": 1024, "K": 1024, "M": 1024**2, "G": 1024**3}
    if text and text[-1] in mult:
        return int(text[:-1]) * mult[text[-1]]
    return int(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", default="4k,16k,64k")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--causal", default="both", choices=["both", "true", "false"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16"])
    ap.add_argument("--backends", default="flash,cudnn",
                    help="comma-separated subset of flash, cudnn")
    ap.add_argument("--backward", default="true", choices=["true", "false"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the results as JSON to this file")
    a = ap.parse_args()

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("bench_sdpa: no CUDA device visible to PyTorch", file=sys.stderr)
        return 1
    dev = torch.device("cuda", 0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    seq_lens = [parse_count(x) for x in a.seq_lens.split(",") if x]
    masks = {"both": [False, True], "true": [True], "false": [False]}[a.causal]
    backends = {}
    for name in a.backends.split(","):
        if name == "flash":
            backends["flash"] = SDPBackend.FLASH_ATTENTION
        elif name == "cudnn":
            if hasattr(SDPBackend, "CUDNN_ATTENTION"):
                backends["cudnn"] = SDPBackend.CUDNN_ATTENTION
            else:
                backends["cudnn"] = None  # this PyTorch has no cuDNN SDPA backend
        elif name:
            ap.error(f"unknown backend {name!r} (flash, cudnn)")
    do_backward = a.backward == "true"
    B, H, D = a.batch, a.heads, a.head_dim

    def timed(fn):
        for _ in range(a.warmup):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(a.iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / a.iters

    props = torch.cuda.get_device_properties(dev)
    info = {
        "bench": "sdpa",
        "device": f"{props.name} (sm_{props.major}{props.minor})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "batch": B, "heads": H, "head_dim": D, "dtype": a.dtype,
        "warmup": a.warmup, "iters": a.iters, "seq_lens": seq_lens,
        "flops_convention": "forward 4*B*H*N*N*D (x0.5 causal), backward 2.5x forward",
        "layout": "[B, N, H, D] storage viewed as [B, H, N, D]",
        "results": [],
    }
    print(f"bench_sdpa: {info['device']}, torch {info['torch']}, cuDNN {info['cudnn']}")
    print(f"  B={B} H={H} D={D} dtype={a.dtype} warmup={a.warmup} iters={a.iters}\n")
    print(f"{'N':>8}  {'causal':>6}  {'backend':>7}  {'fwd ms':>9}  {'fwd TFLOP/s':>11}  "
          f"{'bwd ms':>9}  {'bwd TFLOP/s':>11}")
    gen = torch.Generator(device=dev)
    for n in seq_lens:
        gen.manual_seed(a.seed * 1000003 + n)
        shape = (B, n, H, D)
        q, k, v, dout = (torch.randn(shape, device=dev, dtype=dtype, generator=gen).transpose(1, 2)
                         for _ in range(4))
        for causal in masks:
            fwd_flops = 4.0 * B * H * n * n * D * (0.5 if causal else 1.0)
            for name, backend in backends.items():
                row = {"seq_len": n, "causal": causal, "backend": name,
                       "forward_flops": fwd_flops}
                if backend is None:
                    row["status"] = "unavailable: this PyTorch has no SDPBackend.CUDNN_ATTENTION"
                    info["results"].append(row)
                    print(f"{n:>8}  {'yes' if causal else 'no':>6}  {name:>7}  unavailable")
                    continue
                caught = []
                try:
                    with warnings.catch_warnings(record=True) as caught, sdpa_kernel([backend]):
                        warnings.simplefilter("always")
                        qg, kg, vg = (t.detach().requires_grad_(do_backward) for t in (q, k, v))

                        def fwd():
                            with torch.no_grad():
                                F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                        t_fwd = timed(fwd)
                        t_bwd = None
                        if do_backward:
                            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)

                            def bwd():
                                qg.grad = kg.grad = vg.grad = None
                                out.backward(dout, retain_graph=True)

                            t_bwd = timed(bwd)
                            del out
                    row.update(status="ok", forward_seconds=t_fwd,
                               forward_tflops=fwd_flops / t_fwd * 1e-12)
                    line = (f"{n:>8}  {'yes' if causal else 'no':>6}  {name:>7}  "
                            f"{t_fwd * 1e3:>9.3f}  {row['forward_tflops']:>11.1f}")
                    if t_bwd is not None:
                        row.update(backward_flops=2.5 * fwd_flops, backward_seconds=t_bwd,
                                   backward_tflops=2.5 * fwd_flops / t_bwd * 1e-12)
                        line += f"  {t_bwd * 1e3:>9.3f}  {row['backward_tflops']:>11.1f}"
                    print(line, flush=True)
                except RuntimeError as e:  # the pinned backend refused this problem
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    # PyTorch says why a pinned backend refused in warnings before the error.
                    why = [str(w.message).strip().splitlines()[0] for w in caught]
                    if why:
                        msg += " (" + "; ".join(why)[:240] + ")"
                    row["status"] = "unavailable: " + msg[:300]
                    print(f"{n:>8}  {'yes' if causal else 'no':>6}  {name:>7}  unavailable "
                          f"({msg[:120]})", flush=True)
                info["results"].append(row)
        del q, k, v, dout
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

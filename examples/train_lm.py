#!/usr/bin/env python3
"""Train a small byte-level decoder-only transformer with ring attention, sequence-parallel.

    mpirun -np 2 /usr/bin/python3 examples/train_lm.py --csv ring.csv
    /usr/bin/python3 examples/train_lm.py --reference --csv ref.csv --plot loss.png

Sequence-parallel mode (the default): every rank reads the same text and draws the same batch,
keeps ITS shard of every sequence (ringattn.shard_positions: zigzag for causal attention) and
runs everything but attention on its own tokens (embeddings with GLOBAL positions, layer norms,
projections, MLPs, the loss are per token). Attention is ringattn.torch.ring_attention over the
ring. The loss is the sum over all tokens of all ranks divided by the token count (one
allreduce); gradients of the replicated parameters are summed over ranks (one allreduce), which
makes them the gradients of that global loss. --reference runs the same model, seed and data in
one process on whole sequences with plain PyTorch attention (ringattn.reference): the two loss
curves agree to f32 rounding.

The text: the licence files that ship with Debian (/usr/share/common-licenses), bytes as tokens.
At the end rank 0 prints the sink rate of each layer/head: the mean attention probability on the
first token (p(i, 0) = exp(scale q_i . k_0 - lse_i), averaged over every query of the batch), and
the fraction of heads above 0.3.
"""

import argparse
import csv
import glob
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def import_ringattn():
    """ringattn from PYTHONPATH, else from <repo>/build/python (scripts/build.sh's build)."""
    import importlib.util
    if importlib.util.find_spec("ringattn") is None:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.path.join(repo, "build", "python")
        if not os.path.isdir(os.path.join(path, "ringattn")):
            sys.exit("train_lm.py: cannot import ringattn: build it (bash scripts/build.sh) and "
                     "set PYTHONPATH=<build>/python")
        sys.path.insert(0, path)
    import ringattn
    import ringattn.reference
    import ringattn.torch
    return ringattn


ringattn = import_ringattn()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", action="store_true",
                   help="one process, whole sequences, plain PyTorch attention")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=0, help="sliding window W (0 = none)")
    p.add_argument("--sinks", type=int, default=0, help="global sink tokens S")
    p.add_argument("--sink-logits", action="store_true", help="learned per-head sink logits")
    p.add_argument("--layout", default="auto", choices=["auto", "contiguous", "zigzag"])
    p.add_argument("--data", default="/usr/share/common-licenses/*",
                   help="glob of text files (bytes are the tokens)")
    p.add_argument("--threads", type=int, default=1, help="torch and ringattn CPU threads")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--csv", help="write step,loss to this CSV (rank 0)")
    p.add_argument("--plot", help="write the loss curve to this PNG (rank 0)")
    p.add_argument("--plot-with", action="append", default=[],
                   help="another run's CSV to draw on the same plot (repeatable)")
    return p.parse_args(argv)


# ---- data ------------------------------------------------------------------------------------

def load_text(pattern):
    """Bytes of every regular file matching the glob, sorted by real path, duplicates (symlinks)
    once."""
    paths = sorted({os.path.realpath(p) for p in glob.glob(pattern) if os.path.isfile(p)})
    if not paths:
        sys.exit(f"train_lm.py: no files match {pattern!r}")
    data = b"".join(open(p, "rb").read() for p in paths)
    return torch.tensor(list(data), dtype=torch.int64), len(paths)


def batch_offsets(step, n_tokens, seq_len, batch, seed):
    """Start offsets of the step's sequences: a function of (seed, step) only, so every rank and
    the reference draw the same batch."""
    g = torch.Generator().manual_seed(seed * 1000003 + step)
    return torch.randint(0, n_tokens - seq_len - 1, (batch,), generator=g)


def make_batch(tokens, offsets, seq_len):
    idx = offsets.view(-1, 1) + torch.arange(seq_len + 1).view(1, -1)
    seq = tokens[idx]
    return seq[:, :-1], seq[:, 1:]  # inputs, next-token targets [B, N]


# ---- model -----------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d_model, heads, kv_heads, sink_logits):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d_model // heads
        self.ln1 = nn.LayerNorm(d_model)
        self.wq = nn.Linear(d_model, heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(d_model, 2 * kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, d_model, bias=False)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))
        self.sink_logits = nn.Parameter(torch.zeros(heads)) if sink_logits else None

    def forward(self, x, attend, record=None):
        b, n, _ = x.shape
        y = self.ln1(x)
        q = self.wq(y).view(b, n, self.heads, self.head_dim)
        k, v = self.wkv(y).view(b, n, 2, self.kv_heads, self.head_dim).unbind(2)
        a, lse = attend(q, k, v, self.sink_logits)
        if record is not None:
            record.append((q.detach(), k.detach(), lse.detach(), self.sink_logits))
        x = x + self.wo(a.reshape(b, n, -1))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.tok = nn.Embedding(256, args.d_model)
        self.pos = nn.Embedding(args.seq_len, args.d_model)
        self.blocks = nn.ModuleList(Block(args.d_model, args.heads, args.kv_heads, args.sink_logits)
                                    for _ in range(args.layers))
        self.ln = nn.LayerNorm(args.d_model)
        self.head = nn.Linear(args.d_model, 256, bias=False)

    def forward(self, tokens, positions, attend, record=None):
        """tokens [B, N_local] at GLOBAL positions [N_local] -> logits [B, N_local, 256]."""
        x = self.tok(tokens) + self.pos(positions)
        for blk in self.blocks:
            x = blk(x, attend, record)
        return self.head(self.ln(x))


def make_attend(args, reference):
    mask = dict(causal=True, window=args.window, sinks=args.sinks)
    if reference:
        dense = ringattn.reference.dense_attention
        return lambda q, k, v, z: dense(q, k, v, sink_logits=z, return_lse=True, **mask)
    ring = ringattn.torch.ring_attention
    return lambda q, k, v, z: ring(q, k, v, sink_logits=z, layout=args.layout,
                                   seq_len=args.seq_len, return_lse=True,
                                   num_threads=args.threads, **mask)


# ---- distributed helpers ---------------------------------------------------------------------

def allreduce_grads(model):
    """Sums every parameter's gradient over ranks, in one flat float32 buffer."""
    params = [p for p in model.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    ringattn.allreduce_(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def sink_rates(model, tokens, positions, attend, seq_len, distributed):
    """[layers, heads] mean p(i, 0) over every query of the batch (all ranks), and the learned
    sink's mean probability exp(z - lse) when the model has sink logits."""
    record = []
    with torch.no_grad():
        model(tokens, positions, attend, record)
    rates, learned = [], []
    b = tokens.shape[0]
    for q, k, lse, z in record:
        h, d = q.shape[2], q.shape[3]
        group = h // k.shape[2]
        # k at global position 0 lives on rank 0 (local index 0) in every layout.
        k0 = k[:, 0].contiguous() if (positions[0] == 0) else torch.zeros_like(k[:, 0])
        if distributed:
            ringattn.broadcast_(k0, root=0)
        k0 = k0.repeat_interleave(group, dim=1)                                  # [B, H, D]
        s0 = torch.einsum("bnhd,bhd->bhn", q, k0) / math.sqrt(d)
        sums = torch.stack([torch.exp(s0 - lse).sum(dim=(0, 2)),
                            torch.exp(z.view(1, h, 1) - lse).sum(dim=(0, 2)) if z is not None
                            else torch.zeros(h)])
        if distributed:
            ringattn.allreduce_(sums)
        sums /= b * seq_len
        rates.append(sums[0])
        learned.append(sums[1])
    return torch.stack(rates), torch.stack(learned)


# ---- main ------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.d_model % args.heads or args.heads % args.kv_heads:
        sys.exit("train_lm.py: need d_model % heads == 0 and heads % kv_heads == 0")
    distributed = not args.reference
    rank, world = (ringattn.rank(), ringattn.world_size()) if distributed else (0, 1)
    mode = "reference (dense PyTorch attention, 1 process)" if args.reference else \
        f"ring attention, {world} rank(s), layout " \
        f"{ringattn.resolve_layout(args.layout, True, args.window)}"

    tokens, n_files = load_text(args.data)
    if distributed:
        positions = ringattn.shard_positions(args.seq_len, causal=True, window=args.window,
                                             sinks=args.sinks, layout=args.layout)
    else:
        positions = torch.arange(args.seq_len)

    torch.manual_seed(args.seed)
    model = TinyLM(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    attend = make_attend(args, args.reference)
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"train_lm: {mode}; {tokens.numel()} bytes from {n_files} files; "
              f"{args.layers} layers, d_model {args.d_model}, heads {args.heads}/{args.kv_heads}, "
              f"{n_params} parameters; seq_len {args.seq_len} x batch {args.batch}; causal, "
              f"window {args.window}, sinks {args.sinks}, sink logits {args.sink_logits}",
              flush=True)

    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        x, y = make_batch(tokens, batch_offsets(step, tokens.numel(), args.seq_len, args.batch,
                                                args.seed), args.seq_len)
        x, y = x[:, positions], y[:, positions]
        logits = model(x, positions, attend)
        # This rank's share of the global mean: the sum over its tokens / all tokens.
        loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1), reduction="sum") / (
            args.batch * args.seq_len)
        total = loss.detach().clone().view(1)
        if distributed:
            ringattn.allreduce_(total)
        losses.append(float(total))
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            print(f"step {step:5d}  loss {losses[-1]:.6f}  ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
        if step == args.steps:
            break  # the last step only measures the loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if distributed:
            allreduce_grads(model)
        opt.step()

    x, _ = make_batch(tokens, batch_offsets(10**6, tokens.numel(), args.seq_len, args.batch,
                                            args.seed), args.seq_len)
    rates, learned = sink_rates(model, x[:, positions], positions, attend, args.seq_len,
                                distributed)
    if rank == 0:
        report(args, rates, learned, losses)


def report(args, rates, learned, losses):
    print("sink rate (mean attention probability on the first token), per layer and head:")
    for layer, row in enumerate(rates):
        cells = "  ".join(f"{float(r):.3f}" for r in row)
        extra = ""
        if args.sink_logits:
            extra = "   learned sink: " + "  ".join(f"{float(r):.3f}" for r in learned[layer])
        print(f"  layer {layer}: {cells}{extra}")
    above = (rates > 0.3).float()
    print(f"heads with sink rate > 0.3: {int(above.sum())} of {above.numel()} "
          f"({float(above.mean()):.2f}); per layer: "
          + ", ".join(f"{float(a.mean()):.2f}" for a in above))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss"])
            for step, loss in enumerate(losses):
                w.writerow([step, repr(loss)])
        print(f"wrote {args.csv}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        label = "reference (dense)" if args.reference else "ringattn"
        ax.plot(range(len(losses)), losses, label=label, linewidth=1.5)
        for other in args.plot_with:
            with open(other) as f:
                rows = list(csv.DictReader(f))
            ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows],
                    label=os.path.splitext(os.path.basename(other))[0], linestyle="--",
                    linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/byte)")
        ax.set_title("byte-level LM on /usr/share/common-licenses")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()

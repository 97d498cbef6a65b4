"""ring_attention: exact ring attention as a torch.autograd.Function (CPU or CUDA tensors).

Each rank passes ITS shard of the global sequence, in the order ringattn.shard_positions gives
(ringattn.shard does the slicing). Shapes as FlashAttention ("bshd"):

    q [B, N_local, H, D], k and v [B, N_local, H_kv, D] (H % H_kv == 0),
    sink_logits [H] float32 (optional), returns o [B, N_local, H, D] (and lse [B, H, N_local]).

Gradients flow to q, k, v (this rank's shard) and sink_logits. sink_logits is a parameter every
rank holds a copy of: its gradient on each rank is that rank's share (the sum over the rank's
queries), so summing the gradients of replicated parameters over ranks, as any
sequence-parallel training loop does, gives the full gradient. Every rank must call forward
and backward together (they are collectives).

CPU tensors go through the process's host communicator (ringattn.get_comm(): MPI or self).
CUDA tensors go through ringattn.nccl_communicator(): NCCL, one GPU per rank, and every tensor
of the call on that rank's GPU (torch.device("cuda", ringattn.nccl_communicator().device)).
Before calling into the library, forward and backward synchronise torch's current stream on
that device (the library computes on its own stream and returns when its outputs are
complete), so the op is correct on any stream but does not overlap with queued work.
"""

import os

import torch

import ringattn
from ringattn import _C

__all__ = ["ring_attention"]

_DTYPES = {torch.float32: _C.F32, torch.bfloat16: _C.BF16, torch.float16: _C.F16}


def _default_threads():
    return int(os.environ.get("RINGATTN_NUM_THREADS", "0"))


class _Config:
    """Everything forward and backward need besides tensors (kept on ctx)."""

    def __init__(self, comm, causal, window, sinks, scale, layout, seq_len, num_threads):
        self.comm = comm
        self.causal = bool(causal)
        self.window = int(window)
        self.sinks = int(sinks)
        self.scale = float(scale)
        self.layout = layout
        self.seq_len = int(seq_len)
        self.num_threads = int(num_threads)

    def spec_args(self):
        return (self.comm, self.causal, self.window, self.sinks, self.scale, self.layout,
                self.seq_len)


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _ready(device):
    """Waits until the work torch queued on `device` so far (which produced the inputs and last
    used the outputs' memory) has run: the library reads and writes from its own stream."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class RingAttentionFunction(torch.autograd.Function):
    """Autograd function behind ring_attention (use that)."""

    @staticmethod
    def forward(ctx, q, k, v, sink_logits, cfg):
        b, n, h, d = q.shape
        h_kv = k.shape[2]
        o = torch.empty_like(q)
        lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
        _ready(q.device)
        _C.forward(*cfg.spec_args(), [b, n, h, h_kv, d], _DTYPES[q.dtype], q.data_ptr(),
                   k.data_ptr(), v.data_ptr(), _ptr(sink_logits), o.data_ptr(), lse.data_ptr(),
                   cfg.num_threads)
        ctx.cfg = cfg
        ctx.save_for_backward(q, k, v, o, lse, sink_logits)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, sink_logits = ctx.saved_tensors
        cfg = ctx.cfg
        if dlse is not None and bool(dlse.ne(0).any()):
            raise NotImplementedError(
                "ring_attention: gradients through lse are not supported (use lse under "
                "torch.no_grad() or detach it)")
        b, n, h, d = q.shape
        h_kv = k.shape[2]
        do = do.to(q.dtype).contiguous()
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        _ready(q.device)
        _C.backward(*cfg.spec_args(), [b, n, h, h_kv, d], _DTYPES[q.dtype], q.data_ptr(),
                    k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(), do.data_ptr(),
                    _ptr(sink_logits), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), 0,
                    cfg.num_threads)
        dsink = None
        if sink_logits is not None and ctx.needs_input_grad[3]:
            # This rank's share of dz[h] = -sum_i exp(z_h - lse_i) * Delta_i (SPEC section 5),
            # Delta_i = rowsum(do_i * o_i); the ranks' shares sum to the full gradient.
            delta = (do.float() * o.float()).sum(-1).transpose(1, 2)  # [B, H, N]
            p_sink = torch.exp(sink_logits.view(1, h, 1) - lse)
            dsink = -(p_sink * delta).sum(dim=(0, 2))
        return dq, dk, dv, dsink, None


def _communicator_for(q, k, v, sink_logits, comm):
    """The communicator for tensors on q's device (comm, or the default one), after checking that
    every tensor is on that device and that the communicator passes buffers there."""
    named = [("q", q), ("k", k), ("v", v)]
    if sink_logits is not None:
        named.append(("sink_logits", sink_logits))
    device = q.device
    if any(t.device != device for _, t in named):
        found = ", ".join(f"{name} on {t.device}" for name, t in named)
        raise ValueError(f"ring_attention: q, k, v and sink_logits must be on one device, "
                         f"found {found}")
    if device.type == "cpu":
        comm = ringattn.get_comm() if comm is None else comm
        if comm.device >= 0:
            raise ValueError(f"ring_attention: CPU tensors need a communicator of host buffers "
                             f"(ringattn.get_comm()), found the {comm.name!r} communicator of "
                             f"cuda:{comm.device}")
        return comm
    if device.type != "cuda":
        raise ValueError(f"ring_attention: tensors must be CPU or CUDA tensors, found {device}")
    if comm is None:
        comm = ringattn.nccl_communicator()  # ringattn.Error "unsupported" in a build without NCCL
    if comm.device < 0:
        raise ValueError(f"ring_attention: CUDA tensors need a communicator of device buffers "
                         f"(ringattn.nccl_communicator()), found the {comm.name!r} communicator "
                         f"of host buffers")
    if device.index != comm.device:
        raise ValueError(f"ring_attention: the tensors are on {device}, but this rank's NCCL "
                         f"communicator uses cuda:{comm.device} (one GPU per rank, chosen by the "
                         f"node-local rank): put them on torch.device('cuda', {comm.device})")
    return comm


def ring_attention(q, k, v, causal=False, window=0, sinks=0, sink_logits=None, scale=None,
                   layout="auto", seq_len=None, return_lse=False, num_threads=None, comm=None):
    """Exact attention over the global sequence whose shard this rank holds (SPEC section 2).

    causal: key j visible to query i only if j <= i. window: sliding window W (0 = none).
    sinks: the first S global positions stay visible through the window. sink_logits: learned
    per-head logits z [H] (float32) joining the softmax denominator. scale: default 1/sqrt(D).
    layout: 'auto' | 'contiguous' | 'zigzag' (how the sequence is sharded; must match how the
    inputs were sharded). seq_len: global length N (default: the sum of N_local over ranks, one
    allreduce). num_threads: CPU kernel threads (default $RINGATTN_NUM_THREADS or the kernel's
    choice). comm: a ringattn._C.Comm (default: ringattn.get_comm() for CPU tensors,
    ringattn.nccl_communicator() for CUDA tensors).

    q, k, v (and sink_logits) must all be on one device: the CPU, or the CUDA device of this
    rank's NCCL communicator. Anything else raises ValueError.

    Returns o (q's dtype) or (o, lse) with lse [B, H, N_local] float32 (natural log, includes
    the sink term; not differentiable).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"ring_attention: {name} must be [B, N_local, heads, D], found "
                             f"shape {tuple(t.shape)}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"ring_attention: dtype must be float32, bfloat16 or float16, found "
                         f"{q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"ring_attention: q, k, v must share a dtype, found {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if sink_logits is not None:
        if sink_logits.dtype != torch.float32 or sink_logits.shape != (q.shape[2],):
            raise ValueError(f"ring_attention: sink_logits must be float32 [{q.shape[2]}], found "
                             f"{sink_logits.dtype} {tuple(sink_logits.shape)}")
        sink_logits = sink_logits.contiguous()
    comm = _communicator_for(q, k, v, sink_logits, comm)
    if seq_len is None:
        total = torch.tensor([q.shape[1]], dtype=torch.int64)
        comm.allreduce(total.data_ptr(), 1, _C.REDUCE_I64, _C.SUM)
        seq_len = int(total.item())
    cfg = _Config(comm, causal, window, sinks, 0.0 if scale is None else scale,
                  ringattn._layout_code(layout), seq_len,
                  _default_threads() if num_threads is None else num_threads)
    o, lse = RingAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                         sink_logits, cfg)
    return (o, lse) if return_lse else o

"""ringattn: exact ring attention across ranks, from Python.

The process's communicator is MPI_COMM_WORLD when the process was started by an MPI launcher
(mpirun sets OMPI_COMM_WORLD_SIZE / PMI_SIZE / PMIX_RANK), otherwise a one-rank communicator
that needs no MPI. RINGATTN_COMM=mpi|self overrides the choice. MPI is finalised at exit.

CUDA tensors go through a second, process-wide communicator over the same ranks,
nccl_communicator(): NCCL on one GPU per rank (the node-local rank's), created on first use
(a collective). ringattn.torch.ring_attention picks it for CUDA tensors by itself.

    from ringattn.torch import ring_attention          # the autograd op
    import ringattn
    ringattn.rank(), ringattn.world_size()
    x_local = ringattn.shard(x, dim=1, causal=True)    # this rank's tokens of a full tensor
    x_full = ringattn.unshard(x_local, seq_len=N, dim=1, causal=True)
"""

import atexit
import os
import sys

from . import _C

__all__ = [
    "Error",
    "version",
    "get_comm",
    "nccl_communicator",
    "has_nccl",
    "rank",
    "world_size",
    "barrier",
    "allreduce_",
    "broadcast_",
    "resolve_layout",
    "shard_positions",
    "shard",
    "unshard",
]

Error = _C.Error
version = _C.version()

_LAYOUTS = {
    "auto": _C.LAYOUT_AUTO,
    "contiguous": _C.LAYOUT_CONTIGUOUS,
    "zigzag": _C.LAYOUT_ZIGZAG,
}
_LAYOUT_NAMES = {v: k for k, v in _LAYOUTS.items()}

_comm = None
_nccl_comm = None


def _launched_by_mpi():
    return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))


def get_comm():
    """The process's communicator (created on first use; a collective under MPI)."""
    global _comm
    if _comm is None:
        choice = os.environ.get("RINGATTN_COMM", "mpi" if _launched_by_mpi() else "self")
        if choice not in ("mpi", "self"):
            raise ValueError(f"RINGATTN_COMM must be 'mpi' or 'self', found {choice!r}")
        _comm = _C.Comm.mpi() if choice == "mpi" else _C.Comm.self()
    return _comm


def has_nccl():
    """Whether this build of the library has NCCL (CUDA tensors need it)."""
    return bool(_C.WITH_NCCL)


def nccl_communicator():
    """The process's communicator for CUDA tensors: NCCL over MPI_COMM_WORLD (initialising MPI
    like get_comm; a one-rank world without an MPI launcher), one GPU per rank chosen by the
    node-local rank, which becomes this thread's current CUDA device. Created on first use, a
    collective: every rank must call it (ring_attention on CUDA tensors does). Its .device is the
    CUDA device index the rank's tensors must be on. Raises ringattn.Error ("unsupported") in a
    build without NCCL, on a node without a GPU or with more ranks than GPUs."""
    global _nccl_comm
    if _nccl_comm is None:
        _nccl_comm = _C.Comm.nccl()
    return _nccl_comm


@atexit.register
def _shutdown():
    global _comm, _nccl_comm
    if _nccl_comm is not None:
        _nccl_comm.close()
        _nccl_comm = None
    if _comm is not None:
        _comm.close()
        _comm = None
    _C.mpi_finalize()


_previous_excepthook = sys.excepthook


def _excepthook(etype, value, tb):
    """An uncaught exception on one rank of an MPI job would leave the others waiting in a
    collective forever (and MPI_Finalize at exit waits for them): print it, then end the job."""
    _previous_excepthook(etype, value, tb)
    comm = _comm if _comm is not None and _comm.name == "mpi" else _nccl_comm
    if comm is not None and comm.size > 1:
        sys.stderr.write(f"ringattn: rank {comm.rank} raised {etype.__name__}; aborting the MPI "
                         "job so that no rank waits forever\n")
        sys.stderr.flush()
        _C.mpi_abort(1)


sys.excepthook = _excepthook


def rank():
    return get_comm().rank


def world_size():
    return get_comm().size


def barrier():
    get_comm().barrier()


def _layout_code(layout):
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(_LAYOUTS)}, found {layout!r}")
    return _LAYOUTS[layout]


def resolve_layout(layout="auto", causal=False, window=0):
    """The layout actually used: 'zigzag' for causal with window 0 under 'auto'."""
    return _LAYOUT_NAMES[_C.resolve_layout(bool(causal), int(window), 0, _layout_code(layout))]


def _torch():
    import torch  # the package itself does not need torch; these helpers do

    return torch


def allreduce_(tensor, op="sum"):
    """In-place allreduce of a contiguous CPU tensor (float32, float64 or int64) over the
    process's communicator; returns the tensor."""
    torch = _torch()
    types = {torch.float32: _C.REDUCE_F32, torch.float64: _C.REDUCE_F64, torch.int64: _C.REDUCE_I64}
    ops = {"sum": _C.SUM, "max": _C.MAX, "min": _C.MIN}
    if tensor.dtype not in types or tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("allreduce_ needs a contiguous CPU float32/float64/int64 tensor, found "
                         f"{tensor.dtype} on {tensor.device} (contiguous={tensor.is_contiguous()})")
    get_comm().allreduce(tensor.data_ptr(), tensor.numel(), types[tensor.dtype], ops[op])
    return tensor


def broadcast_(tensor, root=0):
    """In-place broadcast of a contiguous CPU tensor from rank root; returns the tensor."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("broadcast_ needs a contiguous CPU tensor")
    get_comm().broadcast(tensor.data_ptr(), tensor.numel() * tensor.element_size(), root)
    return tensor


def shard_positions(seq_len, causal=False, window=0, sinks=0, layout="auto", world=None,
                    rank=None):
    """Global positions (int64 tensor) of the tokens `rank` of `world` holds, in local order:
    the same sharding the ring uses (SPEC section 3). Defaults: this process."""
    torch = _torch()
    world = get_comm().size if world is None else world
    rank = get_comm().rank if rank is None else rank
    pos = _C.shard_positions(bool(causal), int(window), int(sinks), _layout_code(layout),
                             int(seq_len), int(world), int(rank))
    return torch.tensor(pos, dtype=torch.int64)


def shard(x, dim=1, causal=False, window=0, sinks=0, layout="auto"):
    """This rank's tokens of a whole-sequence tensor (sequence along `dim`), in local order, on
    x's device."""
    pos = shard_positions(x.shape[dim], causal, window, sinks, layout)
    return x.index_select(dim, pos.to(x.device)).contiguous()


def unshard(x_local, seq_len, dim=1, causal=False, window=0, sinks=0, layout="auto"):
    """Gathers every rank's shard into the whole-sequence tensor, on every rank. A collective
    (one allreduce: each rank contributes its positions, zeros elsewhere, so the sum is exact).
    Floating types come back in x_local's dtype (summed in float32/float64), on x_local's device
    (a CUDA tensor is gathered through host memory)."""
    torch = _torch()
    pos = shard_positions(seq_len, causal, window, sinks, layout)
    if x_local.shape[dim] != pos.numel():
        raise ValueError(f"unshard: this rank holds {pos.numel()} tokens, found "
                         f"{x_local.shape[dim]} along dim {dim}")
    wide = torch.float64 if x_local.dtype == torch.float64 else (
        torch.int64 if not x_local.is_floating_point() else torch.float32)
    shape = list(x_local.shape)
    shape[dim] = seq_len
    full = torch.zeros(shape, dtype=wide)
    full.index_copy_(dim, pos, x_local.detach().cpu().to(wide))
    allreduce_(full)
    return full.to(device=x_local.device, dtype=x_local.dtype)

"""ringattn.torch.ring_attention on CUDA tensors (the NCCL communicator) against PyTorch autograd
of dense attention.

Skipped as a whole unless torch sees a GPU and the library was built with NCCL. ctest runs it
under `mpiexec -n 1` only: NCCL needs one GPU per rank, so P ranks need P GPUs (by hand,
`mpiexec -n P` on a node with P GPUs runs it at P ranks; every check is written for any P).
Every rank builds the same whole-sequence inputs on the CPU from a seed, rounds them to the
dtype under test, runs the op on its shard on its GPU, and compares o, lse, dq, dk, dv and the
rank-summed dz with ringattn.reference.dense_attention (float32 autograd on the CPU, from the
same rounded inputs) by normalised error ||got - want|| / ||want||, with the per-dtype
tolerances of the GPU ring tests (tests/gpu/ring_cuda_test.cc).
"""

import pytest
import torch

import ringattn
from ringattn import _C
from ringattn.reference import dense_attention
from ringattn.torch import ring_attention

# ctest reports the whole file as skipped when this reason is printed (SKIP_REGULAR_EXPRESSION).
_NOT_RUN = "ringattn CUDA tests not run"
if not _C.WITH_NCCL:
    pytest.skip(f"{_NOT_RUN}: the library was built without NCCL", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip(f"{_NOT_RUN}: torch sees no CUDA device (torch {torch.__version__}, CUDA "
                f"{torch.version.cuda})", allow_module_level=True)

P = ringattn.world_size()
COMM = ringattn.nccl_communicator()  # a collective: every rank imports this module
DEV = torch.device("cuda", COMM.device)

# Normalised error bounds for o and lse; gradients get twice as much.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def normalised_error(got, want):
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert got.shape == want.shape, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert not got.isnan().any(), "NaN in the result"
    # Rows that see nothing have lse = -inf on both sides; compare the finite part.
    finite = want.isfinite()
    assert torch.equal(got.isfinite(), finite), "-inf in different places"
    got, want = got[finite], want[finite]
    den = want.norm()
    return float((got - want).norm() / (den if den > 0 else 1.0))


def inputs(seed, b, n, h, h_kv, d, learned, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=g).to(dtype)
    k = torch.randn(b, n, h_kv, d, generator=g).to(dtype)
    v = torch.randn(b, n, h_kv, d, generator=g).to(dtype)
    do = torch.randn(b, n, h, d, generator=g).to(dtype)
    z = torch.randn(h, generator=g) if learned else None
    return q, k, v, do, z


def check_against_dense(n, causal, window, sinks, learned, h=4, h_kv=4, d=16, b=2,
                        layout="auto", scale=None, dtype=torch.float32, seed=0):
    mask = dict(causal=causal, window=window, sinks=sinks)
    q, k, v, do, z = inputs(seed, b, n, h, h_kv, d, learned, dtype)

    # Dense reference on the whole sequence (CPU, float32, from the rounded inputs).
    leaves = [t.float().clone().requires_grad_() for t in (q, k, v)]
    zr = z.clone().requires_grad_() if learned else None
    o_ref, lse_ref = dense_attention(*leaves, sink_logits=zr, scale=scale, return_lse=True,
                                     **mask)
    grads_ref = torch.autograd.grad(o_ref, leaves + ([zr] if learned else []), do.float())

    # The op on this rank's shard, on this rank's GPU.
    def sh(t):
        return ringattn.shard(t, dim=1, layout=layout, **mask)
    mine = [sh(t).to(DEV).requires_grad_() for t in (q, k, v)]
    zl = z.to(DEV).requires_grad_() if learned else None
    o, lse = ring_attention(*mine, sink_logits=zl, scale=scale, layout=layout, seq_len=n,
                            return_lse=True, **mask)
    assert o.device == DEV and o.dtype == dtype and o.shape == mine[0].shape
    assert lse.device == DEV and lse.dtype == torch.float32 and lse.shape == (b, h, o.shape[1])
    grads = list(torch.autograd.grad(o, mine + ([zl] if learned else []), sh(do).to(DEV)))
    assert all(g.device == DEV for g in grads)
    assert all(g.dtype == dtype for g in grads[:3])
    if learned:
        grads[3] = ringattn.allreduce_(grads[3].cpu().contiguous())  # per-rank shares -> full dz
    o_full = ringattn.unshard(o.detach(), n, dim=1, layout=layout, **mask)

    tol = TOL[dtype]
    pos = ringattn.shard_positions(n, layout=layout, **mask)
    assert normalised_error(o, sh(o_ref)) < tol
    assert normalised_error(lse, lse_ref.detach()[:, :, pos]) < tol
    assert o_full.device == DEV and normalised_error(o_full, o_ref) < tol
    for name, got, want in zip(("dq", "dk", "dv"), grads[:3], grads_ref[:3]):
        err = normalised_error(got, sh(want))
        assert err < 2 * tol, f"{name}: normalised error {err}"
    if learned:
        assert normalised_error(grads[3], grads_ref[3]) < 2 * tol
    assert o_ref.abs().max() > 0.1  # the inputs were not trivial


MASKS = [
    # (causal, window, sinks)
    (False, 0, 0),
    (True, 0, 0),
    (False, 5, 0),
    (True, 5, 0),
    (True, 4, 2),
    (False, 3, 1),
    (True, 1, 3),
]


@pytest.mark.parametrize("causal,window,sinks", MASKS)
@pytest.mark.parametrize("learned", [False, True])
def test_masks_and_learned_sinks_f32(causal, window, sinks, learned):
    check_against_dense(n=13 * P + 3, causal=causal, window=window, sinks=sinks, learned=learned)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("causal,window,sinks,learned", [
    (True, 0, 0, False),
    (False, 0, 0, True),
    (True, 6, 2, True),
])
def test_half_precision(dtype, causal, window, sinks, learned):
    check_against_dense(n=21 * P + 5, causal=causal, window=window, sinks=sinks, learned=learned,
                        dtype=dtype, d=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("h,h_kv", [(4, 2), (6, 1), (4, 4)])
def test_gqa_mqa(dtype, h, h_kv):
    check_against_dense(n=11 * P + 1, causal=True, window=6, sinks=1, learned=True, h=h,
                        h_kv=h_kv, d=32, dtype=dtype)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_explicit_layouts_scale_and_longer_odd_sequence(layout):
    check_against_dense(n=97 * P + 13, causal=True, window=0, sinks=0, learned=False,
                        layout=layout, scale=0.3, d=128, b=1)


def test_shortest_sequence_one_token_per_rank():
    check_against_dense(n=P, causal=True, window=0, sinks=0, learned=True, layout="contiguous")


def test_inputs_made_on_a_side_stream():
    # The op synchronises torch's current stream before the library reads the inputs, so
    # producing them asynchronously on another stream is safe.
    n = 64 * P
    q, k, v, _, _ = inputs(5, 2, n, 4, 2, 64, False, torch.float32)
    want = ringattn.shard(dense_attention(q, k, v, causal=True), causal=True)
    side = torch.cuda.Stream(DEV)
    with torch.cuda.stream(side):
        big = torch.randn(4096, 4096, device=DEV)
        mine = [ringattn.shard(t, causal=True).to(DEV, non_blocking=True) * 1.0 + 0.0 * big[0, 0]
                for t in (q, k, v)]
        o = ring_attention(*mine, causal=True, seq_len=n)
        o2 = o * 2.0  # queued on the side stream after the op returned
    side.synchronize()
    assert normalised_error(o, want) < TOL[torch.float32]
    assert normalised_error(o2, 2.0 * want) < TOL[torch.float32]


def test_default_seq_len_and_training_step():
    n = 7 * P + 2
    q, k, v, _, _ = inputs(2, 1, n, 2, 1, 16, False, torch.float32)
    mine = [ringattn.shard(t, causal=True).to(DEV).requires_grad_() for t in (q, k, v)]
    o = ring_attention(*mine, causal=True)  # seq_len from one allreduce over the ranks
    want = ringattn.shard(dense_attention(q, k, v, causal=True), causal=True)
    assert normalised_error(o, want) < TOL[torch.float32]
    o.square().sum().backward()
    assert all(t.grad is not None and t.grad.device == DEV for t in mine)
    assert all(bool(t.grad.isfinite().all()) for t in mine)


def test_cpu_tensors_still_use_the_host_communicator():
    n = 5 * P + 1
    q, k, v, _, _ = inputs(4, 1, n, 2, 2, 8, False, torch.float32)
    mine = [ringattn.shard(t) for t in (q, k, v)]
    o = ring_attention(*mine, seq_len=n)
    assert o.device.type == "cpu"
    torch.testing.assert_close(o, ringattn.shard(dense_attention(q, k, v)), rtol=2e-5,
                               atol=2e-5)


def test_mixed_devices_are_refused_before_any_communication():
    q = torch.zeros(1, 4, 2, 8, device=DEV)
    cpu = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="one device.*k on cpu"):
        ring_attention(q, cpu, q, seq_len=4 * P)
    with pytest.raises(ValueError, match="one device.*q on cpu"):
        ring_attention(cpu, q, q, seq_len=4 * P)
    with pytest.raises(ValueError, match="one device.*sink_logits on cpu"):
        ring_attention(q, q, q, sink_logits=torch.zeros(2), seq_len=4 * P)
    with pytest.raises(ValueError, match="device buffers"):
        ring_attention(q, q, q, seq_len=4 * P, comm=ringattn.get_comm())
    with pytest.raises(ValueError, match="host buffers"):
        ring_attention(cpu, cpu, cpu, seq_len=4 * P, comm=COMM)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_another_gpu_than_the_communicators_is_refused():
    other = torch.device("cuda", (COMM.device + 1) % torch.cuda.device_count())
    q = torch.zeros(1, 4, 2, 8, device=other)
    with pytest.raises(ValueError, match=f"cuda:{COMM.device}"):
        ring_attention(q, q, q, seq_len=4 * P)


def test_library_refuses_host_pointers_with_the_nccl_communicator():
    # Below the Python checks: the C ABI asks CUDA where each pointer lives (inside the ranks'
    # agreement, so every rank gets the error).
    n_local = 4
    host = torch.zeros(1, n_local, 2, 8)
    dev = torch.zeros(1, n_local, 2, 8, device=DEV)
    lse = torch.zeros(1, 2, n_local, device=DEV)
    with pytest.raises(ringattn.Error, match="invalid argument.*q in device memory.*host memory"):
        _C.forward(COMM, False, 0, 0, 0.0, _C.LAYOUT_AUTO, n_local * P, [1, n_local, 2, 2, 8],
                   _C.F32, host.data_ptr(), dev.data_ptr(), dev.data_ptr(), 0, dev.data_ptr(),
                   lse.data_ptr())
    # Still in step afterwards.
    one = torch.ones(1, dtype=torch.int64)
    assert int(ringattn.allreduce_(one)) == P


def test_library_errors_are_agreed_on_every_rank():
    # H % H_kv != 0 on the last rank only: every rank must raise ringattn.Error (no hang).
    h_kv = 3 if ringattn.rank() == P - 1 else 2
    q = torch.zeros(1, 4, 4, 8, device=DEV)
    kv = torch.zeros(1, 4, h_kv, 8, device=DEV)
    with pytest.raises(ringattn.Error, match="invalid argument"):
        ring_attention(q, kv, kv, seq_len=4 * P, layout="contiguous")
    one = torch.ones(1, dtype=torch.int64)
    assert int(ringattn.allreduce_(one)) == P


def test_communicator_properties():
    assert COMM.name == "nccl"
    assert COMM.size == P and COMM.rank == ringattn.rank()
    assert 0 <= COMM.device < torch.cuda.device_count()
    assert ringattn.nccl_communicator() is COMM
    assert ringattn.get_comm().device == -1

"""ringattn.torch.ring_attention against PyTorch autograd of dense attention.

Run by ctest under `mpiexec -n P python3 -m pytest` for P in 1..4 (and directly for P = 1):
every rank builds the same whole-sequence inputs from a seed, runs the op on its shard, and
checks its shard of o, lse, dq, dk, dv, plus the rank-summed gradient of the sink logits,
against ringattn.reference.dense_attention (float32 autograd) on the whole sequence. All
collectives of a test run before its assertions, so a failing rank never leaves others waiting.
"""

import math

import pytest
import torch

import ringattn
from ringattn.reference import dense_attention, visible_mask
from ringattn.torch import ring_attention

P = ringattn.world_size()

# f32 rounding: the ring folds blocks in another order than the dense softmax.
TOL = dict(rtol=2e-5, atol=2e-5)


def inputs(seed, b, n, h, h_kv, d, learned):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=g)
    k = torch.randn(b, n, h_kv, d, generator=g)
    v = torch.randn(b, n, h_kv, d, generator=g)
    do = torch.randn(b, n, h, d, generator=g)
    z = torch.randn(h, generator=g) if learned else None
    return q, k, v, do, z


def check_against_dense(n, causal, window, sinks, learned, h=4, h_kv=4, d=16, b=2,
                        layout="auto", scale=None, seed=0):
    mask = dict(causal=causal, window=window, sinks=sinks)
    q, k, v, do, z = inputs(seed, b, n, h, h_kv, d, learned)

    # Dense reference on the whole sequence.
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    zr = z.clone().requires_grad_() if learned else None
    o_ref, lse_ref = dense_attention(*leaves, sink_logits=zr, scale=scale, return_lse=True,
                                     **mask)
    grads_ref = torch.autograd.grad(o_ref, leaves + ([zr] if learned else []), do)

    # The op on this rank's shard.
    def sh(t):
        return ringattn.shard(t, dim=1, layout=layout, **mask)
    mine = [sh(t).requires_grad_() for t in (q, k, v)]
    zl = z.clone().requires_grad_() if learned else None
    o, lse = ring_attention(*mine, sink_logits=zl, scale=scale, layout=layout, seq_len=n,
                            return_lse=True, **mask)
    grads = list(torch.autograd.grad(o, mine + ([zl] if learned else []), sh(do)))
    if learned:
        grads[3] = ringattn.allreduce_(grads[3].contiguous())  # per-rank shares -> full dz
    o_full = ringattn.unshard(o.detach(), n, dim=1, layout=layout, **mask)

    pos = ringattn.shard_positions(n, layout=layout, **mask)
    torch.testing.assert_close(o, sh(o_ref.detach()), **TOL)
    torch.testing.assert_close(lse, lse_ref.detach()[:, :, pos], **TOL)
    torch.testing.assert_close(o_full, o_ref.detach(), **TOL)
    for name, got, want in zip(("dq", "dk", "dv"), grads[:3], grads_ref[:3]):
        torch.testing.assert_close(got, sh(want), **TOL, msg=lambda m: f"{name}: {m}")
    if learned:
        torch.testing.assert_close(grads[3], grads_ref[3], **TOL)
    # The inputs were not trivial: some output is far from zero and from a plain mean of v.
    assert o_ref.abs().max() > 0.1


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
def test_masks_and_learned_sinks(causal, window, sinks, learned):
    check_against_dense(n=13 * P + 3, causal=causal, window=window, sinks=sinks, learned=learned)


@pytest.mark.parametrize("h,h_kv", [(4, 2), (6, 1), (4, 4)])
def test_gqa_mqa(h, h_kv):
    check_against_dense(n=11 * P + 1, causal=True, window=6, sinks=1, learned=True, h=h,
                        h_kv=h_kv, d=8)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_explicit_layouts_and_scale(layout):
    check_against_dense(n=9 * P + 2, causal=True, window=0, sinks=0, learned=False,
                        layout=layout, scale=0.3)


def test_shortest_sequence_one_token_per_rank():
    check_against_dense(n=P, causal=True, window=0, sinks=0, learned=True, layout="contiguous")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    n = 10 * P + 1
    mask = dict(causal=True, window=5, sinks=1)
    q, k, v, do, _ = inputs(3, 1, n, 4, 2, 16, False)
    q, k, v, do = (t.to(dtype) for t in (q, k, v, do))
    leaves = [t.float().clone().requires_grad_() for t in (q, k, v)]
    o_ref = dense_attention(*leaves, **mask)
    g_ref = torch.autograd.grad(o_ref, leaves, do.float())
    mine = [ringattn.shard(t, **mask).requires_grad_() for t in (q, k, v)]
    o = ring_attention(*mine, seq_len=n, **mask)
    g = torch.autograd.grad(o, mine, ringattn.shard(do, **mask))
    assert o.dtype == dtype and all(t.dtype == dtype for t in g)
    # Storage rounding of the result (8 or 11 bits) bounds the difference.
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=4e-3, atol=4e-3)
    torch.testing.assert_close(o.float(), ringattn.shard(o_ref.detach(), **mask), **tol)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got.float(), ringattn.shard(want, **mask), **tol)


def test_shard_positions_cover_the_sequence_once():
    n = 7 * P + 5
    for layout in ("contiguous", "zigzag"):
        counts = torch.zeros(n, dtype=torch.int64)
        counts[ringattn.shard_positions(n, causal=True, layout=layout)] += 1
        ringattn.allreduce_(counts)
        assert counts.eq(1).all()
    assert ringattn.resolve_layout("auto", causal=True, window=0) == "zigzag"
    assert ringattn.resolve_layout("auto", causal=True, window=8) == "contiguous"


def test_visible_mask_matches_spec():
    m = visible_mask(6, causal=True, window=2, sinks=1)
    for i in range(6):
        for j in range(6):
            want = j <= i and (i - j < 2 or j < 1)
            assert bool(m[i, j]) == want


def test_gradient_through_lse_is_refused():
    n = 4 * P
    q, k, v, _, _ = inputs(1, 1, n, 2, 2, 8, False)
    mine = [ringattn.shard(t).requires_grad_() for t in (q, k, v)]
    o, lse = ring_attention(*mine, seq_len=n, return_lse=True)
    with pytest.raises(NotImplementedError, match="lse"):
        (o.sum() + lse.sum()).backward()


def test_bad_arguments_raise_before_any_communication():
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="share a dtype"):
        ring_attention(q, q.double(), q, seq_len=4 * P)
    with pytest.raises(ValueError, match="sink_logits"):
        ring_attention(q, q, q, sink_logits=torch.zeros(3), seq_len=4 * P)
    with pytest.raises(ValueError, match="layout"):
        ringattn.shard_positions(8, layout="diagonal")


def test_library_errors_are_agreed_on_every_rank():
    # H % H_kv != 0 on the last rank only: every rank must raise ringattn.Error (no hang).
    n = 4 * P
    h_kv = 3 if ringattn.rank() == P - 1 else 2
    q = torch.zeros(1, 4, 4, 8)
    kv = torch.zeros(1, 4, h_kv, 8)
    with pytest.raises(ringattn.Error, match="invalid argument"):
        ring_attention(q, kv, kv, seq_len=n, layout="contiguous")
    # Still in step afterwards.
    one = torch.ones(1, dtype=torch.int64)
    assert int(ringattn.allreduce_(one)) == P


def test_default_seq_len_is_the_sum_over_ranks():
    n = 5 * P + 2
    q, k, v, _, _ = inputs(2, 1, n, 2, 1, 8, False)
    mine = [ringattn.shard(t, causal=True) for t in (q, k, v)]
    o = ring_attention(*mine, causal=True)
    torch.testing.assert_close(o, ringattn.shard(dense_attention(q, k, v, causal=True),
                                                 causal=True), **TOL)
    assert math.isfinite(float(o.abs().sum()))

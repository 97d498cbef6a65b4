"""Dense attention in plain PyTorch: the definition ring_attention must equal (SPEC section 2).

Whole sequence on one process, every mask from global positions, the learned sink logit as an
extra softmax column with no value. Differentiable by autograd; used by the tests and by
examples/train_lm.py --reference.
"""

import math

import torch

__all__ = ["visible_mask", "dense_attention"]


def visible_mask(seq_len, causal=False, window=0, sinks=0, device=None):
    """[N, N] bool on `device` (default CPU), True where query i (row) sees key j (column)."""
    i = torch.arange(seq_len, device=device).view(-1, 1)
    j = torch.arange(seq_len, device=device).view(1, -1)
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    if causal:
        mask &= j <= i
    if window > 0:
        d = i - j
        inside = d < window if causal else d.abs() < window
        mask &= inside | (j < sinks)
    return mask


def dense_attention(q, k, v, causal=False, window=0, sinks=0, sink_logits=None, scale=None,
                    return_lse=False):
    """q [B, N, H, D], k and v [B, N, H_kv, D] (GQA: query head h reads kv head h // (H/H_kv)),
    sink_logits [H]. Computes in float32 on q's device; returns o in q's dtype (and lse [B, H, N]
    float32).
    A row that sees nothing gets o = 0 and lse = -inf."""
    b, n, h, d = q.shape
    group = h // k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = q.float().transpose(1, 2)                                       # [B, H, N, D]
    kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)      # [B, H, N, D]
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    s = scale * torch.matmul(qf, kf.transpose(-1, -2))                   # [B, H, N, N]
    s = s.masked_fill(~visible_mask(n, causal, window, sinks, device=q.device), float("-inf"))
    if sink_logits is not None:
        s = torch.cat([s, sink_logits.float().view(1, h, 1, 1).expand(b, h, n, 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)                                     # [B, H, N]
    # exp(s - lse) with empty rows (lse = -inf) giving p = 0 rather than NaN.
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    o = torch.matmul(p[..., :n], vf).transpose(1, 2).to(q.dtype)         # [B, N, H, D]
    return (o, lse) if return_lse else o

"""Rotary position embedding for q and k in one kernel launch (forward and backward).

Layout as in Hugging Face attention modules: ``q`` is ``[batch, q_heads, seq,
head_dim]``, ``k`` is ``[batch, kv_heads, seq, head_dim]`` (grouped-query
attention: the head counts differ), ``cos``/``sin`` are ``[batch or 1, seq,
head_dim]``. The rotate-half convention splits each head into halves
``x1, x2``::

    out1 = x1 * cos1 - x2 * sin1
    out2 = x2 * cos2 + x1 * sin2

The backward is the transpose of that linear map::

    dx1 = g1 * cos1 + g2 * sin2
    dx2 = g2 * cos2 - g1 * sin1

One program handles one ``(batch, position)`` pair for every head of q and of
k, so cos/sin are read once per position. Strides are passed explicitly:
q and k usually arrive as transposed views of the projection outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait_kernels.ops._util import block_size


@triton.jit
def _rotate_heads(X, OUT, x_base, out_base, sxh, oxh, c1, c2, s1, s2, n_heads, half,
                  BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (dims < half)
    x1 = tl.load(X + x_base + heads * sxh + dims, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_base + heads * sxh + dims + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(OUT + out_base + heads * oxh + dims, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(OUT + out_base + heads * oxh + dims + half, o2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN,
                 sqb, sqh, sqs, skb, skh, sks,
                 sqob, sqoh, sqos, skob, skoh, skos,
                 scb, scs, seq_len, n_q_heads, n_k_heads, half,
                 BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // seq_len
    s = pid % seq_len
    dims = tl.arange(0, BLOCK_D)[None, :]
    dmask = dims < half
    cs_base = b * scb + s * scs
    c1 = tl.load(COS + cs_base + dims, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cs_base + dims + half, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cs_base + dims, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cs_base + dims + half, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(Q, QO, b * sqb + s * sqs, b * sqob + s * sqos, sqh, sqoh, c1, c2, s1, s2, n_q_heads, half,
                  BACKWARD, BLOCK_HQ, BLOCK_D)
    _rotate_heads(K, KO, b * skb + s * sks, b * skob + s * skos, skh, skoh, c1, c2, s1, s2, n_k_heads, half,
                  BACKWARD, BLOCK_HK, BLOCK_D)


def _launch(q, k, cos, sin, backward: bool):
    batch, n_q, seq, dim = q.shape
    n_k = k.shape[1]
    if dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {dim}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    # cos/sin may have a batch of 1 (shared positions): a stride of 0 broadcasts it
    cos = cos.expand(batch, seq, dim)
    sin = sin.expand(batch, seq, dim)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _rope_kernel[(batch * seq,)](
        q, k, q_out, k_out, cos, sin,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), seq, n_q, n_k, dim // 2,
        BACKWARD=backward, BLOCK_HQ=block_size(n_q, 1), BLOCK_HK=block_size(n_k, 1), BLOCK_D=block_size(dim // 2),
    )
    return q_out, k_out


class RopeFunction(torch.autograd.Function):
    """Autograd wrapper; cos and sin get no gradient (they come from buffers)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        # an unused output's gradient arrives zero-filled (autograd materialises it)
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _launch(dq, dk, cos, sin, backward=True)
        return dq, dk, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate ``q`` ``[B, Hq, S, D]`` and ``k`` ``[B, Hk, S, D]`` by ``cos``/``sin``
    ``[B or 1, S, D]``; same result as transformers' ``apply_rotary_pos_emb``."""
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    return RopeFunction.apply(q, k, cos, sin)

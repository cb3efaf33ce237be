"""Plain PyTorch versions of every kernel: the references tests and benchmarks
compare against. They compute in float32 and cast back, as the kernels do."""

from __future__ import annotations


def rms_norm(x, weight, eps=1e-6, offset=0.0, residual=None):
    import torch

    s = x if residual is None else x + residual
    s32 = s.float()
    y = s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps) * (weight.float() + offset)
    y = y.to(x.dtype)
    return y if residual is None else (y, s)


def rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q_out = (q.float() * cos + rotate_half(q.float()) * sin).to(q.dtype)
    k_out = (k.float() * cos + rotate_half(k.float()) * sin).to(k.dtype)
    return q_out, k_out


def swiglu(gate, up):
    import torch.nn.functional as F

    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def geglu(gate, up):
    import torch.nn.functional as F

    return (F.gelu(gate.float(), approximate="tanh") * up.float()).to(gate.dtype)


def linear_cross_entropy(hidden, head_weight, labels, head_bias=None, softcap=None):
    """Materialises the full logits: fine for tests, the thing the kernel avoids."""
    import torch
    import torch.nn.functional as F

    logits = F.linear(hidden, head_weight, head_bias).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"), int((labels != -100).sum())


def gated_rms_norm(x, gate, weight, eps=1e-6, group_size=None, norm_before_gate=True):
    """transformers' two gated RMSNorms (Qwen3-Next's norm-then-gate, Mamba-2's
    gate-then-group-norm), rounding where they round."""
    import torch
    import torch.nn.functional as F

    in_dtype = x.dtype
    x32 = x.float()
    if norm_before_gate:
        n = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(in_dtype)
        return ((weight * n).float() * F.silu(gate.float())).to(in_dtype)
    h = x32 * F.silu(gate.float()) if gate is not None else x32
    group_size = group_size or x.shape[-1]
    grouped = h.view(*h.shape[:-1], h.shape[-1] // group_size, group_size)
    n = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).view(h.shape)
    return weight * n.to(in_dtype)

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

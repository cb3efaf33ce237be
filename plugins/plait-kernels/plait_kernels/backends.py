"""The kernel implementations a model can be patched with, by backend name.

A backend is a dict of callables with the signatures of
:mod:`plait_kernels.reference`. ``triton`` is Plait's own kernels, ``liger``
wraps liger-kernel's functional API, ``torch`` the references. Each is built
on first use so that importing this module stays cheap.
"""

from __future__ import annotations

import importlib.util

PIECES = ("rms_norm", "rms_norm_gated", "rope", "glu", "loss")


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def get_backend(name: str) -> dict:
    """``{"rms_norm", "rope", "swiglu", "geglu", "loss"}`` callables of backend ``name``,
    and ``"rms_norm_gated"`` where the backend has one (liger-kernel has none)."""
    if name == "triton":
        from plait_kernels.ops.cross_entropy import fused_linear_cross_entropy
        from plait_kernels.ops.gated_rms_norm import gated_rms_norm
        from plait_kernels.ops.glu import geglu, swiglu
        from plait_kernels.ops.rms_norm import rms_norm
        from plait_kernels.ops.rope import apply_rope

        return dict(rms_norm=rms_norm, rms_norm_gated=gated_rms_norm, rope=apply_rope, swiglu=swiglu, geglu=geglu,
                    loss=fused_linear_cross_entropy)
    if name == "liger":
        return _liger_backend()
    if name == "torch":
        from plait_kernels import reference

        return dict(rms_norm=reference.rms_norm, rms_norm_gated=reference.gated_rms_norm, rope=reference.apply_rope,
                    swiglu=reference.swiglu, geglu=reference.geglu, loss=reference.linear_cross_entropy)
    raise ValueError(f"unknown kernel backend {name!r}; known: triton, liger, torch")


def _liger_backend() -> dict:
    from liger_kernel.transformers import functional as lf

    def rms_norm(x, weight, eps=1e-6, offset=0.0, residual=None):
        if residual is not None:
            return lf.liger_fused_add_rms_norm(x, residual, weight, eps, offset=offset,
                                               casting_mode="gemma" if offset else "llama", in_place=False)
        return lf.liger_rms_norm(x, weight, eps, offset=offset, casting_mode="gemma" if offset else "llama",
                                 in_place=False)

    def rope(q, k, cos, sin):
        return lf.liger_rope(q, k, cos, sin)

    def loss(hidden, head_weight, labels, head_bias=None, softcap=None):
        out = lf.liger_fused_linear_cross_entropy(hidden, head_weight, labels, bias=head_bias, ignore_index=-100,
                                                  reduction="sum", softcap=softcap)
        return out, int((labels != -100).sum())

    return dict(rms_norm=rms_norm, rope=rope, swiglu=lf.liger_swiglu, geglu=lf.liger_geglu, loss=loss)

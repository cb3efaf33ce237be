"""plait-kernels' hookimpls (the ``kernels`` entry point).

Kept free of torch/triton imports at module level: ``plait --help`` loads
every plugin. The work happens in :mod:`plait_kernels.patch`.
"""

from __future__ import annotations

from plait.hookspecs import hookimpl


@hookimpl
def config_schema():
    from plait_kernels.config import KernelsConfig

    return KernelsConfig


@hookimpl
def validate_config(cfg):
    from plait_kernels.selection import check_config

    check_config(cfg)


@hookimpl
def patch_model(cfg, model):
    from plait_kernels.patch import patch
    from plait_kernels.selection import choose, routes_expert_lora

    chosen = choose(cfg)
    experts = routes_expert_lora(cfg)
    if not any(chosen.values()) and not cfg.torch_compile and not experts:
        return None
    report = patch(cfg, model, chosen, experts=experts)
    if chosen["loss"]:
        report["loss"] = f"{'plait ' if chosen['loss'] == 'triton' else ''}{chosen['loss']} fused_linear_cross_entropy"
    return report or None


@hookimpl
def install_step_hooks(cfg, model, optimizer, step_of):
    """Cast the LoRA factors once per optimizer step while a single-process run
    trains (:mod:`plait_kernels.factor_casts`), unless ``lora_cast_once: false``.
    Held whatever else is on: only the fused LoRA paths ask the cache, so
    without them it stays empty."""
    from plait_kernels.patch import runs_in_one_process

    # several processes: a sharding wrapper (FSDP) frees and gathers parameters
    # within a step, so a factor's memory does not stay its own; each use casts there
    if cfg.lora_cast_once is False or cfg.plait_kernels == "off" or not runs_in_one_process():
        return None
    from plait_kernels.factor_casts import hold_for_run

    return [hold_for_run(optimizer)]


@hookimpl
def build_loss(cfg, model):
    """The fused linear + cross-entropy when the loss piece has a kernel backend;
    ``None`` (core's chunked loss) otherwise."""
    from plait_kernels.selection import choose

    if getattr(cfg, "use_eaft", None):
        return None  # entropy-aware focal training weights each token by its logits, which the fused kernel never builds
    backend = choose(cfg)["loss"]
    if backend is None:
        return None
    from plait_kernels.backends import get_backend

    return make_loss(get_backend(backend)["loss"], head_options(model))


def head_options(model) -> dict:
    """The head's bias and logit softcap, as core's loss step binds them."""
    try:
        from plait.model.head import head_options as core_head_options
    except ImportError:  # an older core: softcap only
        softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        return {"softcap": float(softcap)} if softcap else {}
    return core_head_options(model)


def make_loss(loss_fn, options: dict):
    """Bind the head's bias / softcap into core's ``loss(hidden, head_weight, labels)``."""

    def loss(hidden, head_weight, labels, **overrides):
        return loss_fn(hidden, head_weight, labels, **{**options, **overrides})

    loss.__name__ = getattr(loss_fn, "__name__", "fused_linear_cross_entropy")
    return loss

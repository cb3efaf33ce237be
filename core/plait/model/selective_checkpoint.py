"""Selective activation checkpointing: keep some ops' outputs, recompute the rest.

Plain checkpointing recomputes a whole decoder layer in the backward pass.
Attention is the part of a layer that costs the most to recompute at long
sequences (its work grows with the square of the length) and the least to
keep (its output is ``tokens x hidden`` values, plus a small per-head
log-sum-exp). Axolotl's ``selective_checkpointing`` keeps it: the layer's
forward saves the outputs of the chosen ops, and the recompute pass hands
them back instead of running the ops again.

This rides on torch's own mechanism
(``torch.utils.checkpoint.create_selective_checkpoint_contexts``): every op
dispatched inside a checkpointed layer is asked a policy, and ops the policy
must save are cached in the forward and replayed in the recompute. Only ops
the dispatcher sees can be saved, so ``attention`` means torch's SDPA kernels
and the flash-attention ops (flash-attn's, torch's varlen kernel); Triton
kernels and other custom code are recomputed as usual.

Hybrid models (sliding-window layers beside full-attention ones) keep the
sliding layers' attention recomputed unless ``save_sliding_window`` says
otherwise: a window's attention is cheap to redo. Which layer is running is
read from the model config's ``layer_types``, published by a forward pre-hook
on each checkpointed layer (it fires again in the recompute pass).
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger("plait.recompute")

#: the ``save`` entry that names every attention kernel
ATTENTION = "attention"
#: torch's SDPA kernels (whichever backend SDPA picks on this device)
SDPA_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
#: layer types whose attention stays recomputed unless save_sliding_window (Axolotl's defaults)
WINDOWED_LAYER_TYPES = ("sliding_attention", "chunked_attention")


def _op_name(op) -> str:
    try:
        return op.name()
    except (AttributeError, TypeError):
        return str(op)


def is_attention_op(op) -> bool:
    """Whether a dispatched op is an attention kernel's forward."""
    name = _op_name(op)
    if any(name.endswith(f"::{packet}") or f"::{packet}." in name for packet in SDPA_OPS):
        return True
    lowered = name.lower()
    # flash-attn's ops and torch's varlen kernel (aten::_flash_attention_forward)
    return ("flash_attn" in lowered or "flash_attention" in lowered) and not (
        "backward" in lowered or "bwd" in lowered)


class SavePolicy:
    """The policy torch's selective checkpointing asks about every op of a
    checkpointed layer: save the chosen ops, recompute everything else."""

    def __init__(self, save: list[str], recompute_layer_types: tuple[str, ...] = ()):
        self.attention = ATTENTION in save
        self.substrings = [entry for entry in save if entry != ATTENTION]
        self.recompute_layer_types = set(recompute_layer_types)
        #: the layer type of the checkpointed layer now running (set by its pre-hook)
        self.layer_type: str | None = None
        self.saved: set[str] = set()

    def wants(self, op) -> bool:
        if self.layer_type in self.recompute_layer_types:
            return False
        if self.attention and is_attention_op(op):
            return True
        name = _op_name(op)
        return any(entry in name for entry in self.substrings)

    def __call__(self, ctx, op, *args, **kwargs):
        from torch.utils.checkpoint import CheckpointPolicy

        if not self.wants(op):
            return CheckpointPolicy.PREFER_RECOMPUTE
        name = _op_name(op)
        if name not in self.saved:
            self.saved.add(name)
            log.info("selective_checkpointing: keeping the outputs of %s (the backward does not recompute it)",
                     name)
        return CheckpointPolicy.MUST_SAVE


def publish_layer_types(model, policy: SavePolicy) -> None:
    """Tell ``policy`` the ``layer_types`` entry of each checkpointed layer as it runs."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from plait.model.forward import text_config

    config = getattr(model, "config", None)
    layer_types = getattr(text_config(config), "layer_types", None) if config is not None else None
    if not layer_types:
        return
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if len(layers) != len(layer_types):
        return  # not one layer list the config describes (a composite model): every layer's attention is kept

    def entering(layer_type, module, args):
        policy.layer_type = layer_type

    for layer, layer_type in zip(layers, layer_types):
        layer.register_forward_pre_hook(functools.partial(entering, layer_type))


def selective_context_fn(model, settings):
    """The ``context_fn`` for ``torch.utils.checkpoint.checkpoint`` that
    ``selective_checkpointing`` (``settings``) asks for."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    windowed = () if settings.save_sliding_window else tuple(
        settings.recompute_layer_types if settings.recompute_layer_types is not None else WINDOWED_LAYER_TYPES)
    policy = SavePolicy(list(settings.save), windowed)
    if windowed:
        publish_layer_types(model, policy)
    log.info("selective_checkpointing: checkpointed layers keep %s%s", ", ".join(settings.save),
             f" (recomputed in {', '.join(windowed)} layers)" if windowed else "")
    return functools.partial(create_selective_checkpoint_contexts, policy)

"""What a run gets, and misses, for its model type: printed in the run log.

A model whose ``config.model_type`` no family claims still trains (the
generic path: any ``AutoModelForCausalLM``), but without the per-family
optimisations. :func:`describe_optimisations` names each one that is off and
why, so a slow or memory-hungry run is explained rather than mysterious.
"""

from __future__ import annotations

from plait_models.lookup import base_model_of
from plait_models.moe import describe_experts


def _class_names(model) -> set[str]:
    """The module classes in ``model``, counting a kernel plugin's swapped-in
    module as the class it names in ``replaces_class``: that swap happened;
    and a module FSDP2 sharded as the class it had (see :func:`_unsharded_class`)."""
    names = set()
    for module in model.modules():
        names.add(_unsharded_class(module).__name__)
        replaced = getattr(module, "replaces_class", None)
        if isinstance(replaced, str):
            names.add(replaced)
    return names


def _unsharded_class(module) -> type:
    """The class of ``module`` before FSDP2: ``fully_shard`` swaps a module's
    class for a generated subclass ``FSDP<Name>`` (bases ``FSDPModule`` and the
    class), so after plait-parallel shards a run every decoder layer would
    otherwise look like a class the family does not name."""
    cls = type(module)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return cls
    if isinstance(module, FSDPModule):
        own = [base for base in cls.__bases__ if not issubclass(base, FSDPModule)]
        if own:
            return own[0]
    return cls


def describe_optimisations(model, family) -> list[str]:
    """Lines for the log: what is unavailable for ``model`` given its
    ``family`` (``None`` for an unknown model type), plus model quirks the loop
    must honour. An empty list means nothing is missing."""
    base = base_model_of(model)
    config = base.config
    model_type = getattr(config, "model_type", "?")
    lines: list[str] = []
    if family is None:
        no_split = getattr(base, "_no_split_modules", None) or []
        unit = ", ".join(no_split) if no_split else "none known: FSDP shards the whole model as one unit"
        lines += [
            f"model type {model_type!r} has no Plait model family (plait-models or another plugin); "
            "generic path, these optimisations are off:",
            "  tensor parallel: unavailable (no TP plan for this architecture)",
            "  kernel swaps: no fused RMSNorm / MLP kernels (their classes are unknown)",
            "  lora_target_linear: no curated list; every nn.Linear but the head is adapted, routers included",
            "  chat template: no family default; set chat_template when the tokenizer has none",
            f"  FSDP / activation checkpointing unit: from transformers' _no_split_modules ({unit})",
        ]
    else:
        present = _class_names(base)
        if family.decoder_layer_class not in present:
            lines.append(
                f"{family.name}: decoder layer class {family.decoder_layer_class} not found in the model "
                "(a different transformers version?): per-layer FSDP wrapping and checkpointing fall back to "
                "_no_split_modules"
            )
        for kind, cls in (("RMSNorm", family.norm_class), ("MLP", family.mlp_class)):
            if cls is None:
                lines.append(f"{family.name}: no {kind} kernel swap (no {kind} module class in this architecture)")
            elif cls not in present:
                lines.append(f"{family.name}: {kind} class {cls} not found in the model: its kernel swap is skipped")
        if not family.tp_plan:
            lines.append(f"{family.name}: tensor parallel unavailable (fused projections; see the family module)")
        lines += describe_experts(model, family)
        if family.is_moe and getattr(config, "mlp_only_layers", None):
            lines.append(
                f"{family.name}: dense layers {list(config.mlp_only_layers)} (mlp_only_layers) are not covered by "
                "lora_target_linear; add lora_target_modules: [gate_proj, up_proj, down_proj] to adapt them"
            )
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        lines.append(
            f"{model_type}: logits are soft-capped at {softcap}: the loss step must apply tanh(logits / c) * c "
            "(core's does; a replacement loss kernel must too)"
        )
    if getattr(config, "attn_logit_softcapping", None) and getattr(config, "_attn_implementation", None) == "sdpa":
        lines.append(
            f"{model_type}: attention soft-capping is ignored by SDPA; use eager_attention or flash_attention "
            "for exact Gemma 2 attention"
        )
    return lines

"""What Plait knows about one model family, and how to look it up.

Plugins describe families through the ``model_families`` hook; other plugins
(kernels, parallel, peft) ask :func:`find_family` instead of matching class
names themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelFamily:
    """Per-family facts. Module names are attribute names inside a decoder layer
    (``self_attn.q_proj``) or class names (``LlamaDecoderLayer``)."""

    name: str
    #: values of ``config.model_type`` this family covers
    model_types: tuple[str, ...]
    #: class name of the decoder layer (FSDP wrapping, activation checkpointing)
    decoder_layer_class: str
    #: linear modules LoRA targets for ``lora_target_linear`` (routers and the head excluded)
    lora_target_linear: tuple[str, ...] = ()
    #: class name of the RMSNorm module, for kernel swaps
    norm_class: str | None = None
    #: class name of the attention module (q/k/v/o projections and rotary), for kernel swaps
    attention_class: str | None = None
    #: class name of the MLP module, and its activation kind ("swiglu", "geglu")
    mlp_class: str | None = None
    mlp_activation: str | None = None
    #: the decoder layer adds the MLP's output straight to the residual stream and
    #: nothing after the MLP saves it for backward (no post-MLP norm), so a
    #: checkpoint's recompute pass may skip computing that output
    mlp_output_feeds_residual: bool = False
    #: tensor-parallel plan: module suffix -> "colwise" | "rowwise" | "sequence"
    tp_plan: dict[str, str] = field(default_factory=dict)
    #: jinja chat template used when the tokenizer has none
    default_chat_template: str | None = None
    #: tokens that end an assistant turn (the model must learn to emit them)
    end_of_turn_tokens: tuple[str, ...] = ()
    #: mixture of experts: config key holding the router aux-loss coefficient
    router_aux_loss_coef_key: str | None = None
    is_moe: bool = False
    #: RMSNorm scales by ``weight + norm_offset`` (Gemma: 1.0), for kernel swaps
    norm_offset: float = 0.0
    #: fused 3D expert parameters (suffixes) that are not nn.Linear: LoRA reaches them via peft ``target_parameters``
    expert_parameters: tuple[str, ...] = ()
    #: special tokens the default chat template uses (added when the tokenizer lacks them)
    chat_special_tokens: tuple[str, ...] = ()
    #: dedicated pad tokens to prefer over EOS/end-of-turn, first one in the vocabulary wins
    pad_token_candidates: tuple[str, ...] = ()


def all_families(pm) -> list[ModelFamily]:
    """Every family contributed by the installed plugins, later plugins first."""
    families: list[ModelFamily] = []
    for contributed in pm.hook.model_families():
        families.extend(contributed or ())
    return families


def find_family(pm, model_type: str) -> ModelFamily | None:
    """The family claiming ``model_type``, or ``None`` (generic path)."""
    for family in all_families(pm):
        if model_type in family.model_types:
            return family
    return None

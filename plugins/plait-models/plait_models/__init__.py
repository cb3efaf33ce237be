"""plait-models: what Plait knows about each model family.

Registered through the entry point ``models``. Hooks:

* ``model_families``: one :class:`plait.families.ModelFamily` per module in
  :mod:`plait_models.families` (llama, mistral, mixtral, qwen2, qwen3,
  qwen2_moe, qwen3_moe, gemma2, gemma3, phi3);
* ``config_schema``: ``router_aux_loss_coef``, ``lora_target_experts``,
  ``model_config_type``;
* ``validate_config``: MoE keys on a dense model, ``lora_target_experts``
  without LoRA, ``tensor_parallel_size`` for a family without a TP plan; then
  fills ``chat_template_jinja`` and ``special_tokens.pad_token`` from the
  family when a local tokenizer lacks them (``plait config explain`` shows
  ``plugin:models``);
* ``on_train_start``: prints what the model's family lacks
  (:func:`describe_optimisations`) and makes the model's generation config
  stop on end-of-turn tokens as well as EOS.

Helpers other plugins and the loop call (no torch at import):
:func:`apply_family_tokenizer_fixes`, :func:`set_generation_stop_tokens`,
:func:`moe_aux_loss`, :func:`backbone_kwargs`, :func:`lora_expert_targets`,
:func:`describe_optimisations`, :func:`family_of_model`.
"""

from __future__ import annotations

from plait.families import find_family
from plait.hookspecs import hookimpl

from plait_models.config import ModelsConfig, fill_tokenizer_defaults, model_type_of, validate
from plait_models.generic import describe_optimisations
from plait_models.lookup import family_of_model
from plait_models.moe import (backbone_kwargs, check_expert_adapters, describe_experts, lora_expert_targets,
                              moe_aux_loss)
from plait_models.tokenizer_fixes import (TokenizerFixes, apply_family_tokenizer_fixes, set_generation_stop_tokens,
                                          stop_token_ids)

__all__ = [
    "ModelsConfig", "TokenizerFixes", "apply_family_tokenizer_fixes", "backbone_kwargs", "describe_experts",
    "describe_optimisations", "family_of_model", "lora_expert_targets", "model_type_of", "moe_aux_loss",
    "set_generation_stop_tokens", "stop_token_ids",
]


@hookimpl
def model_families():
    from plait_models.families import FAMILIES

    return list(FAMILIES)


@hookimpl
def config_schema():
    return ModelsConfig


@hookimpl
def validate_config(cfg):
    model_type = model_type_of(cfg)
    family = find_family(cfg.plugin_manager, model_type) if model_type and cfg.plugin_manager else None
    validate(cfg, family)
    fill_tokenizer_defaults(cfg, family)


@hookimpl
def on_train_start(run):
    import sys

    from plait_models.lookup import base_model_of

    family = family_of_model(run.pm, run.model, getattr(run.cfg, "model_config_type", None))
    check_expert_adapters(run.cfg, run.model, family)
    if run.tokenizer is not None:
        # the fine-tuned chat model ends turns with <|eot_id|>-style tokens: generate() must stop there
        ids = stop_token_ids(family, run.tokenizer)
        base = base_model_of(run.model)
        if len(ids) > 1 and getattr(base, "generation_config", None) is not None:
            set_generation_stop_tokens(base, ids, run.tokenizer.pad_token_id)
    if getattr(run, "is_main", True):
        for line in describe_optimisations(run.model, family):
            print(f"models: {line}", file=sys.stderr, flush=True)

"""plait-models: what Plait knows about each model family.

Registered through the entry point ``models``. Hooks:

* ``model_families``: one :class:`plait.families.ModelFamily` per module in
  :mod:`plait_models.families` (llama, mistral, mixtral, qwen2, qwen3,
  qwen2_moe, qwen3_moe, gemma2, gemma3, phi3);
* ``config_schema``: ``router_aux_loss_coef``, ``lora_target_experts``,
  ``llama4_linearized_experts``, ``model_config_type``;
* ``configure``: fills ``chat_template_jinja`` (and its ``tokens``) and
  ``special_tokens.pad_token`` from the family when a local tokenizer lacks
  them (``plait config explain`` shows ``plugin:models``);
* ``validate_config``: MoE keys on a dense model, ``lora_target_experts``
  without LoRA, ``llama4_linearized_experts`` off Llama 4 or on a fused checkpoint, ``tensor_parallel_size`` for a family without a TP plan;
* ``loading_context``: with ``llama4_linearized_experts``, transformers
  builds Llama 4's experts one ``nn.Linear`` per expert
  (:mod:`plait_models.llama4_experts`);
* ``on_train_start``: prints what the model's family lacks
  (:func:`describe_optimisations`) and makes the model's generation config
  stop on end-of-turn tokens as well as EOS; says when the MoE router loss is on;
* ``patch_model`` (training only): turns on ``output_router_logits`` of an
  MoE model when the router loss is on (:func:`request_router_logits`);
* ``tokenizer_loaded``: :func:`apply_family_tokenizer_fixes` on the run's
  tokenizer (family from the model's ``model_type``);
* ``extra_loss``: the MoE router load-balancing loss (:func:`moe_aux_loss`);
* ``chat_templates``: family templates under Axolotl's names (``gemma``,
  ``gemma3``, ``phi_3``; see :mod:`plait_models.template_names`);
* ``register_commands``: ``plait models``, the support matrix of every
  architecture (:mod:`plait_models.support`).

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
def chat_templates():
    from plait_models.template_names import CHAT_TEMPLATES

    return dict(CHAT_TEMPLATES)


@hookimpl
def config_schema():
    return ModelsConfig


def _family(cfg):
    model_type = model_type_of(cfg)
    return find_family(cfg.plugin_manager, model_type) if model_type and cfg.plugin_manager else None


@hookimpl
def configure(cfg):
    fill_tokenizer_defaults(cfg, _family(cfg))


@hookimpl
def validate_config(cfg):
    validate(cfg, _family(cfg))


@hookimpl
def loading_context(cfg):
    if not cfg.llama4_linearized_experts:
        return None
    from plait_models.llama4_experts import building_linearized_experts

    return building_linearized_experts()


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
    note = router_loss_note(run.cfg, run.model, family)
    if note and getattr(run, "is_main", True):
        print(f"models: {note}", file=sys.stderr, flush=True)


def request_router_logits(cfg, model, family) -> str | None:
    """Make an MoE model return ``router_logits`` from its forward when the
    router loss is on, so :func:`extra_loss` can add it; returns a log line.

    With ``sample_packing`` too: the loop calls the backbone, whose router
    logits are per token and, with the rows isolated, the same as for each row
    run alone; the loss then pools every slot of the packed bins (the padding
    tail of a bin included, a share of 1 - sample_packing_efficiency).
    """
    from plait_models.lookup import base_model_of

    note = router_loss_note(cfg, model, family)
    if note is not None:
        base_model_of(model).config.output_router_logits = True
    return note


def router_loss_note(cfg, model, family) -> str | None:
    """The log line saying the router loss is on for this MoE model, or
    ``None`` when it is off (not MoE, or a coefficient of 0); changes nothing."""
    from plait_models.lookup import base_model_of
    from plait_models.moe import aux_loss_coef

    config = getattr(base_model_of(model), "config", None)
    if family is None or not family.is_moe or config is None or aux_loss_coef(cfg, config) == 0.0:
        return None
    return f"{family.name}: router load-balancing loss added, coefficient {aux_loss_coef(cfg, config)}"


@hookimpl
def patch_model(cfg, model):
    """Training only: an MoE model returns its router logits when the router
    loss is on (set here, with the model, rather than at ``on_train_start``,
    so run-start events only observe)."""
    family = family_of_model(cfg.plugin_manager, model, getattr(cfg, "model_config_type", None))
    request_router_logits(cfg, model, family)


@hookimpl
def extra_loss(cfg, model, outputs, batch):
    """The MoE router load-balancing loss (coefficient applied) for the
    micro-batch, when the forward returned router logits; else ``None``."""
    if not getattr(outputs, "router_logits", None):
        return None
    from plait_models.lookup import base_model_of

    mask = batch.get("attention_mask")
    if mask is not None and getattr(mask, "dim", lambda: 0)() != 2:
        mask = None  # packed rows: every token is real
    return moe_aux_loss(outputs, cfg, base_model_of(model).config, mask)


@hookimpl
def register_commands(subparsers):
    """``plait models``: the support matrix (:mod:`plait_models.support`)."""
    from plait_models.support import add_models_command

    add_models_command(subparsers)


@hookimpl
def tokenizer_loaded(cfg, tokenizer):
    """The family's tokenizer fixes (:func:`apply_family_tokenizer_fixes`),
    before any row is tokenized; silently nothing when the model's type cannot
    be read or no family claims it."""
    import os
    import sys

    model_type = model_type_for_tokenizer(cfg)
    family = find_family(cfg.plugin_manager, model_type) if model_type and cfg.plugin_manager else None
    if family is None:
        return
    fixes = apply_family_tokenizer_fixes(family, tokenizer, cfg)
    if os.environ.get("RANK", "0") == "0":
        for line in fixes.changes:
            print(f"models: {family.name}: {line}", file=sys.stderr, flush=True)


def model_type_for_tokenizer(cfg) -> str | None:
    """``model_type`` of the run's model: the override, ``config.json`` read
    as JSON, else transformers' ``AutoConfig`` (imported only then); ``None``
    when none of them can say."""
    model_type = model_type_of(cfg)
    if model_type:
        return model_type
    try:
        from transformers import AutoConfig

        source = getattr(cfg, "base_model_config", None) or cfg.base_model
        return AutoConfig.from_pretrained(source, trust_remote_code=bool(getattr(cfg, "trust_remote_code", False))
                                          ).model_type
    except Exception:  # noqa: BLE001 - a missing or unreadable config only means no family fixes
        return None

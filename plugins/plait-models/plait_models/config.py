"""The plugin's config keys and the checks that need the model's type.

Checks run in ``validate_config``, before any model is loaded: the model type
comes from ``model_config_type`` or from ``config.json`` of a local
``base_model`` (read as plain JSON, no transformers import).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from pydantic import Field

from plait.config import StrictModel
from plait.errors import ConfigError

log = logging.getLogger("plait.models")


class ModelsConfig(StrictModel):
    """Keys for model families and mixture-of-experts training."""

    model_config_type: Optional[str] = Field(
        None,
        description="The checkpoint's config.model_type (Axolotl key); normally read from the checkpoint. "
        "Set it to pick a family for a checkpoint whose config Plait cannot read before loading.",
    )
    router_aux_loss_coef: Optional[float] = Field(
        None,
        ge=0,
        description="MoE only: weight of the router load-balancing loss added to the training loss. "
        "Default: the model config's value (Mixtral, Qwen MoE: 0.001); 0 turns it off.",
    )
    llama4_linearized_experts: bool = Field(
        False,
        description="Llama 4 only: build the routed experts as one nn.Linear per expert (experts.gate_projs.N, "
        "up_projs.N, down_projs.N) instead of two fused 3-D parameters, so load_in_4bit quantizes them and LoRA "
        "targets them; the checkpoint must store them that way (Axolotl's *-Linearized-* checkpoints). Axolotl key.",
    )
    lora_target_experts: bool = Field(
        False,
        description="MoE only: also put LoRA on the fused expert weights (peft target_parameters). "
        "Off: experts stay frozen under LoRA, and the run log says so.",
    )


LLAMA4_TYPES = ("llama4", "llama4_text")


def check_llama4_linearized(cfg) -> None:
    """``llama4_linearized_experts`` builds Llama 4's experts per expert: the
    model must be a Llama 4 and, where the checkpoint is local, store them so."""
    if not cfg.llama4_linearized_experts:
        return
    model_type = model_type_of(cfg)
    if model_type is not None and model_type not in LLAMA4_TYPES:
        raise ConfigError(f"config key 'llama4_linearized_experts': true applies to Llama 4 models "
                          f"(model types {', '.join(LLAMA4_TYPES)}); this model is {model_type!r}. Remove the key")
    from plait_models.llama4_experts import has_fused_experts

    source = getattr(cfg, "base_model_config", None) or cfg.base_model
    if has_fused_experts(cfg.base_model):
        raise ConfigError(f"config key 'llama4_linearized_experts': true loads a checkpoint whose experts are stored "
                          f"one nn.Linear per expert (experts.gate_projs.N, as Axolotl's *-Linearized-* checkpoints), "
                          f"but base_model {source!r} stores them fused (experts.gate_up_proj); convert it with "
                          "plait_models.llama4_experts.save_linearized_checkpoint(base_model, new_dir), or remove the "
                          "key and adapt the fused experts with lora_target_parameters")


def model_type_of(cfg) -> str | None:
    """``config.model_type`` of the run's model without loading it, or ``None``
    when it cannot be known yet (a hub id without a local copy)."""
    if getattr(cfg, "model_config_type", None):
        return cfg.model_config_type
    source = getattr(cfg, "base_model_config", None) or cfg.base_model
    config_file = Path(source) / "config.json"
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def validate(cfg, family) -> None:
    """Cross-key rules of this plugin; ``family`` is the family of the run's
    model type or ``None`` (unknown, or model type not readable yet)."""
    if cfg.lora_target_experts and cfg.adapter not in ("lora", "qlora"):
        raise ConfigError(
            f"config key 'lora_target_experts': true needs adapter: lora or qlora (adapter is {cfg.adapter!r}); "
            "a full fine-tune already trains every expert weight"
        )
    check_llama4_linearized(cfg)
    if family is None:
        return
    tp = getattr(cfg, "tensor_parallel_size", None)  # plait-parallel's key, when installed
    if tp and tp > 1 and not family.tp_plan:
        raise ConfigError(
            f"config key 'tensor_parallel_size': {tp} is not supported for model type {family.model_types[0]!r} "
            f"(family {family.name}: fused projections cannot be split column/row-wise); accepted: 1. "
            "Shard with fsdp instead."
        )
    if not family.is_moe:
        for key, unset in (("router_aux_loss_coef", None), ("lora_target_experts", False)):
            value = getattr(cfg, key)
            if value != unset:
                raise ConfigError(
                    f"config key {key!r}: {value!r} applies to mixture-of-experts models only; "
                    f"model type {family.model_types[0]!r} (family {family.name}) has no experts. Remove the key."
                )
        return
    if (cfg.adapter in ("lora", "qlora") and not cfg.lora_target_experts and family.expert_parameters
            and not getattr(cfg, "lora_target_parameters", None)):  # plait-peft's key may name the experts
        # not an error: attention-only LoRA on an MoE is a common choice; but never silent
        log.warning(
            "%s: the experts (%s) are fused 3D parameters, not nn.Linear, so LoRA leaves them frozen; "
            "set lora_target_experts: true to adapt them too",
            family.name, ", ".join(family.expert_parameters),
        )


def uses_chat_template(cfg) -> bool:
    """Whether any dataset of the run is rendered with a chat template."""
    entries = [*(getattr(cfg, "datasets", None) or []), *(getattr(cfg, "test_datasets", None) or [])]
    return any(getattr(entry, "type", None) == "chat_template" for entry in entries)


def fill_tokenizer_defaults(cfg, family) -> None:
    """Fill in what users otherwise set by hand, recorded as ``plugin:models``
    in ``plait config explain``, and only when the tokenizer is a local
    directory whose files say it is needed:

    * ``chat_template_jinja``: the family's template when the tokenizer has
      none, the config names none and a dataset is ``type: chat_template``,
      and ``tokens``: the template's markers the vocabulary lacks, so each is
      one id the model can learn to emit (an alpaca or completion run gets
      neither: new tokens would resize the embeddings, and a LoRA adapter
      would then have to carry them, for a template nothing renders);
    * ``special_tokens.pad_token``: the family's dedicated pad token when the
      tokenizer has no pad token, or pads with EOS / an end-of-turn token.
    """
    from plait_models.tokenizer_files import TokenizerFiles

    files = TokenizerFiles(getattr(cfg, "tokenizer_config", None) or cfg.base_model)
    if family is None or not files.is_local:
        return
    if (family.default_chat_template and cfg.chat_template is None and cfg.chat_template_jinja is None
            and uses_chat_template(cfg) and not files.has_chat_template()):
        cfg.set_by_plugin("chat_template_jinja", family.default_chat_template, "models")
        log.info("%s: the tokenizer has no chat template; using the family's default", family.name)
        vocabulary = files.vocabulary()
        missing = [t for t in family.chat_special_tokens if vocabulary is not None and t not in vocabulary
                   and t not in cfg.tokens]
        if missing:
            cfg.set_by_plugin("tokens", [*cfg.tokens, *missing], "models")
    if "pad_token" in cfg.special_tokens:
        return
    reserved = {files.special_token("eos_token"), *family.end_of_turn_tokens}
    if files.special_token("pad_token") not in reserved | {None}:
        return
    vocabulary = files.vocabulary() or set()
    for candidate in family.pad_token_candidates:
        if candidate in vocabulary and candidate not in reserved:
            cfg.set_by_plugin("special_tokens", {**cfg.special_tokens, "pad_token": candidate}, "models")
            log.info("%s: pad token %r (the tokenizer has none, or pads with EOS/end-of-turn)", family.name, candidate)
            return

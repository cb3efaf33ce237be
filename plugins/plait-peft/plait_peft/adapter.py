"""Attach LoRA to a causal LM with peft, as the config says."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from plait.errors import ConfigError

log = logging.getLogger("plait.peft")

#: LoRA shape keys and the ``adapter_config.json`` fields they become; a saved
#: adapter (``lora_model_dir``) brings its own values and these keys are not used
SAVED_SHAPE_KEYS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                    "lora_target_modules": "target_modules", "peft_use_dora": "use_dora",
                    "peft_use_rslora": "use_rslora"}


def linear_targets(cfg, model) -> list[str]:
    """Targets for ``lora_target_linear``: the model family's curated list
    (plait-models), else every ``nn.Linear`` except the output head."""
    import torch

    from plait.families import find_family

    pm = cfg.plugin_manager
    family = find_family(pm, model.config.model_type) if pm is not None else None
    if family is not None and family.lora_target_linear:
        return list(family.lora_target_linear)
    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        # bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear, so QLoRA bases are covered
        if isinstance(module, torch.nn.Linear) and module is not head:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def expert_targets(cfg, model) -> list[str]:
    """peft ``target_parameters`` for ``lora_target_experts: true`` (a plait-models
    key): the family's fused 3D expert weights, which are parameters, not
    ``nn.Linear`` modules, so ``target_modules`` cannot reach them. Empty when
    the key is off; an error when no family names experts for this model, since
    the experts would otherwise stay frozen without a word."""
    from plait.families import find_family

    if not getattr(cfg, "lora_target_experts", False):
        return []
    pm = cfg.plugin_manager
    model_type = model.config.model_type
    family = find_family(pm, model_type) if pm is not None else None
    if family is None or not family.expert_parameters:
        raise ConfigError(f"config key 'lora_target_experts': true, but model type {model_type!r} has no fused "
                          "expert parameters known to a model family (plait-models); set it to false")
    # peft's ParamWrapper (LoRA on a parameter) computes W + BA once, so input dropout and DoRA cannot apply
    for key, value in (("lora_dropout", cfg.lora_dropout), ("peft_use_dora", cfg.peft_use_dora)):
        if value:
            raise ConfigError(f"config key {key!r}: {value!r} cannot be combined with lora_target_experts: true "
                              "(peft adapts fused expert parameters without dropout or DoRA); set it to 0/false")
    names = [name for name, _ in model.named_parameters()]
    missing = [s for s in family.expert_parameters if not any(n.endswith("." + s) for n in names)]
    if missing:
        raise ConfigError(f"config key 'lora_target_experts': the {family.name} expert parameters {missing} "
                          f"are not in this {model_type} model")
    return list(family.expert_parameters)


def target_modules(cfg, model):
    """peft ``target_modules``: a list of names, or a regex string."""
    explicit = cfg.lora_target_modules
    if isinstance(explicit, str):
        try:
            re.compile(explicit)
        except re.error as exc:
            raise ConfigError(f"config key 'lora_target_modules': {explicit!r} is not a valid regex: {exc}") from None
        if cfg.lora_target_linear:
            raise ConfigError("lora_target_modules as a regex cannot be combined with lora_target_linear; "
                              "give a list of names instead")
        return explicit
    targets = list(explicit or [])
    if cfg.lora_target_linear:
        targets += [t for t in linear_targets(cfg, model) if t not in targets]
    module_names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names if n})[:20]
        raise ConfigError(f"config key 'lora_target_modules': {missing} match no module of this "
                          f"{model.config.model_type} model; modules are e.g. {leaves}")
    return targets


def keys_differing_from_saved_adapter(cfg, adapter_dir) -> list[str]:
    """``"key: set (saved value)"`` for each LoRA shape key the user set (not a
    default) that differs from the adapter saved in ``adapter_dir``; empty when
    the directory is not local and readable (a hub id: peft fetches it)."""
    try:
        saved = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return []
    differing = []
    for key, field in SAVED_SHAPE_KEYS.items():
        if cfg.source_of(key) == "default" or field not in saved:
            continue
        given, kept = getattr(cfg, key), saved[field]
        if isinstance(given, (list, tuple)) and isinstance(kept, (list, tuple)):
            same = sorted(given) == sorted(kept)  # peft saves target_modules from a set: any order
        else:
            same = given == kept
        if not same:
            differing.append(f"{key}: {given!r} (saved {kept!r})")
    return differing


def keep_adapter_in_compute_dtype(cfg) -> bool:
    """Adapters stay float32 under autocast, the safe default; with ``bf16: full``
    the user asked for pure bfloat16, so the adapter follows the base."""
    return cfg.bf16 == "full"


def attach_lora(cfg, model):
    """Return ``model`` wrapped as a ``peft.PeftModel`` with trainable LoRA weights."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    from plait.model.loading import is_kbit_prepared

    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    # plait-bnb's loader already prepared the model (frozen base, input grads,
    # checkpointing) *without* peft's fp32 upcast of embeddings, head and norms,
    # which would undo its memory saving (plait.model.loading.mark_kbit_prepared)
    if quantized and not is_kbit_prepared(model):
        # QLoRA training; merge-lora reloads a qlora run's base unquantized and skips this
        # norms to float32 and input grads on, so gradients reach the adapters through the frozen 4-bit base
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if cfg.gradient_checkpointing:
            from plait.model.recompute import enable_gradient_checkpointing

            enable_gradient_checkpointing(model, cfg.gradient_checkpointing, cfg.gradient_checkpointing_kwargs)
    autocast_adapter = not keep_adapter_in_compute_dtype(cfg)
    if cfg.lora_model_dir:
        differing = keys_differing_from_saved_adapter(cfg, cfg.lora_model_dir)
        if differing:
            log.info("lora_model_dir: training continues with the settings saved in %s; these keys you set differ "
                     "from it and are not used: %s", Path(cfg.lora_model_dir) / "adapter_config.json",
                     ", ".join(differing))
        return PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=True,
                                         autocast_adapter_dtype=autocast_adapter)
    lora_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules(cfg, model),
        # fused MoE experts (3D nn.Parameters) are adapted by parameter name, not by module
        target_parameters=expert_targets(cfg, model) or None,
        modules_to_save=cfg.lora_modules_to_save,
        fan_in_fan_out=cfg.lora_fan_in_fan_out,
        layers_to_transform=cfg.peft_layers_to_transform,
        use_dora=cfg.peft_use_dora,
        use_rslora=cfg.peft_use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_config, autocast_adapter_dtype=autocast_adapter)
    if cfg.gradient_checkpointing:
        # checkpointed blocks need an input that requires grad when the embeddings are frozen
        peft_model.enable_input_require_grads()
    return peft_model

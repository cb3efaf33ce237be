"""Attach LoRA to a causal LM with peft, as the config says."""

from __future__ import annotations

import re

from plait.errors import ConfigError


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


#: set by a loader that prepared a k-bit model itself (plait-bnb); the value of
#: ``plait_bnb.quantize.PREPARED_FLAG``, repeated so this plugin does not import plait-bnb
KBIT_PREPARED_FLAG = "_plait_kbit_prepared"


def keep_adapter_in_compute_dtype(cfg) -> bool:
    """Adapters stay float32 under autocast, the safe default; with ``bf16: full``
    the user asked for pure bfloat16, so the adapter follows the base."""
    return cfg.bf16 == "full"


def attach_lora(cfg, model):
    """Return ``model`` wrapped as a ``peft.PeftModel`` with trainable LoRA weights."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    # plait-bnb's loader already prepared the model (frozen base, input grads,
    # checkpointing) *without* peft's fp32 upcast of embeddings, head and norms,
    # which would undo its memory saving (plait_bnb.quantize.PREPARED_FLAG)
    if quantized and not getattr(model, KBIT_PREPARED_FLAG, False):
        # QLoRA training; merge-lora reloads a qlora run's base unquantized and skips this
        # norms to float32 and input grads on, so gradients reach the adapters through the frozen 4-bit base
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(cfg.gradient_checkpointing),
            gradient_checkpointing_kwargs={"use_reentrant": False, **cfg.gradient_checkpointing_kwargs},
        )
    autocast_adapter = not keep_adapter_in_compute_dtype(cfg)
    if cfg.lora_model_dir:
        return PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=True,
                                         autocast_adapter_dtype=autocast_adapter)
    lora_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules(cfg, model),
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

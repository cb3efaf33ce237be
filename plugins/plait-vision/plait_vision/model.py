"""Loading a vision-language model, freezing its vision tower, scoping LoRA.

transformers' image-text-to-text models keep the parts under one inner model
(``model.model``): ``language_model`` (the decoder), a vision tower under one
of a few names, and a projector. The loop needs only the final hidden states
and the LM head (``plait.model.forward``), which these models expose as a
causal LM does (``base_model_prefix`` module, ``get_output_embeddings``).
"""

from __future__ import annotations

import re

#: attribute names transformers gives the vision tower / the projector
VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder", "vision")
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "connector", "merger")


def load_vision_model(cfg, tokenizer):
    """``AutoModelForImageTextToText.from_pretrained`` in the run's dtype and
    attention; quantized through plait-bnb's settings when ``load_in_4bit``/
    ``load_in_8bit`` ask (the vision tower, projector and head stay
    unquantized); the vision tower frozen unless ``freeze_mm_modules: false``."""
    from plait.model.loading import (check_model_sources, fit_to_tokenizer, loading_contexts, pretrained_kwargs,
                                     source_error)
    from transformers import AutoModelForImageTextToText

    check_model_sources(cfg, ("base_model",))
    kwargs = pretrained_kwargs(cfg)
    quantized = bool(getattr(cfg, "load_in_4bit", False) or getattr(cfg, "load_in_8bit", False))
    if quantized:
        kwargs.update(quantized_kwargs(cfg))
    try:
        with loading_contexts(cfg):  # plugins' changes to how the model is built
            model = AutoModelForImageTextToText.from_pretrained(cfg.base_model, **kwargs)
    except OSError as exc:
        raise source_error("base_model", cfg.base_model, "model", exc) from exc
    except ValueError as exc:
        if "Unrecognized configuration" in str(exc) or "Unrecognized model" in str(exc):
            from plait.errors import ConfigError

            raise ConfigError(f"config key 'processor_type' is set but base_model {cfg.base_model!r} is not an "
                              f"image-text-to-text model transformers knows: {' '.join(str(exc).split())[:200]}") \
                from exc
        raise
    fit_to_tokenizer(cfg, model, tokenizer)
    if cfg.freeze_mm_modules is not False:
        freeze(vision_tower(model))
    if quantized:
        from plait_bnb.quantize import prepare_for_kbit_training

        return prepare_for_kbit_training(model, cfg.gradient_checkpointing)
    # gradient_checkpointing is switched on by core's model pipeline (plait.pipeline.setup_model)
    return model


def quantized_kwargs(cfg) -> dict:
    """plait-bnb's quantization config with the vision parts and the head kept
    in the compute dtype (quantizing a small vision tower saves little and
    costs accuracy)."""
    from plait.errors import ConfigError

    try:
        from plait_bnb.quantize import device_map, quantization_config
    except ImportError:
        raise ConfigError("load_in_4bit/load_in_8bit with processor_type need the plait-bnb plugin; "
                          "pip install plait-bnb") from None
    qconfig = quantization_config(cfg)
    if not cfg.bnb_config_kwargs.get("llm_int8_skip_modules"):
        # transformers matches these from the start of a module's name, as regexes
        qconfig.llm_int8_skip_modules = [rf"(?:.*\.)?{name}" for name in (*VISION_TOWER_NAMES, *PROJECTOR_NAMES,
                                                                            "lm_head")]
    return {"quantization_config": qconfig, "device_map": device_map()}


def inner_model(model):
    """The module holding language model, vision tower and projector."""
    prefix = getattr(model, "base_model_prefix", "model")
    return getattr(model, prefix, model)


def vision_tower(model):
    inner = inner_model(model)
    for name in VISION_TOWER_NAMES:
        for owner in (inner, model):
            module = getattr(owner, name, None)
            if module is not None and hasattr(module, "parameters"):
                return module
    return None


def freeze(module) -> None:
    if module is not None:
        for param in module.parameters():
            param.requires_grad_(False)


def language_model_prefix(model) -> str:
    """The dotted name of the language model inside ``model`` (``model.language_model``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        decoder = getattr(inner_model(model), "language_model", None)
    for name, module in model.named_modules():
        if module is decoder and name:
            return name
    from plait.errors import ConfigError

    raise ConfigError(f"cannot find the language model inside {type(model).__name__} to scope LoRA; give "
                      f"lora_target_modules as a regex over module names")


def language_model_regex(model, names: list[str]) -> str:
    """A peft ``target_modules`` regex for leaf ``names`` inside the language
    model only (peft matches a regex against the whole module name)."""
    prefix = language_model_prefix(model)
    leaves = "|".join(re.escape(n) for n in names)
    return rf"{re.escape(prefix)}(\..+)?\.({leaves})"


def attach_vision_lora(cfg, model):
    """plait-peft's LoRA, on the language model only unless ``lora_target_modules``
    is a regex (which may then name projector or vision modules).

    A list of names (and ``lora_target_linear``: every linear layer of the
    language model but the head) becomes a regex anchored at the language
    model, so a vision tower's ``q_proj`` or ``fc1`` is not adapted.
    """
    import torch
    from plait.errors import ConfigError
    from plait_peft.adapter import attach_lora

    if isinstance(cfg.lora_target_modules, str) or cfg.lora_model_dir:
        return attach_lora(cfg, model)
    prefix = language_model_prefix(model)
    language_model = model.get_submodule(prefix)
    linear_leaves = {name.rsplit(".", 1)[-1] for name, module in language_model.named_modules()
                     if isinstance(module, torch.nn.Linear) and name}
    explicit = list(cfg.lora_target_modules or [])
    outside = [n for n in explicit if n not in {name.rsplit(".", 1)[-1] for name, _ in language_model.named_modules()}]
    if outside:
        raise ConfigError(f"config key 'lora_target_modules': {outside} name no module of the language model "
                          f"({prefix}); LoRA names in a list apply to the language model only; to adapt the "
                          f"projector or vision tower give a regex over full module names, e.g. "
                          f"'{prefix}.layers.[0-9]+.self_attn.(q|v)_proj|model.multi_modal_projector.linear_[12]'")
    names = sorted(set(explicit) | (linear_leaves if cfg.lora_target_linear else set()))
    if not names:
        raise ConfigError("adapter: lora needs lora_target_modules (names or a regex) or lora_target_linear: true")
    scoped = cfg.model_copy(update={"lora_target_modules": language_model_regex(model, names),
                                    "lora_target_linear": False})
    return attach_lora(scoped, model)

"""Core's default tokenizer and model loading (any Hugging Face causal LM)."""

from __future__ import annotations

from plait.chat_templates import NAMED_CHAT_TEMPLATES, check_chat_template_names, resolve_chat_template
from plait.hookspecs import hookimpl
from plait.model.loading import (causal_decoder_kwargs, causal_lm_class_of, check_model_sources, fit_to_tokenizer,
                                 looks_like_path, pretrained_kwargs, source_error)


@hookimpl
def chat_templates():
    return dict(NAMED_CHAT_TEMPLATES)


@hookimpl
def validate_config(cfg):
    check_chat_template_names(cfg)
    check_mistral_common(cfg)
    check_unfrozen_parameters(cfg)
    check_transformers_kernels(cfg)
    check_generation_keys(cfg)
    check_load_options(cfg)
    check_ray(cfg)
    from plait.model.random_init import check_reinit_weights

    check_reinit_weights(cfg)
    from plait.model.loading import check_config_class

    check_config_class(cfg)
    from plait.config.batch_size_keys import check_auto_find_batch_size

    check_auto_find_batch_size(cfg)


def check_ray(cfg) -> None:
    from plait.config.ray_keys import check_ray_launch

    check_ray_launch(cfg)


def check_generation_keys(cfg) -> None:
    from plait.config.generation_keys import check_generation_keys as check, check_sample_keys

    check(cfg)
    check_sample_keys(cfg)


def check_transformers_kernels(cfg) -> None:
    from plait.model.transformers_kernels import (check_attention_kernel, check_experts_implementation,
                                                  check_use_kernels)

    check_experts_implementation(cfg)
    check_use_kernels(cfg)
    check_attention_kernel(cfg)


def check_load_options(cfg) -> None:
    from plait.model.load_options import check_placement_keys, check_quantization_keys

    check_quantization_keys(cfg)
    check_placement_keys(cfg)


@hookimpl(trylast=True)
def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    key = "tokenizer_config" if cfg.tokenizer_config else "base_model"
    source = cfg.tokenizer_config or cfg.base_model
    check_model_sources(cfg, (key,))
    # the model's revision applies to its own tokenizer, not to a separate tokenizer_config
    revision = cfg.revision_of_model if key == "base_model" else None
    try:
        if cfg.tokenizer_use_mistral_common:
            check_mistral_common()
            from transformers.tokenization_mistral_common import MistralCommonBackend

            tokenizer = MistralCommonBackend.from_pretrained(source, revision=revision)
        else:
            # tokenizer_legacy as Axolotl passes it: transformers hands it to the class (Llama, T5 read it when
            # they build from a SentencePiece model; a class without the argument keeps it unused in init_kwargs)
            legacy = {} if cfg.tokenizer_legacy is None else {"legacy": cfg.tokenizer_legacy}
            tokenizer = AutoTokenizer.from_pretrained(
                source, use_fast=cfg.tokenizer_use_fast, trust_remote_code=cfg.trust_remote_code, revision=revision,
                **legacy)
    except (OSError, ValueError) as exc:  # missing files, no network, a folder without a tokenizer
        raise source_error(key, source, "tokenizer", exc) from exc
    if cfg.added_tokens_overrides:
        from plait.model.added_tokens import override_added_tokens

        override_added_tokens(tokenizer, cfg.added_tokens_overrides)  # before tokens are added, as in Axolotl
    if cfg.special_tokens:
        tokenizer.add_special_tokens(dict(cfg.special_tokens))
    if cfg.tokens:
        tokenizer.add_tokens(list(cfg.tokens))
    if tokenizer.pad_token is None:
        # a pad token is needed to batch; the EOS is safe because padded labels are -100
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    template = resolve_chat_template(cfg, tokenizer)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def check_mistral_common(cfg=None) -> None:
    """``tokenizer_use_mistral_common`` needs the mistral-common package (a fact of this machine)."""
    import importlib.util

    from plait.errors import MachineFactError

    if (cfg is None or cfg.tokenizer_use_mistral_common) and importlib.util.find_spec("mistral_common") is None:
        raise MachineFactError("config key 'tokenizer_use_mistral_common': true needs the mistral-common package, "
                               "which is not installed here; pip install mistral-common, or set it to false to use "
                               "the model's Hugging Face tokenizer")


def check_unfrozen_parameters(cfg) -> None:
    from plait.errors import ConfigError
    from plait.model.unfreeze import check_patterns

    check_patterns(cfg.unfrozen_parameters)
    if cfg.unfrozen_parameters and cfg.adapter:
        from plait.model.unfreeze import ADAPTED_PREFIX, can_match_adapted_names

        if not any(can_match_adapted_names(pattern) for pattern in cfg.unfrozen_parameters):
            raise ConfigError(
                f"config key 'unfrozen_parameters': {cfg.unfrozen_parameters} cannot match a parameter of the adapted "
                f"model: with adapter: {cfg.adapter} the patterns are applied, as in Axolotl, after the adapter is "
                f"attached, to names that start with {ADAPTED_PREFIX!r}, and every parameter they miss is frozen, "
                f"the adapter's included (Axolotl warns 'All parameters are frozen' and trains nothing). Remove "
                f"unfrozen_parameters to train the adapter, or give patterns of adapter parameters "
                f"(Axolotl's patterns match at the start of the name, a dot being a literal dot and .+ any text: "
                f"'base_model.model.model.layers.1[0-9].+lora_' trains the LoRA weights of layers 10-19 only)")
        cfg.add_note(f"unfrozen_parameters with adapter: {cfg.adapter}: as in Axolotl, the patterns choose among the "
                     f"adapted model's parameters ({ADAPTED_PREFIX}..., the adapter's lora_A/lora_B included); "
                     f"everything they miss is frozen")


@hookimpl(trylast=True)
def load_model(cfg, tokenizer):
    import os

    check_model_sources(cfg, ("base_model",))
    from plait.model.choice import load_with_supported_attention

    kwargs = pretrained_kwargs(cfg)
    kwargs.pop("attn_implementation")
    kwargs.update(causal_decoder_kwargs(cfg, kwargs))
    # AutoModelForCausalLM, or the class a text-only checkpoint of a composite model names (Emu3, Mllama)
    model_class = causal_lm_class_of(cfg)
    if cfg.reinit_weights:
        from plait.model.random_init import build_randomly_initialised

        load = lambda **attn: build_randomly_initialised(cfg, model_class, kwargs, **attn)  # noqa: E731
    else:
        load = lambda **attn: model_class.from_pretrained(cfg.base_model, **kwargs, **attn)  # noqa: E731
    try:
        # a backend the architecture does not implement falls back to one it does (SDPA, then eager)
        model = load_with_supported_attention(cfg, load)
    except OSError as exc:  # missing config.json or weights, no network
        raise source_error("base_model", cfg.base_model, "model", exc) from exc
    except ValueError as exc:  # a folder whose config.json names no model type transformers knows
        no_config = looks_like_path(cfg.base_model) and not os.path.isfile(os.path.join(cfg.base_model, "config.json"))
        # "Unrecognized configuration class": the checkpoint's config has no causal-LM class in transformers
        if no_config or "Unrecognized model" in str(exc) or "Unrecognized configuration class" in str(exc):
            raise source_error("base_model", cfg.base_model, "model", exc) from exc
        raise  # a setting's problem (attn_implementation, say): transformers' own message is the clearer one
    fit_to_tokenizer(cfg, model, tokenizer)
    return model


@hookimpl(trylast=True)
def gradient_checkpointing_mode(cfg):
    """The config's ``gradient_checkpointing`` (applied by plait.pipeline.setup_model)."""
    return cfg.gradient_checkpointing


@hookimpl(trylast=True)
def patch_model(cfg, model):
    """``tiled_mlp``: tile each decoder layer's MLP (:mod:`plait.model.tiled_mlp`).
    Last of the ``patch_model`` calls, so it tiles whatever MLP a kernel plugin
    put in place."""
    if not cfg.tiled_mlp:
        return None
    from plait.errors import ConfigError
    from plait.model.tiled_mlp import tile_mlps

    family = None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if cfg.plugin_manager is not None and model_type:
        from plait.families import find_family

        family = find_family(cfg.plugin_manager, model_type)
    try:
        report = tile_mlps(model, cfg.tiled_mlp_num_shards, cfg.tiled_mlp_use_original_mlp,
                           family.decoder_layer_class if family else None)
    except ValueError as exc:
        raise ConfigError(f"config key 'tiled_mlp_use_original_mlp': false runs the llama MLP layout, and {exc}; "
                          f"set tiled_mlp_use_original_mlp: true") from None
    if not report:
        raise ConfigError(f"config key 'tiled_mlp': no decoder layer with an MLP found in "
                          f"{type(model).__name__}; remove tiled_mlp for this model")
    return report

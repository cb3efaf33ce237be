"""Core's default tokenizer and model loading (any Hugging Face causal LM)."""

from __future__ import annotations

from plait.chat_templates import NAMED_CHAT_TEMPLATES, check_chat_template_names, resolve_chat_template
from plait.hookspecs import hookimpl
from plait.model.loading import (check_model_sources, fit_to_tokenizer, looks_like_path, pretrained_kwargs,
                                 source_error)


@hookimpl
def chat_templates():
    return dict(NAMED_CHAT_TEMPLATES)


@hookimpl
def validate_config(cfg):
    check_chat_template_names(cfg)


@hookimpl(trylast=True)
def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    key = "tokenizer_config" if cfg.tokenizer_config else "base_model"
    source = cfg.tokenizer_config or cfg.base_model
    check_model_sources(cfg, (key,))
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, use_fast=cfg.tokenizer_use_fast, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:  # missing files, no network, a folder without a tokenizer
        raise source_error(key, source, "tokenizer", exc) from exc
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


@hookimpl(trylast=True)
def load_model(cfg, tokenizer):
    import os

    from transformers import AutoModelForCausalLM

    check_model_sources(cfg, ("base_model",))
    from plait.model.choice import load_with_supported_attention

    kwargs = pretrained_kwargs(cfg)
    kwargs.pop("attn_implementation")
    try:
        # a backend the architecture does not implement falls back to one it does (SDPA, then eager)
        model = load_with_supported_attention(
            cfg, lambda **attn: AutoModelForCausalLM.from_pretrained(cfg.base_model, **kwargs, **attn))
    except OSError as exc:  # missing config.json or weights, no network
        raise source_error("base_model", cfg.base_model, "model", exc) from exc
    except ValueError as exc:  # a folder whose config.json names no model type transformers knows
        no_config = looks_like_path(cfg.base_model) and not os.path.isfile(os.path.join(cfg.base_model, "config.json"))
        # "Unrecognized configuration class": the checkpoint's config has no causal-LM class in transformers
        if no_config or "Unrecognized model" in str(exc) or "Unrecognized configuration class" in str(exc):
            raise source_error("base_model", cfg.base_model, "model", exc) from exc
        raise  # a setting's problem (attn_implementation, say): transformers' own message is the clearer one
    fit_to_tokenizer(cfg, model, tokenizer)
    if cfg.gradient_checkpointing:
        from plait.model.recompute import enable_gradient_checkpointing

        enable_gradient_checkpointing(model, cfg.gradient_checkpointing, cfg.gradient_checkpointing_kwargs)
    return model

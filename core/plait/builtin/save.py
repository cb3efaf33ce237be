"""Core's final save: Hugging Face format, safetensors, with the tokenizer."""

from __future__ import annotations

from plait.hookspecs import hookimpl


@hookimpl(trylast=True)
def save_model(cfg, model, tokenizer, path):
    # a peft model writes only its adapter here; a plain model its full weights
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path

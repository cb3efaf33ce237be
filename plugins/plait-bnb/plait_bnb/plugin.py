"""Hookimpls of plait-bnb (entry point ``bnb``).

* ``config_schema``: the quantization keys (:class:`plait_bnb.config.BnbKeys`).
* ``configure``: picks the 4-bit storage dtype for FSDP when none is given.
* ``validate_config``: 4-bit without qlora, 4-bit with 8-bit, qlora without
  4-bit, stray ``bnb_4bit_*`` keys, bad ``bnb_config_kwargs``, FSDP with
  8-bit or uint8 4-bit storage.
* ``load_model``: answers only when ``load_in_4bit``/``load_in_8bit`` is set.
* ``optimizers``: adamw_bnb_8bit, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit
  (built here) and transformers' other bitsandbytes names (lion_8bit,
  ademamix, rmsprop_bnb, ...), built through transformers.
"""

from __future__ import annotations

from plait.hookspecs import hookimpl


@hookimpl
def config_schema():
    from plait_bnb.config import BnbKeys

    return BnbKeys


@hookimpl
def configure(cfg):
    from plait_bnb.config import configure

    configure(cfg)


@hookimpl
def validate_config(cfg):
    from plait_bnb.config import validate

    validate(cfg)


@hookimpl
def load_model(cfg, tokenizer):
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    from plait_bnb.quantize import load_quantized_model

    return load_quantized_model(cfg, tokenizer)


@hookimpl
def optimizers():
    from plait_bnb.optim import optimizers

    return optimizers()

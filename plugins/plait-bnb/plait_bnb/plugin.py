"""Hookimpls of plait-bnb (entry point ``bnb``).

* ``config_schema``: the quantization keys (:class:`plait_bnb.config.BnbKeys`).
* ``validate_config``: 4-bit without qlora, 4-bit with 8-bit, qlora without
  4-bit, stray ``bnb_4bit_*`` keys, bad ``bnb_config_kwargs``/``optim_args``,
  FSDP with 8-bit or uint8 4-bit storage (and picks the storage dtype for FSDP).
* ``load_model``: answers only when ``load_in_4bit``/``load_in_8bit`` is set.
* ``build_optimizer``: adamw_bnb_8bit, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit
  (``optimizer_names`` lists them for the unknown-name error).
"""

from __future__ import annotations

from plait.hookspecs import hookimpl


@hookimpl
def config_schema():
    from plait_bnb.config import BnbKeys

    return BnbKeys


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
def build_optimizer(cfg, params):
    from plait_bnb.optim import build

    return build(cfg, params)


@hookimpl
def optimizer_names():
    from plait_bnb.config import OPTIMIZERS

    return list(OPTIMIZERS)

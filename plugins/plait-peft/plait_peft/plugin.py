"""Hookimpls of plait-peft (entry point ``peft``).

* ``config_schema``: the LoRA keys (:class:`plait_peft.config.PeftKeys`).
* ``validate_config``: LoRA keys without ``adapter`` (a note: ignored, every weight trains, as in Axolotl),
  an adapter without targets, qlora without 4-bit.
* ``load_adapter``: wraps the model with peft when ``adapter`` is ``lora`` or ``qlora``.
* ``parameter_learning_rates``: LoRA+ (``loraplus_lr_ratio``, ``loraplus_lr_embedding``).
"""

from __future__ import annotations

from plait.hookspecs import hookimpl


@hookimpl
def config_schema():
    from plait_peft.config import PeftKeys

    return PeftKeys


@hookimpl
def validate_config(cfg):
    from plait_peft.config import validate

    validate(cfg)


@hookimpl
def load_adapter(cfg, model):
    if cfg.adapter not in ("lora", "qlora"):
        return None
    from plait_peft.adapter import attach_lora

    return attach_lora(cfg, model)


@hookimpl
def parameter_learning_rates(cfg, model):
    if cfg.adapter not in ("lora", "qlora") or cfg.loraplus_lr_ratio is None:
        return None
    from plait_peft.loraplus import loraplus_learning_rates

    return loraplus_learning_rates(cfg, model)

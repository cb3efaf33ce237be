"""Hookimpls of plait-qat (entry point ``qat``).

* ``config_schema``: the ``qat:`` block (:class:`plait_qat.config.QatKeys`).
* ``validate_config``: the weight / activation pair, the group size, torchao
  installed and able to run the layout here (a machine fact).
* ``patch_model``: fake-quantizes the linear layers (after adapters are
  attached: peft's LoRA matrices stay in full precision, their base layers are
  fake-quantized), training only.
* ``on_train_start``: with ``fake_quant_after_n_steps``, keeps fake
  quantization off until that many optimizer steps are done.
* ``on_train_end``: converts the fake-quantized layers back to plain ones.
"""

from __future__ import annotations

from plait.hookspecs import hookimpl


@hookimpl
def config_schema():
    from plait_qat.config import QatKeys

    return QatKeys


@hookimpl
def validate_config(cfg):
    from plait_qat.config import validate

    validate(cfg)


@hookimpl
def patch_model(cfg, model):
    if getattr(cfg, "qat", None) is None:
        return None
    from plait_qat.fake_quant import prepare

    return prepare(model, cfg.qat)


@hookimpl
def on_train_start(run):
    qat = getattr(run.cfg, "qat", None)
    if qat is None or not qat.fake_quant_after_n_steps:
        return
    from plait_qat.fake_quant import start_after

    # the switch reads the run's step before every forward: every rank agrees, and a resumed run starts right
    start_after(run.model, qat.fake_quant_after_n_steps, lambda: run.step)


@hookimpl
def on_train_end(run):
    qat = getattr(run.cfg, "qat", None)
    if qat is None:
        return
    from plait_qat.fake_quant import convert

    # the files are already plain weights (fake quantizers hold no state); the in-memory model becomes plain too
    convert(run.model, qat)

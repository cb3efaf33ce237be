"""Hookimpls of plait-qat (entry point ``qat``).

* ``config_schema``: the ``qat:`` and ``quantization:`` blocks (:class:`plait_qat.config.QatKeys`).
* ``validate_config``: the weight / activation pairs, the group size, torchao
  installed and able to run the layout here (a machine fact).
* ``patch_model``: fake-quantizes the linear layers (after adapters are
  attached: peft's LoRA matrices stay in full precision, their base layers are
  fake-quantized), training only.
* ``install_step_hooks``: with ``fake_quant_after_n_steps``, keeps fake
  quantization off until that many optimizer steps are done.
* ``on_train_start``: says that a ``quantization:`` block waits for ``plait quantize``.
* ``on_train_end``: converts the fake-quantized layers back to plain ones.
* ``register_commands``: ``plait quantize``, post-training quantization of the
  trained model (the ``quantization:`` or ``qat:`` block).
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
def install_step_hooks(cfg, model, optimizer, step_of):
    qat = getattr(cfg, "qat", None)
    if qat is None or not qat.fake_quant_after_n_steps:
        return None
    from plait_qat.fake_quant import start_after

    # the switch reads the run's step before every forward: every rank agrees, and a resumed run starts right
    return [start_after(model, qat.fake_quant_after_n_steps, step_of)]


@hookimpl
def on_train_start(run):
    if getattr(run.cfg, "quantization", None) is not None and getattr(run, "is_main", True):
        import sys

        # Axolotl's meaning: the block is read by the quantize command, after training
        print("qat: the quantization: block is applied by `plait quantize` after training, not during it",
              file=sys.stderr, flush=True)


@hookimpl
def on_train_end(run):
    qat = getattr(run.cfg, "qat", None)
    if qat is None:
        return
    from plait_qat.fake_quant import convert

    # the files are already plain weights (fake quantizers hold no state); the in-memory model becomes plain too
    convert(run.model, qat)


@hookimpl
def register_commands(subparsers):
    from plait_qat.commands import add_quantize

    add_quantize(subparsers)

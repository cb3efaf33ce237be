"""Hookimpls of plait-sparse (entry point ``sparse``).

* ``config_schema``: the ``llmcompressor:`` block (:class:`plait_sparse.recipe.SparseKeys`).
* ``validate_config``: the recipe (only ConstantPruningModifier, its targets,
  start and end) and a full fine-tune (no adapter).
* ``install_step_hooks``: finds the targeted parameters and hangs a
  :class:`plait_sparse.masks.SparsityKeeper` on the optimizer, on every rank
  (the loop takes its hooks off when training ends).
* ``on_train_start``: says what is kept sparse, on the main rank.

``save_compressed: true`` changes nothing in the files: compressed-tensors
dropped its sparse formats after 0.14 (its ``ModelCompressor`` writes a
model that is sparse but not quantized as plain dense safetensors, with no
``quantization_config``), so the normal save is that format, zeros included;
``on_train_start`` says so.
"""

from __future__ import annotations

import sys

from plait.hookspecs import hookimpl


@hookimpl
def config_schema():
    from plait_sparse.recipe import SparseKeys

    return SparseKeys


@hookimpl
def validate_config(cfg):
    block = getattr(cfg, "llmcompressor", None)
    if block is None:
        return
    from plait.errors import ConfigError
    from plait_sparse.recipe import parse_recipe

    parse_recipe(block.recipe)
    if getattr(cfg, "adapter", None):
        raise ConfigError(f"config key 'llmcompressor': sparse fine-tuning keeps the zeros of fully trained weights; "
                          f"with adapter: {cfg.adapter} the base weights are frozen and a merged low-rank update is "
                          f"dense. Remove adapter (a full fine-tune), or remove llmcompressor")


@hookimpl
def install_step_hooks(cfg, model, optimizer, step_of):
    block = getattr(cfg, "llmcompressor", None)
    if block is None:
        return None
    from plait_sparse.masks import SparsityKeeper, targeted_parameters
    from plait_sparse.recipe import parse_recipe

    handles = []
    for modifier in parse_recipe(block.recipe):
        keeper = SparsityKeeper(targeted_parameters(model, modifier), modifier, step_of)
        handles += keeper.attach(optimizer)
    return handles


@hookimpl
def on_train_start(run):
    block = getattr(run.cfg, "llmcompressor", None)
    if block is None or not run.is_main:
        return
    from plait_sparse.masks import SparsityKeeper, targeted_parameters
    from plait_sparse.recipe import parse_recipe

    # after a resume the weights are the checkpoint's: the share of zeros is the one training goes on from
    for modifier in parse_recipe(block.recipe):
        keeper = SparsityKeeper(targeted_parameters(run.model, modifier), modifier, lambda: run.step)
        ends = f"until step {modifier.end}" if modifier.end is not None else "to the end"
        print(f"llmcompressor: {len(keeper.params)} parameters keep their zero entries from step "
              f"{modifier.start} {ends} ({keeper.sparsity():.1%} of their entries are zero now)",
              file=sys.stderr, flush=True)
    if block.save_compressed:
        print("llmcompressor: save_compressed: the model is saved as plain safetensors with its zeros, which is what "
              "compressed-tensors writes for a sparse model without quantization (it has no sparse format after "
              "0.14); transformers and vLLM load it as is", file=sys.stderr, flush=True)


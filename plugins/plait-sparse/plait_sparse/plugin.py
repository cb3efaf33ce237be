"""Hookimpls of plait-sparse (entry point ``sparse``).

* ``config_schema``: the ``llmcompressor:`` block (:class:`plait_sparse.recipe.SparseKeys`).
* ``validate_config``: the recipe (only ConstantPruningModifier, its targets,
  start and end) and a full fine-tune (no adapter).
* ``on_train_start``: finds the targeted parameters and hangs a
  :class:`plait_sparse.masks.SparsityKeeper` on the optimizer, on every rank.
* ``on_train_end``: takes it off again.

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
def on_train_start(run):
    block = getattr(run.cfg, "llmcompressor", None)
    if block is None:
        return
    from plait_sparse.masks import SparsityKeeper, targeted_parameters
    from plait_sparse.recipe import parse_recipe

    keepers = []
    for modifier in parse_recipe(block.recipe):
        keeper = SparsityKeeper(targeted_parameters(run.model, modifier), modifier, lambda: run.step)
        keeper.attach(run.optimizer)
        keepers.append(keeper)
        if run.is_main:
            ends = f"until step {modifier.end}" if modifier.end is not None else "to the end"
            print(f"llmcompressor: {len(keeper.params)} parameters keep their zero entries from step "
                  f"{modifier.start} {ends} ({keeper.sparsity():.1%} of their entries are zero now)",
                  file=sys.stderr, flush=True)
    run.extras["sparsity_keepers"] = keepers
    if block.save_compressed and run.is_main:
        print("llmcompressor: save_compressed: the model is saved as plain safetensors with its zeros, which is what "
              "compressed-tensors writes for a sparse model without quantization (it has no sparse format after "
              "0.14); transformers and vLLM load it as is", file=sys.stderr, flush=True)


@hookimpl
def on_train_end(run):
    for keeper in run.extras.pop("sparsity_keepers", []):
        keeper.detach()


"""LISA (lisa_n_layers, lisa_step_interval, lisa_layers_attribute): only the
chosen decoder layers train, re-chosen every interval from seed and step, and
a resumed run continues bit for bit."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from plait import hookimpl
from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model
from plait.train.lisa import chosen_layers

# the loop tests' fused AdamW (pytest's importlib mode does not put tests/ on sys.path)
sys.path.insert(0, str(Path(__file__).parent))
from test_train_loop import FusedAdamW  # noqa: E402

N_LAYERS = 4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("lisa") / "model", num_hidden_layers=N_LAYERS)


def _rows(n: int):
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": list(range(10 + i, 22 + i)), "labels": list(range(10 + i, 22 + i)),
                               "attention_mask": [1] * 12, "length": 12} for i in range(n)])


class ChangedLayers:
    """After every step: which decoder layers' weights changed, and whether
    the parameters outside the layers did."""

    def __init__(self):
        self.layers_per_step, self.others_changed = [], []

    def _snapshot(self, model):
        return {name: param.detach().clone() for name, param in model.named_parameters()}

    @hookimpl
    def on_train_start(self, run):
        self.before = self._snapshot(run.model)

    @hookimpl
    def on_step_end(self, run, metrics):
        now = self._snapshot(run.model)
        changed = {name for name in now if not torch.equal(now[name], self.before[name])}
        self.layers_per_step.append(sorted({int(name.split(".")[2]) for name in changed
                                            if name.startswith("model.layers.")}))
        self.others_changed.append({"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= changed)
        self.before = now


def _keys(model, out, **extra):
    return {"base_model": str(model), "output_dir": str(out), "max_steps": 5, "micro_batch_size": 2,
            "learning_rate": 1e-3, "lisa_n_layers": 1, "lisa_step_interval": 2, "seed": 7, **extra}


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused-read-late"])
def test_only_the_chosen_layers_train_and_a_resumed_run_matches_bitwise(tiny_model, tmp_path, fused):
    """Each step changes exactly the layers chosen for its period (and the
    embeddings, head and final norm); resuming from step 3 (mid-period: its
    layers were chosen at step 2; the next period's layer never trained
    before, so it has no optimizer state) ends with the same weights. With
    fused AdamW the loop reads each step during the next one
    (defer_step_read): on_step_end still sees the weights the step left."""
    from plait.train.loop import reads_step_late, train

    recorder = ChangedLayers()
    optimizer = [FusedAdamW()] if fused else []
    cfg, pm = build_run_config(_keys(tiny_model, tmp_path / "whole", save_steps=3), plugins=[recorder, *optimizer])
    reference = train(cfg, pm, data=SimpleNamespace(train=_rows(16), eval=None))
    expected = [chosen_layers(7, step // 2, N_LAYERS, 1) for step in range(5)]
    assert recorder.layers_per_step == expected
    assert all(recorder.others_changed)
    assert len({tuple(layers) for layers in expected}) > 1  # seed 7 moves the choice, so switching is exercised

    assert reads_step_late(reference) is fused
    cfg, pm = build_run_config(_keys(tiny_model, tmp_path / "resumed",
                                     resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3")),
                               plugins=optimizer)
    resumed = train(cfg, pm, data=SimpleNamespace(train=_rows(16), eval=None))
    ours, theirs = dict(resumed.model.named_parameters()), dict(reference.model.named_parameters())
    assert [name for name in theirs if not torch.equal(ours[name], theirs[name])] == []


def test_lisa_keys_are_checked(tiny_model, tmp_path):
    from plait.train.loop import train

    with pytest.raises(ConfigError, match="'lisa_n_layers' turns LISA on together with 'lisa_step_interval'"):
        build_run_config({"base_model": str(tiny_model), "lisa_n_layers": 2})
    with pytest.raises(ConfigError, match="'lisa_layers_attribute': 'model.blocks' tells LISA"):
        build_run_config({"base_model": str(tiny_model), "lisa_layers_attribute": "model.blocks"})
    build_run_config({"base_model": str(tiny_model), "lisa_layers_attribute": "model.layers"})  # Axolotl's default
    with pytest.raises(ConfigError, match="adapter is 'lora'"):
        build_run_config({"base_model": str(tiny_model), "lisa_n_layers": 2, "lisa_step_interval": 5,
                          "adapter": "lora", "lora_target_linear": True})
    for extra, message in (({"lisa_n_layers": 9}, "more than the 4 layers"),
                           ({"lisa_layers_attribute": "model.blocks"}, "not an attribute path of LlamaForCausalLM")):
        cfg, pm = build_run_config(_keys(tiny_model, tmp_path / "bad", **extra))
        with pytest.raises(ConfigError, match=message):
            train(cfg, pm, data=SimpleNamespace(train=_rows(4), eval=None))

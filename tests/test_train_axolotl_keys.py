"""Axolotl keys that change what the loop does: loss_watchdog_patience,
early_stopping_patience, unfrozen_parameters, model_config, revision_of_model."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from plait.errors import ConfigError, TrainingError
from plait.testing import build_run_config, make_tiny_model

# the loop tests' fused optimizer and comparisons (pytest's importlib mode does not put tests/ on sys.path)
sys.path.insert(0, str(Path(__file__).parent))
from test_train_loop import FusedAdamW, StepOrder, assert_bitwise_equal, deferred_and_eager, state_of  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("axolotl_keys") / "model")


def _rows(n: int, *, descending: bool = False, seed: int = 0):
    """Runs of consecutive ids (a pattern a tiny model learns in a few steps), or
    the same runs read backwards (which that learning makes less likely)."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randint(10, 40)
        ids = list(range(start, start + 12))
        ids = ids[::-1] if descending else ids
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:], "attention_mask": [1] * 12, "length": 12})
    return Dataset.from_list(rows)


def _train(keys: dict, data, plugins=()):
    from plait.train.loop import train

    cfg, pm = build_run_config(keys, plugins=plugins)
    return train(cfg, pm, data=data)


def _steps_logged(output_dir) -> list[int]:
    import json

    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


@pytest.mark.parametrize("patience, stop_step", [(2, 2), (None, 3)])
def test_loss_watchdog_waits_patience_steps_in_a_row(tiny_model, tmp_path, patience, stop_step):
    """Every step's loss is over the threshold: the run stops on the
    patience-th one (3 when unset, as in Axolotl), the earlier ones trained."""
    keys = {"base_model": str(tiny_model), "output_dir": str(tmp_path), "max_steps": 6, "micro_batch_size": 2,
            "loss_watchdog_threshold": 0.01, "learning_rate": 1e-3}
    if patience:
        keys["loss_watchdog_patience"] = patience
    with pytest.raises(TrainingError, match=rf"at step {stop_step}; the weights were not updated") as info:
        _train(keys, SimpleNamespace(train=_rows(16), eval=None))
    assert f"({patience or 3} steps in a row, loss_watchdog_patience)" in str(info.value)


def test_loss_watchdog_read_one_step_late_stops_as_the_eager_read(tiny_model, tmp_path):
    """defer_step_read (fused AdamW): steps 3 and 4 have a loss 100 over the
    rest; with threshold 50 and patience 2, step 3 trains (a warning) and step
    4 stops the run, which had run step 5's backward before reading step 4:
    the error and the weights and Adam state are the eager read's, which are
    those of three plain steps (the added constant has no gradient)."""
    keys = {"base_model": str(tiny_model), "output_dir": str(tmp_path / "watchdog"), "max_steps": 6,
            "micro_batch_size": 2, "learning_rate": 1e-3, "lr_scheduler": "constant",
            "loss_watchdog_threshold": 50.0, "loss_watchdog_patience": 2}
    rows = SimpleNamespace(train=_rows(16), eval=None)
    results = deferred_and_eager(keys, rows, terms={3: 100.0, 4: 100.0}, expect=TrainingError)
    (late, late_error), (eager, eager_error) = results[True], results[False]
    assert str(late_error) == str(eager_error)
    assert "at step 4; the weights were not updated" in str(late_error) and "(2 steps in a row" in str(late_error)
    assert late.forwards == 5 and eager.forwards == 4
    three = StepOrder()
    _train({**keys, "output_dir": str(tmp_path / "three"), "max_steps": 3, "loss_watchdog_threshold": None},
           rows, plugins=[FusedAdamW(), three])
    for order in (late, eager):
        assert_bitwise_equal(state_of(order.run)[0], state_of(three.run)[0])
        assert_bitwise_equal(state_of(order.run)[1], state_of(three.run)[1])


def test_early_stopping_stops_when_eval_loss_stops_improving(tiny_model, tmp_path):
    """Training on ascending runs makes the descending eval runs less likely:
    the eval loss stops improving and the run ends before max_steps."""
    run = _train({"base_model": str(tiny_model), "output_dir": str(tmp_path), "max_steps": 30,
                  "micro_batch_size": 4, "learning_rate": 3e-3, "lr_scheduler": "constant", "eval_steps": 1,
                  "val_set_size": 0.1,  # the eval rows are given below; the key says there are some
                  "early_stopping_patience": 2},
                 SimpleNamespace(train=_rows(64), eval=_rows(8, descending=True, seed=1)))
    evals = [r["eval_loss"] for r in run.metrics_log.read() if "eval_loss" in r]
    assert run.step < 30 and len(evals) == run.step
    best_before = min(evals[:-2])
    assert all(loss >= best_before for loss in evals[-2:]), evals  # the last two did not improve on the best


def test_unfrozen_parameters_train_only_the_matching_weights(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    run = _train({"base_model": str(tiny_model), "output_dir": str(tmp_path), "max_steps": 2,
                  "learning_rate": 1e-2, "unfrozen_parameters": ["^lm_head.weight$", "model.layers.1.mlp.down_proj"]},
                 SimpleNamespace(train=_rows(8), eval=None))
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters())
    changed = {name for name, param in run.model.named_parameters() if not torch.equal(param.detach(), base[name])}
    assert changed == {"lm_head.weight", "model.layers.1.mlp.down_proj.weight"}
    with pytest.raises(ConfigError, match="match no parameter of the model"):
        _train({"base_model": str(tiny_model), "output_dir": str(tmp_path / "none"), "max_steps": 1,
                "unfrozen_parameters": ["^no_such_module"]}, SimpleNamespace(train=_rows(4), eval=None))


@pytest.mark.slow  # ~11 s: two LoRA runs
def test_unfrozen_parameters_with_an_adapter_choose_among_the_adapted_model_parameters(tiny_model, tmp_path):
    """As in Axolotl: applied after the adapter is attached, to peft's names; what they miss is frozen."""
    lora = {"base_model": str(tiny_model), "adapter": "lora", "lora_target_linear": True, "lora_r": 4,
            "lora_alpha": 8, "max_steps": 2, "learning_rate": 1e-2}
    run = _train({**lora, "output_dir": str(tmp_path / "one"), "unfrozen_parameters": ["base_model.model.model.layers.1.+lora_"]},
                 SimpleNamespace(train=_rows(8), eval=None))
    lora_b = {name: param for name, param in run.model.named_parameters() if "lora_B" in name}
    assert lora_b and all(name.startswith("base_model.model.") for name in lora_b)
    moved = {name for name, param in lora_b.items() if param.detach().abs().sum() > 0}  # lora_B starts at zero
    assert moved == {name for name in lora_b if ".layers.1." in name}
    assert not any(param.requires_grad for name, param in run.model.named_parameters() if ".layers.0." in name)
    # patterns written for the base model's names match nothing there: Axolotl would freeze everything
    with pytest.raises(ConfigError, match=r"cannot match a parameter of the adapted model.*Axolotl warns 'All "
                                          r"parameters are frozen'"):
        build_run_config({**lora, "unfrozen_parameters": ["^model.language_model.*", "^lm_head.*"]})
    # a base weight trained next to the adapter would not be in the saved adapter
    with pytest.raises(ConfigError, match=r"match base weights of the adapted model \(base_model\.model\.lm_head"):
        _train({**lora, "output_dir": str(tmp_path / "base"), "unfrozen_parameters": ["base_model.model.lm_head", "base_model.+lora_"]},
               SimpleNamespace(train=_rows(4), eval=None))


def test_model_config_overrides_and_revision_reach_the_loader(tiny_model):
    from plait.builtin.model import load_model, load_tokenizer, pretrained_kwargs

    cfg, _ = build_run_config({"base_model": str(tiny_model), "model_config": {"rms_norm_eps": 1e-3},
                               "model_revision": "main"})
    kwargs = pretrained_kwargs(cfg)
    assert kwargs["revision"] == "main" and kwargs["rms_norm_eps"] == 1e-3
    model = load_model(cfg, load_tokenizer(cfg))  # a local directory has no revisions: it loads as is
    assert model.config.rms_norm_eps == 1e-3

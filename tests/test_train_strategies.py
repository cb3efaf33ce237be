"""Axolotl's save_strategy / eval_strategy in real training runs, and resuming a
group_by_length run (in process: a plugin stops it after a checkpoint) to the same
weights as the uninterrupted run."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from plait import hookimpl
from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    # attention dropout: the torch RNG state matters, so a resume must restore it exactly
    return make_tiny_model(tmp_path_factory.mktemp("strategies") / "model", attention_dropout=0.1)


def rows(n: int, seed: int):
    """Counting rows (``k, k+1, ...``) of lengths 4 to 24, the first 2 tokens untrained."""
    from datasets import Dataset

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(4, 24)
        start = rng.randint(10, 60 - length)
        ids = list(range(start, start + length))
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:], "attention_mask": [1] * length,
                    "length": length})
    return Dataset.from_list(out)


def run_train(keys: dict, data, plugins=()):
    from plait.train.loop import train

    cfg, pm = build_run_config(keys, plugins=plugins)
    return train(cfg, pm, data=data)


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(output_dir) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*"))


@pytest.mark.slow
def test_epoch_strategies_save_and_evaluate_once_per_epoch_and_no_means_never(tiny_model, tmp_path):
    data = SimpleNamespace(train=rows(8, 0), eval=rows(4, 1))
    keys = {"base_model": str(tiny_model), "micro_batch_size": 4, "num_epochs": 2, "learning_rate": 1e-3,
            "val_set_size": 4}  # val_set_size: an eval set exists (the rows come from data=)
    run_train({**keys, "output_dir": str(tmp_path / "epoch"), "save_strategy": "epoch", "eval_strategy": "epoch"},
              data)
    assert checkpoints(tmp_path / "epoch") == [2, 4]
    assert [r["step"] for r in records(tmp_path / "epoch") if "eval_loss" in r] == [2, 4]
    run_train({**keys, "output_dir": str(tmp_path / "no"), "save_strategy": "no", "evaluation_strategy": "no"}, data)
    assert checkpoints(tmp_path / "no") == []
    assert not [r for r in records(tmp_path / "no") if "eval_loss" in r]  # not even the final evaluation


@pytest.mark.slow
def test_save_strategy_best_saves_exactly_after_improving_evaluations(tiny_model, tmp_path):
    data = SimpleNamespace(train=rows(12, 2), eval=rows(4, 3))
    # a learning rate this high makes the eval loss go up as well as down: measured 6.66, 5.45, 4.87, then
    # 4.99, 4.90, 5.07, 4.94 with one torch thread and with two (0.3 diverged differently with each)
    run_train({"base_model": str(tiny_model), "output_dir": str(tmp_path / "best"), "micro_batch_size": 4,
               "max_steps": 7, "learning_rate": 0.1, "lr_scheduler": "constant", "val_set_size": 6, "save_strategy": "best",
               "metric_for_best_model": "eval_loss", "eval_strategy": "steps"}, data)  # eval_steps: logging_steps
    losses = [(r["step"], r["eval_loss"]) for r in records(tmp_path / "best") if "eval_loss" in r]
    assert [step for step, _ in losses] == list(range(1, 8))
    improving = [step for i, (step, loss) in enumerate(losses) if all(loss < earlier for _, earlier in losses[:i])]
    assert checkpoints(tmp_path / "best") == improving
    assert 1 < len(improving) < 7  # the run both improved and got worse, so the rule was exercised


@pytest.mark.slow
def test_group_by_length_run_stopped_and_resumed_equals_the_uninterrupted_run(tiny_model, tmp_path):
    class Stop(Exception):
        pass

    class StopAtStep5:
        @hookimpl
        def on_step_end(self, run, metrics):
            if metrics["step"] == 5:
                raise Stop

    # 12 rows / micro-batch 3 = 4 steps an epoch: the resumed part crosses an epoch boundary
    data = SimpleNamespace(train=rows(12, 4), eval=None)
    keys = {"base_model": str(tiny_model), "group_by_length": True, "micro_batch_size": 3, "max_steps": 8,
            "learning_rate": 1e-3, "save_steps": 3}
    whole = run_train({**keys, "output_dir": str(tmp_path / "whole")}, data)
    with pytest.raises(Stop):
        run_train({**keys, "output_dir": str(tmp_path / "stopped")}, data, plugins=[StopAtStep5()])
    assert checkpoints(tmp_path / "stopped") == [3]
    resumed = run_train({**keys, "output_dir": str(tmp_path / "stopped"), "auto_resume_from_checkpoints": True},
                        data)
    assert resumed.step == whole.step == 8
    assert (tmp_path / "stopped" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()
    # the plans really were length-grouped: with this few rows a mega-batch is one micro-batch (transformers'
    # rule), sorted longest first, but for its first place: the longest row of all swapped to open the epoch
    from plait.data.batching import plan_batches

    lengths = data.train["length"]
    for epoch in (0, 1):
        plan = plan_batches(whole.cfg, lengths, epoch)
        assert lengths[plan[0][0][0]] == max(lengths)
        for micro_batch in plan:
            tail = [lengths[b[0]] for b in micro_batch][1:]
            assert tail == sorted(tail, reverse=True)
    assert plan_batches(whole.cfg, lengths, 0) != plan_batches(whole.cfg, lengths, 1)


@pytest.mark.parametrize("keys,message", [
    ({"save_strategy": "epoch", "save_steps": 5},
     r"'save_strategy': 'epoch' does not save every 'save_steps' \(5\)"),
    ({"save_strategy": "no", "saves_per_epoch": 2}, r"'save_strategy': 'no' writes no checkpoint, and "
                                                    r"'saves_per_epoch': 2 asks for them"),
    ({"save_strategy": "best"}, r"'save_strategy': 'best' needs metric_for_best_model"),
    ({"save_strategy": "best", "metric_for_best_model": "eval_loss", "val_set_size": 0.1},
     r"'save_strategy': 'best' .* does not evaluate during training"),
    ({"eval_strategy": "no", "eval_steps": 10, "val_set_size": 0.1},
     r"'eval_strategy': 'no' never evaluates, and 'eval_steps': 10"),
    ({"eval_strategy": "epoch", "evals_per_epoch": 4, "val_set_size": 0.1},
     r"'eval_strategy': 'epoch' evaluates once per epoch, and 'evals_per_epoch' is 4"),
    ({"eval_strategy": "steps", "evaluation_strategy": "epoch"},
     r"'eval_strategy' \('steps'\) and 'evaluation_strategy' \('epoch', its older name\) disagree"),
    ({"evaluation_strategy": "epoch"}, r"'evaluation_strategy': 'epoch' evaluates, and this config has no eval set"),
    ({"eval_strategy": "best"}, r"'eval_strategy': 'best' is not accepted"),
    ({"save_strategy": "sometimes"}, r"'save_strategy': 'sometimes' is not accepted"),
    ({"greater_is_better": True}, r"'greater_is_better': true is not accepted"),
])
def test_contradictory_strategies_are_refused_naming_the_keys(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_run_config({"base_model": "m", **keys})


def test_strategies_map_onto_the_interval_keys():
    def resolved(**keys):
        cfg, _ = build_run_config({"base_model": "m", "val_set_size": 0.1, **keys})
        return cfg.save_steps, cfg.saves_per_epoch, cfg.eval_steps, cfg.evals_per_epoch

    assert resolved(save_strategy="steps") == (500, None, None, None)  # transformers' default save_steps
    assert resolved(save_strategy="steps", save_steps=20) == (20, None, None, None)
    assert resolved(save_strategy="epoch", saves_per_epoch=1) == (None, 1, None, None)
    assert resolved(eval_strategy="steps", logging_steps=5) == (None, None, 5, None)  # eval_steps: logging_steps
    assert resolved(evaluation_strategy="steps", evals_per_epoch=3) == (None, None, None, 3)
    assert resolved(eval_strategy="epoch") == (None, None, None, 1)

"""Resuming mid-epoch with settings that change the order of the training rows
(``group_by_length``, ``curriculum_sampling``, ``seed``, ...) is refused naming
the key, for unpacked runs as for packed ones (plait.train.checkpoint)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from plait.errors import TrainingError
from plait.testing import build_run_config, make_tiny_model


def plan_run(**keys):
    cfg, _ = build_run_config({"base_model": "m", "micro_batch_size": 2, **keys})
    lengths = [5 + (i * 37) % 50 for i in range(40)]
    return SimpleNamespace(cfg=cfg, train_lengths=lengths, epoch=0, step_in_epoch=3, dp_rank=0, dp_size=1)


@pytest.mark.parametrize("saved,resumed,named", [
    ({}, {"group_by_length": True}, "group_by_length: False -> True"),
    ({"group_by_length": True}, {}, "group_by_length: True -> False"),
    ({}, {"curriculum_sampling": True}, "curriculum_sampling: False -> True"),
    ({"curriculum_sampling": True}, {"group_by_length": True},
     "curriculum_sampling: True -> False; group_by_length: False -> True"),
    ({}, {"seed": 7}, "seed: 42 -> 7"),
])
def test_a_changed_row_order_is_refused_naming_the_key(tmp_path, saved, resumed, named):
    from plait.train.checkpoint import PLAN_FILE, check_batch_plan, plan_identity

    (tmp_path / PLAN_FILE).write_text(json.dumps(plan_identity(plan_run(**saved))))
    position = {"epoch": 0, "step_in_epoch": 3}
    check_batch_plan(plan_run(**saved), tmp_path, position)  # the same settings resume
    with pytest.raises(TrainingError, match=rf"order of the training rows of epoch 0 differs.*changed: {named};"):
        check_batch_plan(plan_run(**resumed), tmp_path, position)
    check_batch_plan(plan_run(**resumed), tmp_path, {"epoch": 1, "step_in_epoch": 0})  # an epoch boundary: fine
    with pytest.raises(TrainingError, match="saved with sample_packing: false; resuming with sample_packing: true"):
        check_batch_plan(plan_run(**saved, sample_packing=True, sequence_len=64), tmp_path, position)


@pytest.mark.slow  # ~5 s: a tiny model, two steps, a resume
def test_resume_of_an_unpacked_run_with_group_by_length_switched_on_is_refused(tmp_path):
    from datasets import Dataset

    from plait.train.loop import train

    model = make_tiny_model(tmp_path / "model")
    rows = [{"input_ids": list(range(10, 14 + i % 9)), "labels": list(range(10, 14 + i % 9))} for i in range(16)]
    data = SimpleNamespace(train=Dataset.from_list(rows), eval=None)
    keys = {"base_model": str(model), "output_dir": str(tmp_path / "out"), "micro_batch_size": 2, "num_epochs": 1,
            "max_steps": 2, "save_steps": 2, "bf16": False}
    train(*build_run_config(keys), data=data)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert json.loads((checkpoint / "batch_plan.json").read_text())["settings"]["group_by_length"] is False
    cfg, pm = build_run_config({**keys, "resume_from_checkpoint": str(checkpoint), "group_by_length": True})
    with pytest.raises(TrainingError, match=r"changed: group_by_length: False -> True"):
        train(cfg, pm, data=data)

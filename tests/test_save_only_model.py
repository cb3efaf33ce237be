"""``save_only_model: true``: checkpoints hold the weights but no optimizer
state; resuming from one restores weights, schedule and position, starts the
optimizer fresh and says so."""

from __future__ import annotations

import json

import pytest
import torch

from plait.hookspecs import hookimpl
from plait.testing import make_tiny_model, run_cli, write_config, write_jsonl


class AtStart:
    """What the resumed run holds when its loop starts."""

    def __init__(self):
        self.seen = {}

    @hookimpl
    def on_train_start(self, run):
        self.seen = {"step": run.step, "optimizer_state": len(run.optimizer.state), "lr": run.scheduler.get_last_lr()[0],
                     "weights": {n: p.detach().clone() for n, p in run.model.named_parameters()}}


@pytest.mark.slow  # two short runs through the CLI
def test_checkpoints_without_optimizer_state_resume_with_a_fresh_optimizer(tmp_path):
    pytest.importorskip("plait_formats")
    from safetensors.torch import load_file

    model = make_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", [{"instruction": "add 2 and 3", "input": "", "output": "5"}] * 16)
    keys = dict(base_model=str(model), datasets=[{"path": str(data), "type": "alpaca"}], sequence_len=256,
                micro_batch_size=4, max_steps=4, save_steps=2, learning_rate=1e-3, lr_scheduler="linear",
                save_only_model=True)
    first = run_cli(["train", str(write_config(tmp_path / "a.yml", output_dir=str(tmp_path / "a"), **keys))])
    assert first.exit_code == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "a" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"trainable.safetensors", "scheduler.json", "trainer_state.json", "model"} <= files
    assert not {name for name in files if name.startswith("optimizer")}, files
    assert json.loads((checkpoint / "trainer_state.json").read_text())["optimizer_state"] is False

    spy = AtStart()
    resumed = run_cli(["train", str(write_config(tmp_path / "b.yml", output_dir=str(tmp_path / "b"),
                                                 resume_from_checkpoint=str(checkpoint), **keys))], plugins=[spy])
    assert resumed.exit_code == 0, resumed.stderr[-3000:]
    assert "was saved with save_only_model: true and holds no optimizer state; the optimizer starts fresh " \
           "(zero moments) at step 2" in resumed.stderr
    # the checkpoint's weights and schedule position, an empty optimizer (linear: step 2 of 4 is half the rate)
    assert spy.seen["step"] == 2 and spy.seen["optimizer_state"] == 0
    assert spy.seen["lr"] == pytest.approx(5e-4)
    saved = load_file(str(checkpoint / "trainable.safetensors"))
    assert saved.keys() == spy.seen["weights"].keys()
    assert all(torch.equal(saved[name], spy.seen["weights"][name]) for name in saved)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [3, 4]

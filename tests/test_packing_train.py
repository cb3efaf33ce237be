"""Packing through the real ``plait train``: one optimizer step over every row
gives the same loss packed and unpacked.

With one micro-batch holding the whole dataset, both runs see exactly the same
trained tokens in their first step; the step's loss (logged before the update)
must match within fp32 noise. A leak across packed rows, an unmasked first
label or a wrong position id would change it.
"""

import random

import pytest

from plait.hookspecs import hookimpl
from plait.testing import make_tiny_model, run_cli, write_config, write_jsonl


class StepLosses:
    def __init__(self):
        self.losses = []

    @hookimpl
    def on_step_end(self, run, metrics):
        self.losses.append(metrics["loss"])


@pytest.mark.parametrize("attention", ["sdp_attention", "eager_attention"])
def test_first_step_loss_is_the_same_packed_and_unpacked(tmp_path, attention):
    model = make_tiny_model(tmp_path / "model")
    rng = random.Random(0)
    words = ["the", "a", "sum", "water", "number", "find", "letters", "write"]
    rows = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 50)))} for _ in range(24)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    losses = {}
    for packing in (False, True):
        cfg = write_config(tmp_path / f"cfg{packing}.yml", base_model=str(model),
                           datasets=[{"path": str(data), "type": "completion"}], sequence_len=128,
                           sample_packing=packing, micro_batch_size=64, max_steps=1, bf16=False,
                           output_dir=str(tmp_path / f"out{packing}"), **{attention: True})
        recorder = StepLosses()
        result = run_cli(["train", str(cfg)], plugins=[recorder])
        assert result.exit_code == 0, result.stderr[-2000:]
        losses[packing] = recorder.losses[0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)

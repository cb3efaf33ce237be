"""The loop's bookkeeping around sample packing: honest input-token counts
(pad slots excluded, packed or not), the per-epoch packing efficiency, and
``sample_packing_bin_size`` reaching the packing plan."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from plait import hookimpl
from plait.testing import build_run_config, make_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("wiring") / "model")


def rows_data(n=12, seed=0):
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(5, 30)
        start = rng.randint(10, 400)
        ids = list(range(start, start + length))
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:], "length": length})
    return SimpleNamespace(train=Dataset.from_list(rows), eval=None), [r["length"] for r in rows]


class Metrics:
    def __init__(self):
        self.steps = []

    @hookimpl
    def on_step_end(self, run, metrics):
        self.steps.append(dict(metrics))


def train_once(model_dir, output_dir, **keys):
    from plait.train.loop import train

    recorder = Metrics()
    cfg, pm = build_run_config({"base_model": str(model_dir), "output_dir": str(output_dir), "sequence_len": 64,
                                "micro_batch_size": 16, "max_steps": 1, "bf16": False, **keys},
                               plugins=[recorder])
    data, lengths = rows_data()
    run = train(cfg, pm, data=data)
    return cfg, run, recorder.steps[0], lengths


@pytest.mark.parametrize("packing", [False, True])
def test_input_tokens_exclude_padding(tiny_model, tmp_path, packing):
    # pad_to_sequence_len: every sequence is 64 slots wide, most of them padding
    _, _, metrics, lengths = train_once(tiny_model, tmp_path / str(packing), sample_packing=packing,
                                        pad_to_sequence_len=True)
    assert metrics["input_tokens"] == sum(lengths)
    # trained tokens: every label but the first two of each row, minus the shifted-out first one
    assert metrics["tokens"] == sum(n - 2 for n in lengths)


def test_packing_efficiency_is_logged_per_epoch_and_bin_size_is_honoured(tiny_model, tmp_path):
    from plait.data.batching import plan_batches
    from plait.data.packing import sample_packing_efficiency

    cfg, run, _, lengths = train_once(tiny_model, tmp_path / "out", sample_packing=True, sample_packing_bin_size=2)
    plan = plan_batches(cfg, lengths, 0)
    assert max(len(bin_) for micro_batch in plan for bin_ in micro_batch) == 2  # short rows: 2 per bin at most
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    packing = [r for r in records if "sample_packing_efficiency" in r]
    assert packing == [{"step": 0, "epoch": 0,
                        "sample_packing_efficiency": pytest.approx(sample_packing_efficiency(plan, lengths, 64))}]
    assert 0 < packing[0]["sample_packing_efficiency"] <= 1


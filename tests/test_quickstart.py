"""`plait quickstart`, shortened from 300 to 200 steps (about 10 s on two idle
cores): the model learns the task it generated, judged on held-out words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plait.testing import run_cli

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_quickstart_learns_to_reverse_letters(tmp_path):
    result = run_cli(["quickstart", str(ROOT / "examples" / "quickstart.yml"),
                      f"base_model={tmp_path / 'model'}", f"datasets.0.path={tmp_path / 'data' / 'train.jsonl'}",
                      f"dataset_prepared_path={tmp_path / 'prepared'}", f"output_dir={tmp_path / 'run'}",
                      "max_steps=200", "eval_steps=100", "logging_steps=1"])
    assert result.exit_code == 0, result.stderr[-3000:]
    assert "[2/4] exact-match accuracy before training" in result.stdout
    summary = json.loads((tmp_path / "run" / "quickstart.json").read_text())
    assert summary["steps"] == 200
    assert summary["final_loss"] < summary["first_loss"] / 5, summary  # measured: 6.0 -> 0.55
    assert summary["accuracy_before"] == 0.0
    assert summary["accuracy_after"] >= 0.8, summary  # measured: 1.0 (200 held-out words)
    assert "[4/4] exact-match accuracy after training" in result.stdout
    # the held-out words were never trained on
    train = {json.loads(line)["instruction"] for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()}
    heldout = [json.loads(line) for line in (tmp_path / "data" / "heldout.jsonl").read_text().splitlines()]
    assert not train & {row["instruction"] for row in heldout}


def test_generated_rows_are_correct_reversals():
    from plait.quickstart import make_split

    train, heldout = make_split(50, 10, seed=3)
    for row in train + heldout:
        letters = row["instruction"].removeprefix("Reverse: ").split(" ")
        assert len(letters) == 3 and row["output"] == " ".join(reversed(letters))

"""A tiny model and generated preference rows, shared by the package's tests."""

from __future__ import annotations

import json

import pytest

from plait_preference.testing import kto_rows, pair_rows  # noqa: F401  (re-exported for the tests)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from plait.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("pref-model") / "model")


@pytest.fixture
def write_rows(tmp_path):
    def write(rows, name="data.json"):
        path = tmp_path / name
        path.write_text(json.dumps(rows))
        return path

    return write


@pytest.fixture
def train(tmp_path, tiny_model):
    """Run ``plait train`` on ``keys`` (base model, output and cache dirs filled in); its step records."""
    from plait.testing import run_cli, write_config

    def run(name: str, **keys):
        out = tmp_path / name
        keys = {"base_model": str(tiny_model), "output_dir": str(out), "dataset_prepared_path": str(tmp_path / "prep"),
                "sequence_len": 256, "learning_rate": 1e-3, "lr_scheduler": "constant", "warmup_steps": 0,
                "logging_steps": 1, **keys}
        result = run_cli(["train", str(write_config(tmp_path / f"{name}.yml", **keys))])
        assert result.exit_code == 0, result.stderr[-3000:]
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    return run

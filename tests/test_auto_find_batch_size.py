"""auto_find_batch_size: a run out of memory starts again with a smaller micro-batch, training the same rows a step.

A CPU has no GPU memory to run out of: a plugin raises torch's own OutOfMemoryError from the training
start while the micro-batch is above what "fits", which is where a GPU raises it.
"""

import sys
from pathlib import Path

import pytest
import torch

from plait import hookimpl
from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model
from plait.train.batch_size_search import smaller_micro_batch, train_finding_batch_size

# the loop tests' rows (pytest's importlib mode does not put tests/ on sys.path)
sys.path.insert(0, str(Path(__file__).parent))
from test_train_loop import data, losses  # noqa: E402


class FitsAtMost:
    """Raises CUDA's out-of-memory error at the start of a run whose micro-batch is above ``rows``."""

    def __init__(self, rows):
        self.rows, self.tried = rows, []

    @hookimpl
    def on_train_start(self, run):
        self.tried.append((run.cfg.micro_batch_size, run.cfg.gradient_accumulation_steps))
        if run.cfg.micro_batch_size > self.rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("afbs") / "model")


def test_the_largest_proper_divisor_is_tried_next():
    assert [smaller_micro_batch(n) for n in (8, 6, 5, 2, 1)] == [4, 3, 1, 1, None]


def test_a_run_out_of_memory_starts_again_with_a_smaller_micro_batch_and_the_same_rows_a_step(tiny_model, tmp_path):
    fits = FitsAtMost(2)
    cfg, pm = build_run_config({"base_model": str(tiny_model), "output_dir": str(tmp_path / "out"),
                                "micro_batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": 3,
                                "auto_find_batch_size": True, "logging_steps": 1}, plugins=[fits])
    run = train_finding_batch_size(cfg, pm, data=data(32, 4))
    assert fits.tried == [(8, 1), (4, 2), (2, 4)]
    assert (cfg.micro_batch_size, cfg.gradient_accumulation_steps) == (2, 4)
    assert run.step == 3 and len(losses(run)) == 3
    assert cfg.source_of("micro_batch_size") == "plugin:auto_find_batch_size"


def test_without_the_key_or_below_one_row_the_error_stands(tiny_model, tmp_path):
    for keys in ({"micro_batch_size": 4}, {"micro_batch_size": 1, "auto_find_batch_size": True}):
        cfg, pm = build_run_config({"base_model": str(tiny_model), "output_dir": str(tmp_path / "out"),
                                    "max_steps": 2, **keys}, plugins=[FitsAtMost(0)])
        with pytest.raises(torch.OutOfMemoryError):
            train_finding_batch_size(cfg, pm, data=data(16, 4))


def test_auto_find_batch_size_is_one_process_only(monkeypatch):
    with pytest.raises(ConfigError, match="'auto_find_batch_size' retries one process .* fsdp_version"):
        build_run_config({"base_model": "m", "auto_find_batch_size": True, "fsdp_version": 2,
                          "fsdp_config": {"reshard_after_forward": True}})
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="this launch runs several"):
        build_run_config({"base_model": "m", "auto_find_batch_size": True})

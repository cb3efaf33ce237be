"""The whole suite's settings in the repository's conftest.py: one torch thread, heaviest files first."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_root_conftest():
    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_file_in_the_heaviest_first_list_exists():
    # a renamed file would silently lose its place at the front of the xdist queue
    listed = load_root_conftest().HEAVIEST_FIRST
    assert len(set(listed)) == len(listed)
    assert [path for path in listed if not (ROOT / path).is_file()] == []


def test_torch_runs_with_the_thread_count_the_environment_gives():
    import torch

    # conftest.py sets OMP_NUM_THREADS=1 unless the caller chose a number; torch sized its pool from it
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])

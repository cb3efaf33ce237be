"""Shared fixtures: one tiny model directory per test session (building it
trains a tokenizer, so it is done once)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from plait.testing import make_tiny_model

    # hidden 64 / intermediate 128: multiples of bitsandbytes' 4-bit block size (64)
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def pytest_collection_modifyitems(config, items):
    import torch
    from pathlib import Path

    if torch.cuda.is_available():
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # this hook sees every collected test; only mark ours
        if "gpu" in item.keywords and here in Path(item.path).parents:
            item.add_marker(skip)

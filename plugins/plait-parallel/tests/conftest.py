"""Shared fixtures: one tiny llama for the whole test session of this package."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from plait.testing import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("parallel") / "model"))

"""Fixtures: the tiny tokenizer and a plugin manager with plait-models."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from plait.testing import make_tiny_tokenizer

    # no chat template: the family default must be installed by the fixes
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300, chat_template=None)


@pytest.fixture
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def pm():
    from plait.testing import plugin_manager

    import plait_models

    # only this plugin: the families under test, not whatever else is installed
    return plugin_manager(plait_models, entry_points=False)

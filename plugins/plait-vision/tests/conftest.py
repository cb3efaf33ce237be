"""Shared fixtures: the tiny vision-language models are built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def qwen2_vl_dir(tmp_path_factory):
    from plait_vision.testing import make_tiny_qwen2_vl

    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("vlm") / "qwen2_vl")


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    from plait_vision.testing import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("vlm") / "llava")



@pytest.fixture(scope="session")
def mistral3_dir(tmp_path_factory):
    from plait_vision.testing import make_tiny_mistral3

    return make_tiny_mistral3(tmp_path_factory.mktemp("vlm") / "mistral3")

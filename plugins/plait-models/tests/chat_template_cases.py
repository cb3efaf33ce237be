"""What the chat-template tests share (test_chat_templates.py, test_more_chat_templates.py):
the conversation every template renders, and plait-formats' own test helpers
(``run_format``, ``pieces_to_row`` in its tests' conftest), loaded by path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

FORMATS_CONFTEST = Path(__file__).resolve().parents[2] / "plait-formats" / "tests" / "conftest.py"

#: as in plait-formats' chat tests: a system message, then two user/assistant turns
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "sort the words"},
    {"role": "assistant", "content": "the words are sorted."},
    {"role": "user", "content": "add 3 and 4"},
    {"role": "assistant", "content": "the sum is 7"},
]


def formats_helpers():
    """plait-formats' tests' conftest as a module (skips when plait-formats is not installed)."""
    pytest.importorskip("plait_formats")
    spec = importlib.util.spec_from_file_location("plait_formats_test_helpers", FORMATS_CONFTEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

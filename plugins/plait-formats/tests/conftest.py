"""Tiny tokenizers and a helper that runs one format through the real hook."""

from __future__ import annotations

import pytest

from plait.chat_templates import NAMED_CHAT_TEMPLATES
from plait.testing import build_run_config, make_tiny_tokenizer

LLAMA3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """The kit's tiny byte-level BPE tokenizer with its chatml template (BOS first)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory):
    """The tiny tokenizer with Llama 3's header and end-of-turn tokens as special
    added tokens (as in Llama 3, not listed in all_special_ids) and its template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok3")))
    tok.add_tokens(LLAMA3_TOKENS, special_tokens=True)
    tok.chat_template = NAMED_CHAT_TEMPLATES["llama3"]
    return tok


def run_format(tokenizer, batch, *, run=None, **entry):
    """Call the ``tokenize`` hook for one dataset entry, as core does."""
    entry = {"path": "rows.jsonl", **entry}
    cfg, pm = build_run_config({"base_model": "unused", "datasets": [entry], **(run or {})})
    return pm.hook.tokenize(cfg=cfg, dataset_cfg=cfg.datasets[0], tokenizer=tokenizer, batch=batch)


def pieces_to_row(tokenizer, pieces):
    """Reference ``(input_ids, labels)`` from ``[(text, trained), ...]``: each
    piece tokenized alone (special tokens recognised, none added)."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return ids, labels


@pytest.fixture(name="run_format")
def _run_format():
    return run_format


@pytest.fixture(name="reference")
def _reference():
    return pieces_to_row

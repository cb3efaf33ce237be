"""tokenizer_legacy: passed as legacy= to the tokenizer, as Axolotl does; a Llama
(SentencePiece-style) tokenizer then marks the text after a special token as a word start."""

from __future__ import annotations

import pytest

from plait.errors import ConfigError
from plait.testing import build_run_config


@pytest.fixture(scope="module")
def llama_tokenizer_dir(tmp_path_factory):
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "a": 4, "b": 5, "▁a": 6, "▁b": 7, "<x>": 8}
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[("▁", "a"), ("▁", "b")])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<x>"]})
    path = tmp_path_factory.mktemp("llama-tok")
    tokenizer.save_pretrained(path)
    return path


def ids(path, **keys) -> list[int]:
    cfg, pm = build_run_config({"base_model": str(path), **keys})
    return pm.hook.load_tokenizer(cfg=cfg)("a<x>a b", add_special_tokens=False).input_ids


def test_tokenizer_legacy_reaches_the_tokenizer(llama_tokenizer_dir):
    # legacy: "a" after <x> is "▁a" (6); the current behaviour (the default here) keeps it "a" (4)
    assert ids(llama_tokenizer_dir, tokenizer_legacy=True) == [6, 8, 6, 7]
    assert ids(llama_tokenizer_dir, tokenizer_legacy=False) == [6, 8, 4, 7] == ids(llama_tokenizer_dir)


def test_tokenizer_legacy_takes_a_boolean():
    with pytest.raises(ConfigError, match="tokenizer_legacy"):
        build_run_config({"base_model": "m", "tokenizer_legacy": "sometimes"})

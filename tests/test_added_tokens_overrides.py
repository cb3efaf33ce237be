"""Axolotl's added_tokens_overrides: a reserved added token renamed by id is one token of the new text, in the
run's tokenizer, in its tokenized rows and in the tokenizer saved with the model, and the vocabulary does not grow."""

from __future__ import annotations

import json

import pytest
import yaml

from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model, make_tiny_tokenizer, run_cli, write_config, write_jsonl

RESERVED = ["<|reserved_0|>", "<|reserved_1|>"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model whose tokenizer has two unused reserved tokens, as Llama 3's has 250."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("reserved")
    make_tiny_tokenizer(root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    tokenizer.add_special_tokens({"additional_special_tokens": RESERVED})
    tokenizer.save_pretrained(root / "tokenizer")
    return make_tiny_model(root / "model", root / "tokenizer")


def _tokenizer(model_dir, **keys):
    from plait.pipeline import setup_tokenizer

    cfg, pm = build_run_config({"base_model": str(model_dir), **keys})
    return setup_tokenizer(cfg, pm)


def test_a_renamed_reserved_token_is_one_token_of_its_new_text(model_dir):
    plain = _tokenizer(model_dir)
    first = plain.convert_tokens_to_ids(RESERVED[0])
    assert len(plain.encode("<|eot|>", add_special_tokens=False)) > 1  # without the override: several pieces
    tokenizer = _tokenizer(model_dir, added_tokens_overrides={first: "<|eot|>"})
    assert tokenizer.encode("<|eot|>", add_special_tokens=False) == [first]
    assert tokenizer.convert_ids_to_tokens(first) == "<|eot|>" and len(tokenizer) == len(plain)
    assert tokenizer.extra_special_tokens == ["<|eot|>", RESERVED[1]]
    assert tokenizer.encode(RESERVED[1], add_special_tokens=False) == [first + 1]  # the other one is as it was


def test_the_run_trains_and_saves_the_renamed_token(model_dir, tmp_path):
    from transformers import AutoTokenizer

    plain = _tokenizer(model_dir)
    first = plain.convert_tokens_to_ids(RESERVED[0])
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i} ends here <|eot|>"} for i in range(8)])
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yml", base_model=str(model_dir), output_dir=str(out),
                          datasets=[{"path": str(data), "type": "completion"}], max_steps=2, micro_batch_size=4,
                          sequence_len=64, dataset_prepared_path=str(tmp_path / "prepared"),
                          added_tokens_overrides={first: "<|eot|>"})
    result = run_cli(["train", str(config)])
    assert result.exit_code == 0, result.stderr[-3000:]
    saved = AutoTokenizer.from_pretrained(out)
    # the saved tokenizer names the new text, and reloading it adds no token (a stale name would come back as one)
    assert len(saved) == len(plain) and saved.encode("<|eot|>", add_special_tokens=False) == [first]
    assert RESERVED[0] not in json.loads((out / "tokenizer_config.json").read_text()).get("extra_special_tokens", [])
    # the rows the run trained on hold the token id, once a row
    from plait.data.prepare import prepare_datasets
    from plait.pipeline import setup_tokenizer

    cfg, pm = build_run_config(yaml.safe_load(config.read_text()))
    rows = prepare_datasets(cfg, pm, setup_tokenizer(cfg, pm)).train
    assert all(list(ids).count(first) == 1 for ids in rows["input_ids"])


def test_only_added_tokens_can_be_renamed(model_dir):
    with pytest.raises(ConfigError, match=r"'added_tokens_overrides': \[7\] is not added tokens of this tokenizer"):
        _tokenizer(model_dir, added_tokens_overrides={7: "<|eot|>"})
    plain = _tokenizer(model_dir)
    first = plain.convert_tokens_to_ids(RESERVED[0])
    with pytest.raises(ConfigError, match="is already token"):
        _tokenizer(model_dir, added_tokens_overrides={first: RESERVED[1]})

"""``pretraining_dataset``: text streamed and tokenized only as far as the run reads
(plait.data.streaming), laid out as fixed-length rows or as documents for packing."""

from __future__ import annotations

import json

import pytest

from plait.errors import ConfigError, DataError
from plait.testing import build_run_config, make_tiny_model, make_tiny_tokenizer, run_cli, write_config, write_jsonl

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
SEQ = 32


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """400 documents of 3 to 40 words, each different."""
    import random

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) + f" {i}" for i in range(400)]
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", [{"text": t} for t in texts]), texts


def prepare(tmp_path, tokenizer, corpus_path, **keys):
    from plait.data.prepare import prepare_datasets

    settings = {"base_model": "unused", "pretraining_dataset": [{"path": str(corpus_path), "type": "pretrain"}],
                "sequence_len": SEQ, "micro_batch_size": 2, "max_steps": 5,
                "dataset_prepared_path": str(tmp_path / "prepared"), "output_dir": str(tmp_path / "out"), **keys}
    cfg, pm = build_run_config(settings)
    return prepare_datasets(cfg, pm, tokenizer, show_progress=False)


def document_ids(tokenizer, texts):
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]


def test_without_packing_the_stream_is_cut_into_full_rows_and_read_only_as_far_as_needed(tmp_path, tokenizer,
                                                                                        corpus):
    path, texts = corpus
    prepared = prepare(tmp_path, tokenizer, path)
    rows = prepared.train["input_ids"]
    budget = 5 * 2 * SEQ  # max_steps x micro_batch_size x sequence_len, one process
    assert len(rows) == budget // SEQ and all(len(r) == SEQ for r in rows)
    assert prepared.train["labels"] == rows  # every token trained
    stream = [t for ids in document_ids(tokenizer, texts) for t in ids]
    chunks = [stream[i:i + SEQ] for i in range(0, budget, SEQ)]  # the documents in order, concatenated, cut
    assert sorted(rows) == sorted(chunks)  # (rows are shuffled with the seed, like any training set)
    (stats,) = prepared.stats
    assert stats.rows_in < len(texts) // 4  # the rest of the corpus was never read
    assert stats.tokens == budget


def test_with_packing_each_row_is_a_document_or_a_piece_of_one(tmp_path, tokenizer, corpus):
    path, texts = corpus
    prepared = prepare(tmp_path, tokenizer, path, sample_packing=True)
    docs = document_ids(tokenizer, texts)
    expected = [doc[i:i + SEQ] for doc in docs for i in range(0, len(doc), SEQ) if len(doc[i:i + SEQ]) > 1]
    rows = prepared.train["input_ids"]
    assert sorted(rows) == sorted(expected[:len(rows)])
    assert sum(map(len, rows)) >= 5 * 2 * SEQ  # the budget, with slack for bins packing short of full


def test_the_budget_and_layout_are_part_of_the_cache_key(tmp_path, tokenizer, corpus):
    path, _ = corpus
    first = prepare(tmp_path, tokenizer, path)
    assert not first.from_cache
    assert prepare(tmp_path, tokenizer, path).from_cache
    longer = prepare(tmp_path, tokenizer, path, max_steps=10)
    assert not longer.from_cache and len(longer.train) == 2 * len(first.train)
    assert not prepare(tmp_path, tokenizer, path, sample_packing=True).from_cache


def test_skip_and_text_column(tmp_path, tokenizer):
    rows = [{"body": f"document number {i} " * 3} for i in range(50)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    prepared = prepare(tmp_path, tokenizer, path, sample_packing=True,
                       pretraining_dataset=[{"path": str(path), "text_column": "body", "skip": 10}])
    first = document_ids(tokenizer, [rows[10]["body"]])[0][:SEQ]
    skipped = document_ids(tokenizer, [rows[9]["body"]])[0][:SEQ]
    assert first in prepared.train["input_ids"] and skipped not in prepared.train["input_ids"]


def test_a_row_without_text_names_the_row_and_column(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "fine"}, {"content": "no text column here"}])
    with pytest.raises(DataError, match=r"row 2: no text in column 'text' \(columns: content\); set text_column"):
        prepare(tmp_path, tokenizer, path)


@pytest.mark.parametrize("keys, message", [
    ({}, "'pretraining_dataset' streams its text and needs max_steps"),
    ({"max_steps": 5, "datasets": [{"path": "x.jsonl", "type": "alpaca"}]}, "'pretraining_dataset' and 'datasets'"),
    ({"max_steps": 5, "val_set_size": 0.1}, "'val_set_size' cannot split a streamed pretraining_dataset"),
])
def test_config_rules(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_run_config({"base_model": "m", "pretraining_dataset": [{"path": "c.jsonl"}], **keys})


@pytest.mark.slow
def test_plait_train_on_a_streamed_corpus_with_packing(tmp_path, corpus):
    path, _ = corpus
    model = make_tiny_model(tmp_path / "model")
    cfg = write_config(tmp_path / "cfg.yml", base_model=str(model), sequence_len=64, micro_batch_size=4,
                       pretraining_dataset=[{"path": str(path), "type": "pretrain"}], sample_packing=True,
                       max_steps=12, learning_rate=3e-3, warmup_steps=1, logging_steps=1,
                       output_dir=str(tmp_path / "out"))
    result = run_cli(["train", str(cfg)])
    assert result.exit_code == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0] - 1.0
    assert any(r.get("sample_packing_efficiency", 0) > 0.9 for r in records)


# ------------------------------------------------------- streaming: true (datasets: entries)


@pytest.fixture(scope="module")
def alpaca_rows(tmp_path_factory):
    """1,000 alpaca rows, each different."""
    rows = [{"instruction": f"say {WORDS[i % 10]} {i}", "input": "", "output": f"{WORDS[(i * 7) % 10]} {i}"}
            for i in range(1000)]
    return write_jsonl(tmp_path_factory.mktemp("alpaca") / "alpaca.jsonl", rows), rows


def prepare_sft(tmp_path, tokenizer, path, **keys):
    from plait.data.prepare import prepare_datasets

    settings = {"base_model": "unused", "datasets": [{"path": str(path), "type": "alpaca"}], "sequence_len": 256,
                "micro_batch_size": 2, "dataset_prepared_path": str(tmp_path / "prepared"),
                "output_dir": str(tmp_path / "out"), "streaming": True, **keys}
    cfg, pm = build_run_config(settings)
    return prepare_datasets(cfg, pm, tokenizer, show_progress=False)


@pytest.mark.parametrize("max_steps, chunks", [(2, 1), (100, 2)])
def test_streamed_datasets_are_read_only_as_far_as_the_run_trains(tmp_path, tokenizer, alpaca_rows, max_steps,
                                                                  chunks):
    """Without packing a run needs max_steps x micro_batch_size x gradient_accumulation_steps rows, read in
    whole chunks of 256 rows: 8 rows take one chunk, 400 take two."""
    from plait.data.streaming import STREAM_CHUNK

    path, rows = alpaca_rows
    prepared = prepare_sft(tmp_path, tokenizer, path, max_steps=max_steps, gradient_accumulation_steps=2)
    (stats,) = prepared.stats
    needed = max_steps * 2 * 2
    assert stats.rows_in == chunks * STREAM_CHUNK and stats.kept >= needed
    # the streamed rows are the file's first ones, tokenized as a whole-file run tokenizes them
    first = write_jsonl(tmp_path / "first.jsonl", rows[:chunks * STREAM_CHUNK])
    whole = prepare_sft(tmp_path / "whole", tokenizer, first, streaming=False, max_steps=max_steps)
    assert sorted(prepared.train["input_ids"]) == sorted(whole.train["input_ids"])


def test_streaming_with_packing_reads_the_runs_tokens(tmp_path, tokenizer, alpaca_rows):
    from plait.data.streaming import PACKING_SLACK, STREAM_CHUNK

    path, _ = alpaca_rows
    prepared = prepare_sft(tmp_path, tokenizer, path, max_steps=60, sample_packing=True)
    (stats,) = prepared.stats
    budget = 60 * 2 * 256
    assert stats.tokens >= budget * PACKING_SLACK
    # and no whole chunk more than it needed
    assert stats.tokens - stats.tokens // (stats.rows_in // STREAM_CHUNK) < budget * PACKING_SLACK


@pytest.mark.parametrize("keys, message", [
    ({}, "'streaming': true reads the datasets as streams and needs max_steps"),
    ({"max_steps": 5, "val_set_size": 0.1}, "'val_set_size' cannot split streamed datasets"),
    ({"max_steps": 5, "datasets": [{"path": "d.jsonl", "type": "alpaca", "shards": 4}]},
     r"'shards' of datasets.0 splits a dataset it has read whole"),
])
def test_streaming_rules(keys, message):
    with pytest.raises(ConfigError, match=message):
        # a case's own datasets replace the default entry (later keys win)
        build_run_config({"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}], "streaming": True,
                          **keys})

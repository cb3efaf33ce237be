"""prepare_datasets: tokenize through the hook, count and filter rows, split, cache."""

import json

import pytest

from plait.data.prepare import prepare_datasets
from plait.errors import ConfigError, DataError
from plait.testing import build_run_config, make_tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def alpaca_rows(n, start=0):
    return [{"instruction": f"sort the words {i}", "input": "the a it" if i % 2 else "", "output": f"a it the {i}"}
            for i in range(start, start + n)]


def chat_rows(n):
    return [{"messages": [{"role": "user", "content": f"add {i} and 1"},
                          {"role": "assistant", "content": f"the sum is {i + 1}"}]} for i in range(n)]


def prepare(tmp_path, tok_dir, datasets, plugins=(), **keys):
    cfg, pm = build_run_config({"base_model": str(tok_dir), "output_dir": str(tmp_path / "out"),
                                "datasets": datasets, **keys}, plugins=plugins)
    tokenizer = pm.hook.load_tokenizer(cfg=cfg)
    return prepare_datasets(cfg, pm, tokenizer, show_progress=False), tokenizer


def test_two_datasets_mixed_with_exact_counts(tmp_path, tok_dir):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(30))
    c = write_jsonl(tmp_path / "c.jsonl", chat_rows(20))
    data, tokenizer = prepare(tmp_path, tok_dir, [{"path": str(a), "type": "alpaca"},
                                                  {"path": str(c), "type": "chat_template"}])
    assert set(data.train.column_names) == {"input_ids", "labels", "attention_mask", "length"}
    assert len(data.train) == 50 and data.eval is None and not data.from_cache
    assert [(s.rows_in, s.kept, s.dropped) for s in data.stats] == [(30, 30, 0), (20, 20, 0)]
    rows = data.train.to_list()
    assert sum(r["length"] for r in rows) == sum(s.tokens for s in data.stats)
    assert sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows) == sum(s.trained_tokens for s in data.stats)
    for r in rows:
        assert r["length"] == len(r["input_ids"]) == len(r["labels"]) == len(r["attention_mask"])
    # shuffled with the seed: both sources are spread through the rows, and the order is reproducible
    first_kinds = {tokenizer.decode(r["input_ids"][:2]) for r in rows[:15]}
    assert len(first_kinds) == 2
    assert (tmp_path / "prepared" / data.cache_path.name / "meta.json").exists()


def test_excess_length_drop_and_truncate(tmp_path, tok_dir):
    rows = alpaca_rows(6) + [{"instruction": "long " * 200, "output": "x"}, {"instruction": "y", "output": "z " * 200}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    dropped, _ = prepare(tmp_path, tok_dir, [{"path": str(path), "type": "alpaca"}], sequence_len=128)
    s = dropped.stats[0]
    assert (s.rows_in, s.kept, s.dropped_too_long, s.truncated) == (8, 6, 2, 0)
    truncated, _ = prepare(tmp_path, tok_dir, [{"path": str(path), "type": "alpaca"}], sequence_len=128,
                           excess_length_strategy="truncate")
    s = truncated.stats[0]
    # the long instruction leaves nothing to train once cut; the long output keeps 128 tokens
    assert (s.kept, s.truncated, s.dropped_no_trained, s.dropped_too_long) == (7, 1, 1, 0)
    assert max(truncated.train["length"]) == 128


def test_bad_row_is_one_error_with_file_and_row(tmp_path, tok_dir):
    rows = alpaca_rows(5)
    rows[3] = {"instruction": "no output here"}
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataError, match=r"a\.jsonl, row 4: missing field 'output'") as info:
        prepare(tmp_path, tok_dir, [{"path": str(path), "type": "alpaca"}])
    assert info.value.row == 4
    chats = chat_rows(4)
    chats[2]["messages"][0]["role"] = "narrator"
    chats[3]["messages"] = []
    path = write_jsonl(tmp_path / "c.jsonl", chats)
    with pytest.raises(DataError, match=r"c\.jsonl, row 3: message 0 has unknown role 'narrator'"):
        prepare(tmp_path, tok_dir, [{"path": str(path), "type": "chat_template"}])
    path = write_jsonl(tmp_path / "e.jsonl", chat_rows(4)[:3] + [{"messages": []}])
    with pytest.raises(DataError, match=r"e\.jsonl, row 4: empty conversation"):
        prepare(tmp_path, tok_dir, [{"path": str(path), "type": "chat_template"}])


def test_bad_rows_in_a_later_batch_count_from_the_file_start(tmp_path, tok_dir):
    rows = alpaca_rows(1200)
    rows[1100] = {"instruction": "no output"}
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataError, match=r"row 1101: missing field 'output'"):
        prepare(tmp_path, tok_dir, [{"path": str(path), "type": "alpaca"}])


def test_skip_bad_rows_counts_them(tmp_path, tok_dir):
    chats = chat_rows(10)
    chats[2]["messages"][0]["role"] = "narrator"
    chats[7]["messages"] = []
    path = write_jsonl(tmp_path / "c.jsonl", chats)
    data, _ = prepare(tmp_path, tok_dir, [{"path": str(path), "type": "chat_template"}], skip_bad_rows=True)
    s = data.stats[0]
    assert (s.rows_in, s.kept, s.dropped_bad) == (10, 8, 2)
    assert any("row 3" in m and "narrator" in m for m in s.bad_examples)
    assert any("row 8" in m and "empty conversation" in m for m in s.bad_examples)


def test_rows_with_nothing_to_train_are_dropped(tmp_path, tok_dir):
    chats = chat_rows(3) + [{"messages": [{"role": "user", "content": "only a question"}]}]
    path = write_jsonl(tmp_path / "c.jsonl", chats)
    data, _ = prepare(tmp_path, tok_dir, [{"path": str(path), "type": "chat_template"}])
    assert (data.stats[0].kept, data.stats[0].dropped_no_trained) == (3, 1)


def test_val_set_size_fraction_count_and_test_datasets(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(40))
    entry = [{"path": str(path), "type": "alpaca"}]
    data, _ = prepare(tmp_path, tok_dir, entry, val_set_size=0.25)
    assert (len(data.train), len(data.eval)) == (30, 10)
    again, _ = prepare(tmp_path, tok_dir, entry, val_set_size=0.25, dataset_prepared_path=str(tmp_path / "other"))
    assert again.eval["input_ids"] == data.eval["input_ids"]  # deterministic with the seed
    counted, _ = prepare(tmp_path, tok_dir, entry, val_set_size=5)
    assert (len(counted.train), len(counted.eval)) == (35, 5)
    with pytest.raises(ConfigError, match="val_set_size"):
        prepare(tmp_path, tok_dir, entry, val_set_size=40)
    held_out = write_jsonl(tmp_path / "t.jsonl", alpaca_rows(4, start=100))
    tested, _ = prepare(tmp_path, tok_dir, entry, test_datasets=[{"path": str(held_out), "type": "alpaca"}])
    assert (len(tested.train), len(tested.eval)) == (40, 4)
    assert [s.split for s in tested.stats] == ["train", "eval"]


def test_cache_reuse_and_invalidation(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(12))
    entry = [{"path": str(path), "type": "alpaca"}]
    first, _ = prepare(tmp_path, tok_dir, entry)
    second, _ = prepare(tmp_path, tok_dir, entry)
    assert not first.from_cache and second.from_cache
    assert second.cache_path == first.cache_path
    assert second.train["input_ids"] == first.train["input_ids"]
    assert json.loads((first.cache_path / "meta.json").read_text())["stats"][0]["rows_in"] == 12
    # a changed row in the data file: tokenized again
    write_jsonl(path, alpaca_rows(11) + [{"instruction": "changed", "output": "new"}])
    changed, _ = prepare(tmp_path, tok_dir, entry)
    assert not changed.from_cache and changed.cache_path != first.cache_path
    # a changed tokenizer (an added token) with the same data: tokenized again
    retokenized, _ = prepare(tmp_path, tok_dir, entry, tokens=["<extra>"])
    assert not retokenized.from_cache and retokenized.cache_path != changed.cache_path
    # a changed setting that shapes the rows: tokenized again
    assert not prepare(tmp_path, tok_dir, entry, train_on_inputs=True)[0].from_cache
    assert prepare(tmp_path, tok_dir, entry)[0].from_cache


def test_worker_processes_give_the_same_rows(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(40))
    entry = [{"path": str(path), "type": "chat_template"}]
    one, _ = prepare(tmp_path, tok_dir, entry, shuffle_merged_datasets=False)
    two, _ = prepare(tmp_path, tok_dir, entry, shuffle_merged_datasets=False, dataset_processes=2,
                     dataset_prepared_path=str(tmp_path / "p2"))
    assert two.train.to_list() == one.train.to_list()


def test_missing_type_without_input_ids(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(2))
    with pytest.raises(ConfigError, match=r"'datasets.0.type' is not set and the rows have no input_ids"):
        prepare(tmp_path, tok_dir, [{"path": str(path)}])
    pre = write_jsonl(tmp_path / "p.jsonl", [{"input_ids": [0, 10, 11], "labels": [-100, 10, 11]}])
    data, _ = prepare(tmp_path, tok_dir, [{"path": str(pre)}])
    assert data.train.to_list() == [{"input_ids": [0, 10, 11], "labels": [-100, 10, 11],
                                     "attention_mask": [1, 1, 1], "length": 3}]


def test_completion_chunks_count_as_kept_rows(tmp_path, tok_dir):
    long_text = " ".join(f"word {i} of a long text" for i in range(40))
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": long_text}, {"text": "a short text"}])
    data, tokenizer = prepare(tmp_path, tok_dir, [{"path": str(path), "type": "completion"}], sequence_len=32,
                              shuffle_merged_datasets=False)
    full = tokenizer(long_text)["input_ids"] + [tokenizer.eos_token_id]
    s = data.stats[0]
    assert s.rows_in == 2 and s.kept == -(-len(full) // 32) + 1
    assert sum(data.train["input_ids"][:-1], []) == full
    assert max(data.train["length"]) == 32 and s.dropped_too_long == 0


def test_a_format_crash_names_the_rows(tmp_path, tok_dir):
    from plait import hookimpl
    from plait.registries import DatasetFormat

    def broken(cfg, dataset_cfg, tokenizer, batch):
        return [int(t) for t in batch["instruction"]]

    class Broken:
        @hookimpl
        def dataset_formats():
            return [DatasetFormat("broken", broken)]

    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(3))
    with pytest.raises(DataError, match=r"a\.jsonl: tokenizing rows 1 to 3 \(dataset datasets.0, type broken\) "
                                        r"failed: ValueError"):
        prepare(tmp_path, tok_dir, [{"path": str(path), "type": "broken"}], plugins=[Broken])


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_json_lines_are_skipped_and_counted(tmp_path, tok_dir):
    rows = [json.dumps(r) for r in alpaca_rows(5)]
    path = write_lines(tmp_path / "a.jsonl", rows[:2] + ["", '{"instruction": "cut off", '] + rows[2:] + ["[]"])
    entry = [{"path": str(path), "type": "alpaca"}]
    with pytest.raises(DataError, match=r"a\.jsonl, row 3 \(line 4\): not valid JSON"):
        prepare(tmp_path, tok_dir, entry)
    data, _ = prepare(tmp_path, tok_dir, entry, skip_bad_rows=True)
    s = data.stats[0]
    assert (s.rows_in, s.kept, s.dropped_bad) == (7, 5, 2)
    assert len(data.train) == 5
    assert s.bad_examples == [f"{path}, row 3 (line 4): not valid JSON: Expecting property name enclosed in double "
                              f"quotes at column 28",
                              f"{path}, row 7 (line 8): a JSON list, expected an object"]


def test_blank_lines_do_not_shift_the_reported_line(tmp_path, tok_dir):
    rows = [json.dumps(r) for r in alpaca_rows(3)]
    path = write_lines(tmp_path / "a.jsonl", [rows[0], "", json.dumps({"instruction": "no output"}), rows[1]])
    with pytest.raises(DataError, match=r"a\.jsonl, row 2 \(line 3\): missing field 'output'") as info:
        prepare(tmp_path, tok_dir, [{"path": str(path), "type": "alpaca"}])
    assert (info.value.row, info.value.line) == (2, 3)
    data, _ = prepare(tmp_path, tok_dir, [{"path": str(path), "type": "alpaca"}], skip_bad_rows=True)
    assert data.stats[0].bad_examples[0].startswith(f"{path}, row 2 (line 3): missing field 'output'")


#: a template that, like several real ones, refuses roles it has no markup for
NO_TOOLS_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'tool' %}"
                     "{{ raise_exception('tool messages are not supported') }}{% endif %}"
                     "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")


def test_a_template_that_raises_is_a_bad_row(tmp_path, tok_dir):
    chats = chat_rows(5)
    chats[2]["messages"].insert(1, {"role": "tool", "content": "42"})
    path = write_jsonl(tmp_path / "c.jsonl", chats)
    entry = [{"path": str(path), "type": "chat_template", "chat_template_jinja": NO_TOOLS_TEMPLATE}]
    with pytest.raises(DataError, match=r"c\.jsonl, row 3: the chat template refused this conversation \(roles: "
                                        r"user, tool, assistant\): TemplateError: tool messages are not supported"):
        prepare(tmp_path, tok_dir, entry)
    data, _ = prepare(tmp_path, tok_dir, entry, skip_bad_rows=True)
    s = data.stats[0]
    assert (s.rows_in, s.kept, s.dropped_bad) == (5, 4, 1)
    assert "row 3" in s.bad_examples[0] and "tool messages are not supported" in s.bad_examples[0]


def test_extras_of_a_format_reach_collate_and_text_entries_get_none(tmp_path, tok_dir):
    from plait import hookimpl
    from plait.data.batching import materialize
    from plait.registries import DatasetFormat

    def tokenize_tagged(cfg, dataset_cfg, tokenizer, batch):
        n = len(batch["instruction"])
        if "sort the words 1" in batch["instruction"]:
            from plait.errors import BadRowError

            # the batch is then tokenized row by row: the other rows keep their extras
            raise BadRowError(batch["instruction"].index("sort the words 1"), "skipped on purpose")
        return {"input_ids": [[5, 6, 7]] * n, "labels": [[-100, 6, 7]] * n,
                "extras": [{"source": text} for text in batch["instruction"]]}

    class WithExtras:
        @hookimpl
        def dataset_formats():
            return [DatasetFormat("tagged", tokenize_tagged)]

    tagged = write_jsonl(tmp_path / "t.jsonl", alpaca_rows(3))
    plain = write_jsonl(tmp_path / "p.jsonl", alpaca_rows(2))
    data, _ = prepare(tmp_path, tok_dir, [{"path": str(tagged), "type": "tagged"}, {"path": str(plain),
                                                                                   "type": "alpaca"}],
                      plugins=[WithExtras], shuffle_merged_datasets=False, skip_bad_rows=True)
    assert data.train["extras"] == [json.dumps({"source": "sort the words 0"}),
                                    json.dumps({"source": "sort the words 2"}), "", ""]
    assert materialize(data.train, [1])["extras"] == [{"source": "sort the words 2"}]
    assert "extras" not in materialize(data.train, [2])
    assert materialize(data.train, [1, 2])["extras"] == [{"source": "sort the words 2"}, {}]
    only_text, _ = prepare(tmp_path / "text", tok_dir, [{"path": str(plain), "type": "alpaca"}])
    assert "extras" not in only_text.train.column_names


def test_rows_whose_extras_give_segments_are_kept_whole(tmp_path):
    """A row whose extras give ``seq_lens`` is a row of segments: materialize
    hands them to collate (alone or packed), and an over-long one is dropped,
    not truncated (a cut would lose a segment)."""
    from plait.data.batching import materialize
    from plait.data.prepare import prepare_datasets
    from plait.hookspecs import hookimpl
    from plait.testing import build_run_config, make_tiny_tokenizer, write_jsonl

    class TwoSegments:
        """A format whose rows are two segments: the text, then the text again."""

        @hookimpl
        def dataset_formats():
            from plait.registries import DatasetFormat

            def twice(cfg, dataset_cfg, tokenizer, batch):
                ids = [tokenizer(text)["input_ids"] for text in batch["text"]]
                return {"input_ids": [i + i for i in ids], "labels": [i + i for i in ids],
                        "extras": [{"seq_lens": [len(i), len(i)], "tag": text} for i, text in zip(ids, batch["text"])]}

            return [DatasetFormat("twice", twice)]

    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a b c"}, {"text": "d e"}, {"text": "f g h i j " * 20}])
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path / "tok"))
    cfg, pm = build_run_config({"base_model": "m", "sequence_len": 64, "excess_length_strategy": "truncate",
                                "shuffle_merged_datasets": False, "dataset_prepared_path": str(tmp_path / "prep"),
                                "datasets": [{"path": str(data), "type": "twice"}]}, plugins=[TwoSegments])
    train = prepare_datasets(cfg, pm, tokenizer, show_progress=False).train
    assert len(train) == 2  # the long row has segments: dropped, not truncated
    one = materialize(train, [0])
    assert one["extras"][0]["tag"] == "a b c" and sum(one["seq_lens"]) == train[0]["length"]
    both = materialize(train, [0, 1])
    assert both["seq_lens"] == one["seq_lens"] + materialize(train, [1])["seq_lens"]
    assert [e["tag"] for e in both["extras"]] == ["a b c", "d e"]

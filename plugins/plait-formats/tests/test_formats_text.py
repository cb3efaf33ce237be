"""completion, pretraining, input_output, user_defined and pre-tokenized rows."""

import pytest

from plait.errors import BadRowError

LONG = " ".join(f"word {i} of the long text" for i in range(12))


def test_completion_splits_long_texts_into_sequence_len_chunks(tokenizer, run_format):
    out = run_format(tokenizer, {"text": [LONG, "short one"]}, type="completion", run={"sequence_len": 16})
    full = tokenizer(LONG)["input_ids"] + [tokenizer.eos_token_id]
    short = tokenizer("short one")["input_ids"] + [tokenizer.eos_token_id]
    n_chunks = -(-len(full) // 16)
    assert len(out["input_ids"]) == n_chunks + 1
    assert all(len(chunk) == 16 for chunk in out["input_ids"][:n_chunks - 1])
    assert sum(out["input_ids"][:n_chunks], []) == full
    assert out["input_ids"][-1] == short
    assert out["labels"] == out["input_ids"]  # every token trained


def test_completion_field(tokenizer, run_format):
    out = run_format(tokenizer, {"body": ["the answer"]}, type="completion", field="body")
    assert out["input_ids"][0] == tokenizer("the answer")["input_ids"] + [tokenizer.eos_token_id]


def test_pretraining_chunks_one_continuous_stream(tokenizer, run_format):
    texts = ["one two three four", "five six seven", LONG]
    out = run_format(tokenizer, {"text": texts}, type="pretraining", run={"sequence_len": 16})
    stream = sum((tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts), [])
    assert sum(out["input_ids"], []) == stream
    assert [len(c) for c in out["input_ids"][:-1]] == [16] * (len(out["input_ids"]) - 1)
    assert out["labels"] == out["input_ids"]


def test_input_output_segments(tokenizer, run_format, reference):
    segments = [{"text": "<|begin_of_text|>Q: add 3 and 4\n", "label": False}, {"text": "A: 7"},
                {"text": "<|end_of_text|>", "label": True}]
    out = run_format(tokenizer, {"segments": [segments]}, type="input_output")
    ids, labels = reference(tokenizer, [("<|begin_of_text|>Q: add 3 and 4\n", False), ("A: 7", True),
                                        ("<|end_of_text|>", True)])
    assert (out["input_ids"][0], out["labels"][0]) == (ids, labels)
    with pytest.raises(BadRowError, match="segment 0 needs a 'text'"):
        run_format(tokenizer, {"segments": [[{"label": True}]]}, type="input_output")


def test_user_defined_format(tokenizer, run_format):
    batch = {"q": ["sort the words", "add 3"], "ctx": ["the a", ""], "a": ["a the", "3"]}
    out = run_format(tokenizer, batch, type="user_defined", field_instruction="q", field_input="ctx",
                     field_output="a", format="[INST] {instruction} {input} [/INST] ",
                     no_input_format="[INST] {instruction} [/INST] ", system_prompt="be brief",
                     system_format="<<SYS>>{system}<</SYS>>")
    for row, (prompt, answer) in enumerate([("<<SYS>>be brief<</SYS>>[INST] sort the words the a [/INST] ", "a the"),
                                            ("<<SYS>>be brief<</SYS>>[INST] add 3 [/INST] ", "3")]):
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert out["input_ids"][row] == prompt_ids + answer_ids
        assert out["labels"][row] == [-100] * len(prompt_ids) + answer_ids


def test_pretokenized_rows_pass_through(tokenizer, run_format):
    batch = {"input_ids": [[0, 10, 11, 12], [0, 13]], "labels": [[-100, -100, 11, 12], None]}
    out = run_format(tokenizer, batch, type="pretokenized")
    assert out["input_ids"] == [[0, 10, 11, 12], [0, 13]]
    assert out["labels"] == [[-100, -100, 11, 12], [0, 13]]
    # rows with input_ids need no type at all
    assert run_format(tokenizer, {"input_ids": [[0, 10]]}) == {"input_ids": [[0, 10]], "labels": [[0, 10]]}


@pytest.mark.parametrize("batch,message", [
    ({"input_ids": [[0, 1], [0, "x"]]}, r"input_ids\[1\] is 'x', expected an integer"),
    ({"input_ids": [[0, 100000]]}, r"input_ids\[1\] is 100000, outside the vocabulary"),
    ({"input_ids": [[0, 1, 2]], "labels": [[0, 1]]}, "labels has 2 entries but input_ids has 3"),
    ({"input_ids": [[0, 1]], "labels": [[-5, 1]]}, r"labels\[0\] is -5"),
    ({"input_ids": [[]]}, "non-empty list"),
])
def test_pretokenized_checks(tokenizer, run_format, batch, message):
    with pytest.raises(BadRowError, match=message) as info:
        run_format(tokenizer, batch, type="pretokenized")
    assert info.value.index == len(batch["input_ids"]) - 1


def test_formats_register_their_types_and_own_their_keys():
    from plait.errors import ConfigError
    from plait.testing import build_run_config
    from plait_formats import plugin
    from plait_formats.entries import ChatTemplateEntry, InstructionEntry

    formats = {fmt.name: fmt for fmt in plugin.dataset_formats()}
    assert {"alpaca", "chat_template", "completion", "input_output", "user_defined"} <= set(formats)
    assert formats["alpaca"].entry_model is InstructionEntry
    cfg, _ = build_run_config({"base_model": "m", "datasets": [{"path": "a.jsonl", "type": "chat_template",
                                                                "roles_to_train": ["assistant"]}]})
    assert isinstance(cfg.datasets[0], ChatTemplateEntry) and cfg.datasets[0].roles_to_train == ["assistant"]
    # a chat_template key on an alpaca entry is refused, naming the format that owns it
    with pytest.raises(ConfigError, match=r"unknown key 'roles_to_train' in datasets.0: it is a key of format "
                                          r"'chat_template', not of format 'alpaca'"):
        build_run_config({"base_model": "m", "datasets": [{"path": "a.jsonl", "type": "alpaca",
                                                           "roles_to_train": ["assistant"]}]})

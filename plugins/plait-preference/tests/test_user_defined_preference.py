"""``user_defined.default``: Axolotl's custom preference type, written as a mapping
under ``type:`` (or by name), its strings built from the config's format strings."""

from __future__ import annotations

import pytest

from plait.testing import build_run_config

TYPE = {"field_prompt": "question", "field_system": "persona", "field_chosen": "good", "field_rejected": "bad",
        "prompt_format": "[{system}] Q: {prompt}\nA:", "chosen_format": " {chosen}", "rejected_format": " {rejected}"}
ROWS = [{"persona": "tutor", "question": f"what is {i} plus 1", "good": f"it is {i + 1}", "bad": "no idea"}
        for i in range(8)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from plait.testing import make_tiny_tokenizer

    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300))


def _tokenize(tokenizer, rows, rl="dpo", **entry):
    cfg, pm = build_run_config({"base_model": "unused", "rl": rl, "datasets": [{"path": "rows.json", **entry}]})
    batch = {key: [row.get(key) for row in rows] for key in rows[0]}
    return cfg.datasets[0], pm.hook.tokenize(cfg=cfg, dataset_cfg=cfg.datasets[0], tokenizer=tokenizer, batch=batch)


def _segments(tokenizer, ids, labels, lengths):
    """``[(prompt text, trained text)]`` per segment of a pair row."""
    out, start = [], 0
    for length in lengths:
        seg_ids, seg_labels = ids[start:start + length], labels[start:start + length]
        prompt = [t for t, label in zip(seg_ids, seg_labels) if label == -100]
        trained = [t for t, label in zip(seg_ids, seg_labels) if label != -100]
        out.append((tokenizer.decode(prompt), tokenizer.decode(trained)))
        start += length
    return out


def test_the_type_mapping_is_user_defined_default_with_its_keys():
    entry = build_run_config({"base_model": "unused", "rl": "dpo",
                              "datasets": [{"path": "rows.json", "type": TYPE}]})[0].datasets[0]
    assert entry.type == "user_defined.default"
    assert entry.prompt_format == TYPE["prompt_format"] and entry.field_chosen == "good"


def test_pairs_are_the_formatted_strings_with_the_prompt_masked(tokenizer):
    _, out = _tokenize(tokenizer, ROWS[:1], type=TYPE)
    extras = out["extras"][0]
    assert extras["segment_names"] == ["chosen", "rejected"]
    assert _segments(tokenizer, out["input_ids"][0], out["labels"][0], extras["seq_lens"]) == [
        ("<|begin_of_text|>[tutor] Q: what is 0 plus 1\nA:", " it is 1<|end_of_text|>"),
        ("<|begin_of_text|>[tutor] Q: what is 0 plus 1\nA:", " no idea<|end_of_text|>"),
    ]


def test_defaults_and_a_row_without_system(tokenizer):
    # default columns and formats; {system} with no system column fills in empty text (Axolotl's meaning)
    rows = [{"prompt": "hi", "chosen": "hello", "rejected": "go"}]
    _, out = _tokenize(tokenizer, rows, type="user_defined.default")
    assert _segments(tokenizer, out["input_ids"][0], out["labels"][0], out["extras"][0]["seq_lens"])[0] == (
        "<|begin_of_text|>hi", "hello<|end_of_text|>")
    _, out = _tokenize(tokenizer, rows, type={"prompt_format": "<{system}>{prompt}"})
    assert _segments(tokenizer, out["input_ids"][0], out["labels"][0], out["extras"][0]["seq_lens"])[0][0] == (
        "<|begin_of_text|><>hi")


def test_kto_rows_read_the_completion_and_label_columns(tokenizer):
    rows = [{"q": "hi", "answer": "hello", "ok": True}, {"q": "bye", "answer": "what", "ok": False}]
    _, out = _tokenize(tokenizer, rows, rl="kto", type={"field_prompt": "q", "field_completion": "answer",
                                                        "field_label": "ok", "completion_format": "A: {completion}"})
    assert [extras["segment_names"] for extras in out["extras"]] == [["desirable", "kl"], ["undesirable", "kl"]]
    first = _segments(tokenizer, out["input_ids"][0], out["labels"][0], out["extras"][0]["seq_lens"])
    assert first[0] == ("<|begin_of_text|>hi", "A: hello<|end_of_text|>")


def test_a_placeholder_the_row_cannot_fill_is_refused_at_validation():
    from plait.errors import ConfigError

    with pytest.raises(ConfigError, match=r"prompt_format.*uses \{question\}; accepted placeholders: \{prompt\}, "
                                          r"\{system\}"):
        build_run_config({"base_model": "unused", "rl": "dpo",
                          "datasets": [{"path": "rows.json", "type": {"prompt_format": "{question}"}}]})


def test_without_rl_the_mapping_is_sft_user_defined():
    entry = build_run_config({"base_model": "unused", "datasets": [
        {"path": "rows.json", "type": {"format": "Q: {instruction}\nA:", "field_output": "answer"}}]})[0].datasets[0]
    assert (entry.type, entry.format, entry.field_output) == ("user_defined", "Q: {instruction}\nA:", "answer")


import pytest

import plait_qa_format
from plait.errors import BadRowError
from plait.testing import build_run_config, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def _tokenize(tokenizer, batch, **keys):
    cfg, pm = build_run_config({"base_model": "m", "datasets": [{"path": "x.jsonl", "type": "qa"}], **keys},
                               plugins=[plait_qa_format])
    return pm.hook.tokenize(cfg=cfg, dataset_cfg=cfg.datasets[0], tokenizer=tokenizer, batch=batch)


def test_question_masked_answer_and_eos_trained(tokenizer):
    out = _tokenize(tokenizer, {"question": ["what is two plus two"], "answer": ["four"]})
    prompt = tokenizer("Question: what is two plus two\nAnswer: ")["input_ids"]
    answer = tokenizer("four", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert out["input_ids"] == [prompt + answer]
    assert out["labels"] == [[-100] * len(prompt) + answer]


def test_train_on_inputs_trains_the_prompt(tokenizer):
    out = _tokenize(tokenizer, {"question": ["q"], "answer": ["a"]}, train_on_inputs=True)
    assert out["labels"] == out["input_ids"]


def test_empty_answer_is_a_bad_row(tokenizer):
    with pytest.raises(BadRowError) as info:
        _tokenize(tokenizer, {"question": ["q", "r"], "answer": ["a", ""]})
    assert info.value.index == 1


def test_qa_declares_its_own_keys(tokenizer):
    from plait.errors import ConfigError

    out = _tokenize_entry(tokenizer, {"q": ["q"], "a": ["a"]}, field_question="q", field_answer="a")
    assert out["input_ids"] == _tokenize(tokenizer, {"question": ["q"], "answer": ["a"]})["input_ids"]
    # another format's key is refused against the qa format, listing qa's own keys
    with pytest.raises(ConfigError, match=r"(?s)unknown key 'field_instruction' in datasets.0.*"
                                          r"accepted for format 'qa': .*field_question, field_answer"):
        _tokenize_entry(tokenizer, {}, field_instruction="q")
    with pytest.raises(ConfigError, match=r"unknown key 'field_questoin'.*did you mean 'field_question'\?"):
        _tokenize_entry(tokenizer, {}, field_questoin="q")


def _tokenize_entry(tokenizer, batch, **entry_keys):
    cfg, pm = build_run_config({"base_model": "m", "datasets": [{"path": "x.jsonl", "type": "qa", **entry_keys}]},
                               plugins=[plait_qa_format])
    return pm.hook.tokenize(cfg=cfg, dataset_cfg=cfg.datasets[0], tokenizer=tokenizer, batch=batch)

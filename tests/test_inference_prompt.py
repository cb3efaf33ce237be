"""`plait inference` prompts a model in the format it was trained with."""

from __future__ import annotations

import pytest

from plait.commands.inference import model_input, prompt_ids
from plait.hookspecs import hookimpl
from plait.testing import build_run_config, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    # a tokenizer with a (chatml) chat template: the template must not win over the trained format
    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def _trained_prompt(cfg, pm, tokenizer, row: dict) -> list[int]:
    """The masked (prompt) tokens of ``row`` as training tokenizes it."""
    out = pm.hook.tokenize(cfg=cfg, dataset_cfg=cfg.datasets[0], tokenizer=tokenizer,
                           batch={k: [v] for k, v in row.items()})
    ids, labels = out["input_ids"][0], out["labels"][0]
    masked = next(i for i, label in enumerate(labels) if label != -100)
    return ids[:masked]


@pytest.mark.parametrize("dataset", [
    {"type": "alpaca"},
    {"type": "alpaca_chat.load_concise"},
    {"type": "user_defined", "format": "Q: {instruction}\nA: ", "system_format": "[{system}] "},
])
def test_an_instruction_trained_model_gets_the_prompt_its_rows_had(tokenizer, dataset):
    cfg, pm = build_run_config({"base_model": "m", "datasets": [{"path": "d.jsonl", **dataset}]})
    messages = [{"role": "user", "content": "Reverse: c a t"}]
    text, special = model_input(cfg, pm, tokenizer, messages, raw=False)
    assert "<|im_start|>" not in text  # not the tokenizer's chat template
    expected = _trained_prompt(cfg, pm, tokenizer, {"instruction": "Reverse: c a t", "output": "t a c"})
    assert prompt_ids(tokenizer, text, special) == expected


def test_alpaca_w_system_uses_the_system_message(tokenizer):
    cfg, pm = build_run_config({"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca_w_system"}]})
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    prompt = prompt_ids(tokenizer, *model_input(cfg, pm, tokenizer, messages, raw=False))
    row = {"instruction": "Name a colour.", "output": "red", "system": "Be brief."}
    assert prompt == _trained_prompt(cfg, pm, tokenizer, row)


def test_a_chat_trained_model_gets_the_chat_template_and_raw_gets_the_text(tokenizer):
    cfg, pm = build_run_config({"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "chat_template"}]})
    messages = [{"role": "user", "content": "hello"}]
    text, special = model_input(cfg, pm, tokenizer, messages, raw=False)
    assert text == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert not special  # the template holds the BOS
    assert model_input(cfg, pm, tokenizer, messages, raw=True) == ("hello", True)


def test_hook_inference_prompt(tokenizer):
    calls = []

    class QuestionFormat:
        @hookimpl
        def dataset_formats(self):
            from plait.registries import DatasetFormat

            return [DatasetFormat("question", lambda cfg, dataset_cfg, tokenizer, batch: None)]

        @hookimpl
        def inference_prompt(self, cfg, dataset_cfg, messages):
            calls.append(dataset_cfg.path)
            return f"QUESTION {messages[-1]['content']} ANSWER" if dataset_cfg.type == "question" else None

    cfg, pm = build_run_config({"base_model": "m", "datasets": [{"path": "q.jsonl", "type": "question"}]},
                               plugins=[QuestionFormat()])
    messages = [{"role": "user", "content": "why?"}]
    assert model_input(cfg, pm, tokenizer, messages, raw=False) == ("QUESTION why? ANSWER", True)
    assert calls == ["q.jsonl"]
    # no plugin answers for a chat dataset: core's default is the chat template
    cfg, pm = build_run_config({"base_model": "m", "datasets": [{"path": "c.jsonl", "type": "chat_template"}]},
                               plugins=[QuestionFormat()])
    assert "<|im_start|>user\nwhy?" in model_input(cfg, pm, tokenizer, messages, raw=False)[0]

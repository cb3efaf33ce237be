"""alpaca, alpaca_chat, alpaca_w_system: Axolotl's prompt text, exact masks."""

import pytest

from plait.errors import BadRowError

WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n"
              "### Instruction:\nsort the words\n\n### Input:\nthe a it\n\n### Response:\n")
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nsort the words\n\n### Response:\n")


def expected(tokenizer, prompt, output, train_prompt=False):
    prompt_ids = tokenizer(prompt)["input_ids"]  # the tokenizer adds its BOS
    output_ids = tokenizer(output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labels = (prompt_ids if train_prompt else [-100] * len(prompt_ids)) + output_ids
    return prompt_ids + output_ids, labels


def test_alpaca_with_input_masks_the_prompt_exactly(tokenizer, run_format):
    out = run_format(tokenizer, {"instruction": ["sort the words"], "input": ["the a it"], "output": ["a it the"]},
                     type="alpaca")
    ids, labels = expected(tokenizer, WITH_INPUT, "a it the")
    assert out["input_ids"][0] == ids
    assert out["labels"][0] == labels
    assert ids[0] == tokenizer.bos_token_id and labels[-1] == tokenizer.eos_token_id
    trained = [t for t, label in zip(ids, labels) if label != -100]
    assert tokenizer.decode(trained) == "a it the<|end_of_text|>"
    assert tokenizer.decode(ids) == "<|begin_of_text|>" + WITH_INPUT + "a it the<|end_of_text|>"


def test_alpaca_without_input_uses_the_no_input_prompt(tokenizer, run_format):
    batch = {"instruction": ["sort the words", "sort the words"], "input": ["", None], "output": ["ok", "ok"]}
    out = run_format(tokenizer, batch, type="alpaca")
    ids, labels = expected(tokenizer, NO_INPUT, "ok")
    assert out["input_ids"] == [ids, ids]
    assert out["labels"] == [labels, labels]


def test_alpaca_train_on_inputs_trains_the_prompt(tokenizer, run_format):
    out = run_format(tokenizer, {"instruction": ["sort the words"], "output": ["ok"]}, type="alpaca",
                     run={"train_on_inputs": True})
    ids, labels = expected(tokenizer, NO_INPUT, "ok", train_prompt=True)
    assert out["labels"][0] == labels == ids


def test_alpaca_field_mappings(tokenizer, run_format):
    out = run_format(tokenizer, {"q": ["sort the words"], "ctx": ["the a it"], "a": ["a it the"]}, type="alpaca",
                     field_instruction="q", field_input="ctx", field_output="a")
    assert out["input_ids"][0] == expected(tokenizer, WITH_INPUT, "a it the")[0]


def test_alpaca_chat_text(tokenizer, run_format):
    out = run_format(tokenizer, {"instruction": ["add 3"], "input": ["4"], "output": ["7"]}, type="alpaca_chat")
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\nUSER: add 3\n4\nASSISTANT:")
    assert (out["input_ids"][0], out["labels"][0]) == expected(tokenizer, prompt, "7")


def test_alpaca_w_system_uses_the_rows_system_text(tokenizer, run_format):
    out = run_format(tokenizer, {"system": ["You sort words."], "instruction": ["sort the words"], "output": ["a"]},
                     type="alpaca_w_system")
    prompt = "You sort words.\n\n### Instruction:\nsort the words\n\n### Response:\n"
    assert (out["input_ids"][0], out["labels"][0]) == expected(tokenizer, prompt, "a")


def test_alpaca_missing_output_names_the_row(tokenizer, run_format):
    with pytest.raises(BadRowError, match="missing field 'output'") as info:
        run_format(tokenizer, {"instruction": ["a", "b"], "output": ["x", None]}, type="alpaca")
    assert info.value.index == 1
    with pytest.raises(BadRowError, match="missing field 'output'.*instruction"):
        run_format(tokenizer, {"instruction": ["a"]}, type="alpaca")

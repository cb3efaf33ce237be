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


CHAT_SYSTEM = ("SYSTEM: Below is an instruction that describes a task, paired with an input that provides further "
               "context. Write a response that appropriately completes the request.\n")
CONCISE = ("SYSTEM: Below is an instruction from a USER that describes a task, paired with an input that provides "
           "further context. The ASSISTANT writes a response that concisely and appropriately completes the "
           "request.\n\n\n")
CONCISE_NO_INPUT = ("SYSTEM: Below is an instruction from a USER that describes a task. The ASSISTANT writes a "
                    "response that appropriately and concisely completes the request.\n\n\n")


@pytest.mark.parametrize("type_name", ["alpaca_chat", "alpaca_chat.load"])
def test_alpaca_chat_text(tokenizer, run_format, type_name):
    # Axolotl's chat style: the system text through "SYSTEM: {system}\n", then USER/ASSISTANT turns
    out = run_format(tokenizer, {"instruction": ["add 3"], "input": ["4"], "output": ["7"]}, type=type_name)
    assert (out["input_ids"][0], out["labels"][0]) == expected(tokenizer, CHAT_SYSTEM + "USER: add 3\n4\nASSISTANT:",
                                                               "7")


@pytest.mark.parametrize("type_name, batch, prompts", [
    ("alpaca_chat.load_concise", {"instruction": ["add 3", "add 5"], "input": ["4", ""], "output": ["7", "?"]},
     [CONCISE + "USER: add 3\n4\nASSISTANT:", CONCISE_NO_INPUT + "USER: add 5\nASSISTANT:"]),
    ("alpaca_chat.load_no_prompt", {"instruction": ["add 3", "add 5"], "input": ["4", None], "output": ["7", "?"]},
     ["USER: add 3\n4\nASSISTANT:", "USER: add 5\nASSISTANT:"]),
    ("alpaca_chat.load_qa", {"question": ["add 3"], "answer": ["7"], "input": ["ignored"]},
     [CONCISE_NO_INPUT + "USER: add 3\nASSISTANT:"]),
    ("alpaca_chat.load_camel_ai", {"message_1": ["add 3"], "message_2": ["7"]},
     [CONCISE_NO_INPUT + "USER: add 3\nASSISTANT:"]),
])
def test_alpaca_chat_variants_have_their_own_text(tokenizer, run_format, type_name, batch, prompts):
    out = run_format(tokenizer, batch, type=type_name)
    outputs = batch.get("output") or batch.get("answer") or batch.get("message_2")
    assert [(i, lab) for i, lab in zip(out["input_ids"], out["labels"])] == [
        expected(tokenizer, prompt, output) for prompt, output in zip(prompts, outputs)]


@pytest.mark.parametrize("type_name", ["alpaca_w_system", "alpaca_w_system.load", "alpaca_w_system.load_chat"])
def test_alpaca_w_system_uses_the_rows_system_text(tokenizer, run_format, type_name):
    # Axolotl's alpaca_w_system loads with the chat style: "SYSTEM: {system}\n", then the chat turn
    batch = {"system": ["You sort words.", "", None], "instruction": ["sort the words"] * 3, "input": ["b a", "", ""],
             "output": ["a b", "ok", "ok"]}
    out = run_format(tokenizer, batch, type=type_name)
    prompts = ["SYSTEM: You sort words.\nUSER: sort the words\nb a\nASSISTANT:",
               "USER: sort the words\nASSISTANT:", "USER: sort the words\nASSISTANT:"]  # no system: none rendered
    assert list(zip(out["input_ids"], out["labels"])) == [expected(tokenizer, p, o)
                                                          for p, o in zip(prompts, ["a b", "ok", "ok"])]


def test_alpaca_w_system_falls_back_to_the_datasets_system_prompt(tokenizer, run_format):
    out = run_format(tokenizer, {"instruction": ["sort"], "output": ["a"]}, type="alpaca_w_system",
                     system_prompt="Be brief.")
    assert out["input_ids"][0] == expected(tokenizer, "SYSTEM: Be brief.\nUSER: sort\nASSISTANT:", "a")[0]


def test_alpaca_w_system_instruct_and_open_orca_variants(tokenizer, run_format):
    out = run_format(tokenizer, {"system": ["You sort words."], "instruction": ["sort the words"], "output": ["a"]},
                     type="alpaca_w_system.load_instruct")
    prompt = "You sort words.\n\n### Instruction:\nsort the words\n\n### Response:\n"
    assert (out["input_ids"][0], out["labels"][0]) == expected(tokenizer, prompt, "a")
    orca = {"system_prompt": ["Think first."], "question": ["2+2?"], "response": ["4"]}
    out = run_format(tokenizer, orca, type="alpaca_w_system.load_open_orca")
    prompt = "### System:\nThink first.\n### Human:\n2+2?\n### Assistant:\n"
    assert (out["input_ids"][0], out["labels"][0]) == expected(tokenizer, prompt, "4")
    out = run_format(tokenizer, orca, type="alpaca_w_system.load_open_orca_chatml")
    prompt = ("<|im_start|>system\nThink first.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
              "<|im_start|>assistant\n")
    assert (out["input_ids"][0], out["labels"][0]) == expected(tokenizer, prompt, "4")


@pytest.mark.parametrize("type_name, accepted, suggestion", [
    ("alpaca_chat.load_concize", "alpaca_chat, alpaca_chat.load, alpaca_chat.load_concise", "alpaca_chat.load_concise"),
    # alpaca's variants are Axolotl's prompt styles, after a colon
    ("alpaca.whatever", "accepted: alpaca, alpaca:instruct, alpaca:chat, alpaca:chatml, alpaca:phi\n", None),
    ("alpaca.chat", "accepted: alpaca, alpaca:instruct", "alpaca:chat"),
    ("alpaca:chatlm", "accepted: alpaca, alpaca:instruct", "alpaca:chatml"),
    ("alpaca_w_system.load_mistral", "alpaca_w_system.load_open_orca_chatml", None),
    ("completion.load", "(completion has no variants); did you mean 'completion'?\naccepted: completion\n",
     "completion"),
    # chat_template.default is plait-preference's (chosen/rejected pairs); any other variant is refused
    ("chat_template.sharegpt", "accepted: chat_template\n", "chat_template"),
])
def test_unknown_variants_fail_at_config_validation(type_name, accepted, suggestion):
    from plait.errors import ConfigError
    from plait.testing import build_run_config

    with pytest.raises(ConfigError) as info:
        build_run_config({"base_model": "unused", "datasets": [{"path": "a.jsonl", "type": "alpaca"},
                                                               {"path": "b.jsonl", "type": type_name}]})
    message = str(info.value) + "\n"
    assert message.startswith(f"config key 'datasets.1.type' (dataset 'b.jsonl'): {type_name!r} is not accepted")
    assert accepted in message
    assert (f"did you mean {suggestion!r}?" in message) if suggestion else ("did you mean" not in message)


def test_a_variant_another_plugin_declares_is_left_to_it():
    from plait import hookimpl
    from plait.registries import DatasetFormat
    from plait.testing import build_run_config

    class Mine:
        @hookimpl
        def dataset_formats():
            return [DatasetFormat("chat_template.mine", lambda cfg, dataset_cfg, tokenizer, batch: None)]

    cfg, _ = build_run_config({"base_model": "unused", "datasets": [{"path": "a.jsonl", "type": "chat_template.mine"}]},
                              plugins=[Mine])
    assert cfg.datasets[0].type == "chat_template.mine"


def test_alpaca_missing_output_names_the_row(tokenizer, run_format):
    with pytest.raises(BadRowError, match="missing field 'output'") as info:
        run_format(tokenizer, {"instruction": ["a", "b"], "output": ["x", None]}, type="alpaca")
    assert info.value.index == 1
    with pytest.raises(BadRowError, match="missing field 'output'.*instruction"):
        run_format(tokenizer, {"instruction": ["a"]}, type="alpaca")


@pytest.mark.parametrize("type_value", ["alpaca", "alpaca_chat", "alpaca_w_system"])
def test_registered_prompt_is_the_masked_part_of_a_tokenized_row(tokenizer, run_format, type_value):
    """The registry's ``prompt`` (``plait quickstart`` scores with it) is the
    text the format trains the output after: its tokens are exactly the masked
    prefix of the row the format's ``tokenize`` builds."""
    from plait.registries import find_format
    from plait.testing import build_run_config

    _, pm = build_run_config({"base_model": "unused", "datasets": [{"path": "rows.jsonl", "type": type_value}]})
    row = {"instruction": "sort the words", "input": "the a it"}
    prompt = find_format(pm, type_value).prompt(type_value, row)
    out = run_format(tokenizer, {**{k: [v] for k, v in row.items()}, "output": ["a it the"]}, type=type_value)
    masked = [t for t, label in zip(out["input_ids"][0], out["labels"][0]) if label == -100]
    assert masked == tokenizer(prompt)["input_ids"]
    assert "sort the words" in prompt and "the a it" in prompt

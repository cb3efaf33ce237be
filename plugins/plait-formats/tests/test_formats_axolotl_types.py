"""Axolotl's other instruction types: ``base:style`` (alpaca:chat, alpaca:phi, ...),
gpteacher, oasst, alpaca_instruct, orcamini, context_qa, metharme. Prompt text
written out by hand from Axolotl's prompters; the prompt is masked, the output and
EOS trained (everything with train_on_inputs). Types Axolotl has and Plait lacks are
refused by name with what to use instead."""

import pytest

SYSTEM = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.")
SYSTEM_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.")
ROW = {"instruction": ["sort the words"], "input": ["the a it"], "output": ["a it the"]}
ROW_NO_INPUT = {"instruction": ["sort the words"], "input": [""], "output": ["a it the"]}


def expected(tokenizer, prompt, output, eos_count=1, train_prompt=False):
    prompt_ids = tokenizer(prompt)["input_ids"]  # the tokenizer adds its BOS
    output_ids = tokenizer(output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * eos_count
    return prompt_ids + output_ids, (prompt_ids if train_prompt else [-100] * len(prompt_ids)) + output_ids


def check(tokenizer, run_format, batch, prompt, output, eos_count=1, **entry):
    out = run_format(tokenizer, batch, **entry)
    assert (out["input_ids"][0], out["labels"][0]) == expected(tokenizer, prompt, output, eos_count)


@pytest.mark.parametrize("type_name, batch, prompt", [
    ("alpaca:chat", ROW, f"SYSTEM: {SYSTEM}\nUSER: sort the words\nthe a it\nASSISTANT:"),
    ("alpaca:chat", ROW_NO_INPUT, f"SYSTEM: {SYSTEM_NO_INPUT}\nUSER: sort the words\nASSISTANT:"),
    ("alpaca:instruct", ROW,
     f"{SYSTEM}\n\n### Instruction:\nsort the words\n\n### Input:\nthe a it\n\n### Response:\n"),
    ("alpaca:chatml", ROW, f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nsort the words\nthe a it"
                           "<|im_end|>\n<|im_start|>assistant\n"),
    # Axolotl's phi style: the input follows <|end|> directly, the no-input turn has newlines
    ("alpaca:phi", ROW, f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\nsort the words<|end|>the a it<|assistant|>"),
    ("alpaca:phi", ROW_NO_INPUT, f"<|system|>\n{SYSTEM_NO_INPUT}<|end|>\n<|user|>\nsort the words<|end|>\n"
                                 "<|assistant|>\n"),
    ("alpaca_instruct.load_no_prompt", ROW, "### Instruction:\nsort the words\n\n### Input:\nthe a it\n\n"
                                            "### Response:\n"),
    ("gpteacher:chat", {"instruction": ["sort the words"], "response": ["a it the"]},
     f"SYSTEM: {SYSTEM_NO_INPUT}\nUSER: sort the words\nASSISTANT:"),
    ("oasst", {"INSTRUCTION": ["sort the words"], "RESPONSE": ["a it the"]},
     f"{SYSTEM_NO_INPUT}\n\n### Instruction:\nsort the words\n\n### Response:\n"),
    ("orcamini", {"system_prompt": ["be brief"], "question": ["sort the words"], "response": ["a it the"]},
     "### System:\nbe brief\n\n### User:\nsort the words\n\n### Response:\n"),
    ("orcamini", {"question": ["sort the words"], "response": ["a it the"]},
     "### System:\n\n\n### User:\nsort the words\n\n### Response:\n"),
])
def test_prompt_text_and_mask(tokenizer, run_format, type_name, batch, prompt):
    check(tokenizer, run_format, batch, prompt, "a it the", type=type_name)


def test_alpaca_chat_colon_is_alpaca_chat(tokenizer, run_format):
    assert run_format(tokenizer, ROW, type="alpaca:chat") == run_format(tokenizer, ROW, type="alpaca_chat")
    assert run_format(tokenizer, ROW, type="alpaca:instruct") == run_format(tokenizer, ROW, type="alpaca")


CONTEXT = "Use the following contextual information to concisely answer the question.\n"


def test_context_qa_variants(tokenizer, run_format):
    batch = {"article": ["cats sleep"], "question": ["do cats sleep"], "answer": ["yes"]}
    check(tokenizer, run_format, batch, f"SYSTEM: {CONTEXT}\nUSER: cats sleep\n===\ndo cats sleep\nASSISTANT:", "yes",
          type="context_qa")
    check(tokenizer, run_format, {"article": ["cats sleep"], "unanswerable_question": ["do dogs fly"]},
          f"SYSTEM: {CONTEXT}\nUSER: cats sleep\n===\ndo dogs fly\nASSISTANT:",
          "The context provided does not contain any information about your inquiry. Therefore, I'm unable to "
          "answer your question based on the given context.", type="context_qa.load_404")
    check(tokenizer, run_format, {"context": ["cats sleep"], "question": ["do cats sleep"], "answer": ["yes"]},
          "Context: cats sleep\nQuestion: do cats sleep\n", "Answer: yes", type="context_qa.load_v2")


def test_metharme_trains_the_generation_and_three_eos(tokenizer, run_format):
    batch = {"prompt": ["<|user|>hi<|model|>"], "generation": ["hello"]}
    check(tokenizer, run_format, batch, "<|user|>hi<|model|>", "hello", eos_count=3, type="metharme")
    # a generation already ending with EOS gets two more, three in all
    ended = {"prompt": ["<|user|>hi<|model|>"], "generation": ["hello<|end_of_text|>"]}
    check(tokenizer, run_format, ended, "<|user|>hi<|model|>", "hello", eos_count=3, type="metharme")


def test_train_on_inputs_trains_the_prompt(tokenizer, run_format):
    out = run_format(tokenizer, ROW, type="alpaca:phi", run={"train_on_inputs": True})
    assert out["labels"][0] == out["input_ids"][0]


@pytest.mark.parametrize("type_name, reason", [
    ("alpaca:vicuna", "'alpaca:vicuna' is not accepted (it is not a variant of alpaca that plait-formats knows)"),
    ("sharegpt:chat", "use type: chat_template"),
    ("creative_acr.load_answer", "type: user_defined"),
    ("jeopardy:chat", "type: user_defined"),
    ("rwd.gsm8k_transform", "a Python data transform of your own"),
    ("ebft_opencode.transform", "EBFT trainer"),
])
def test_axolotl_types_plait_lacks_are_refused_by_name(type_name, reason):
    from plait.errors import ConfigError
    from plait.testing import build_run_config

    with pytest.raises(ConfigError) as info:
        build_run_config({"base_model": "unused", "datasets": [{"path": "a.jsonl", "type": type_name}]})
    assert f"{type_name!r}" in str(info.value) and reason in str(info.value)


def test_a_typo_still_gets_a_did_you_mean():
    from plait.errors import ConfigError
    from plait.testing import build_run_config

    with pytest.raises(ConfigError, match="'orcamimi' is not a known dataset type; did you mean 'orcamini'"):
        build_run_config({"base_model": "unused", "datasets": [{"path": "a.jsonl", "type": "orcamimi"}]})


def test_pygmalion_pieces_and_mask(tokenizer, run_format):
    row = [{"role": "system", "value": "a cat\n<START>"}, {"role": "human", "value": " hi "},
           {"role": "bot", "value": "meow"}]
    out = run_format(tokenizer, {"conversations": [row]}, type="pygmalion")
    system = tokenizer("<|system|>Persona: a cat")["input_ids"]  # with BOS
    human = tokenizer("<|user|> hi", add_special_tokens=False)["input_ids"]
    prefix = tokenizer("<|model|>", add_special_tokens=False)["input_ids"]
    bot = tokenizer("<|model|> meow", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert out["input_ids"][0] == system + human + bot
    assert out["labels"][0] == [-100] * (len(system) + len(human) + len(prefix)) + bot[len(prefix):]
    assert tokenizer.decode(bot[len(prefix):]) == " meow<|end_of_text|>"


def test_llama2_chat_layout_and_mask(tokenizer, run_format):
    row = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
           {"from": "human", "value": "bye"}, {"from": "gpt", "value": "ciao"}]
    out = run_format(tokenizer, {"conversations": [row]}, type="llama2_chat")
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert tokenizer.decode(ids) == ("<|begin_of_text|>[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhi [/INST] hello"
                                     "<|end_of_text|><|begin_of_text|>[INST] bye [/INST] ciao<|end_of_text|>")
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            current.append(token)
        elif current:
            runs, current = runs + [tokenizer.decode(current)], []
    runs += [tokenizer.decode(current)] if current else []
    assert runs == [" hello<|end_of_text|>", " ciao<|end_of_text|>"]
    # no system message: Llama 2's default one
    out = run_format(tokenizer, {"conversations": [row[1:3]]}, type="llama2_chat")
    assert "<<SYS>>\nYou are a helpful, respectful and honest assistant." in tokenizer.decode(out["input_ids"][0])


def test_llama2_chat_takes_no_template_keys():
    from plait.errors import ConfigError
    from plait.testing import build_run_config

    with pytest.raises(ConfigError, match="unknown key 'chat_template'.*it is a key of format 'chat_template'"):
        build_run_config({"base_model": "unused", "datasets": [{"path": "a.jsonl", "type": "llama2_chat",
                                                                "chat_template": "chatml"}]})

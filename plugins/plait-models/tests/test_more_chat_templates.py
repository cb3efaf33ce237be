"""Axolotl's remaining chat-template names (plait_models.families._more_templates):
hand-written renderings of representative ones, and for every one, through
plait-formats' real ``chat_template`` format on a tiny tokenizer, labels that
train exactly the assistant turns and their end markers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from plait_models.families._more_templates import (COHERE_TOKENS, COMMAND_A_TOKENS, EXAONE_TOKENS, GEMMA3N_TOKENS,
                                                   GEMMA4_TOKENS, JAMBA_TOKENS, METHARME_TOKENS, MISTRAL_V7_TOKENS,
                                                   MORE_CHAT_TEMPLATES)
from plait_models.families._common import CHATML_TOKENS, LLAMA3_TOKENS

# the shared conversation and helpers (pytest's importlib mode does not put tests/ on sys.path)
sys.path.insert(0, str(Path(__file__).parent))
from chat_template_cases import CONVERSATION, formats_helpers  # noqa: E402

EOS = "<|end_of_text|>"  # the kit tokenizer's EOS

#: name -> the text of each run of trained tokens, written by hand from the family's format
TRAINED_RUNS = {
    "cohere": ["the words are sorted.<|END_OF_TURN_TOKEN|>", "the sum is 7<|END_OF_TURN_TOKEN|>"],
    "aya": ["the words are sorted.<|END_OF_TURN_TOKEN|>", "the sum is 7<|END_OF_TURN_TOKEN|>"],
    **{name: ["the words are sorted.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
              "the sum is 7<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"]
       for name in ("command_a", "command_a_tool_use", "command_a_rag")},
    "exaone": ["the words are sorted.[|endofturn|]", "the sum is 7[|endofturn|]"],
    "exaone4": ["the words are sorted.[|endofturn|]", "the sum is 7[|endofturn|]"],
    "gemma3n": ["the words are sorted.<end_of_turn>", "the sum is 7<end_of_turn>"],
    "gemma4": ["the words are sorted.<turn|>", "the sum is 7<turn|>"],
    "gemma4_unified": ["the words are sorted.<turn|>", "the sum is 7<turn|>"],
    "jamba": [" the words are sorted.<|eom|>", " the sum is 7<|eom|>"],
    "metharme": [f"the words are sorted.{EOS}", f"the sum is 7{EOS}"],
    "nemotron_h": ["the words are sorted.<|im_end|>", "the sum is 7<|im_end|>"],
    "llama3_2_vision": ["the words are sorted.<|eot_id|>", "the sum is 7<|eot_id|>"],
    "mistral_v2v3": [f" the words are sorted.{EOS}", f" the sum is 7{EOS}"],
    "mistral_v7_tekken": [f"the words are sorted.{EOS}", f"the sum is 7{EOS}"],
    "pixtral": [f"the words are sorted.{EOS}", f"the sum is 7{EOS}"],
}
MARKERS = sorted(set(COHERE_TOKENS + COMMAND_A_TOKENS + EXAONE_TOKENS + GEMMA3N_TOKENS + GEMMA4_TOKENS + JAMBA_TOKENS
                     + METHARME_TOKENS + MISTRAL_V7_TOKENS + CHATML_TOKENS + LLAMA3_TOKENS))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The kit's tiny tokenizer with every family's markers as special tokens."""
    from transformers import AutoTokenizer

    from plait.testing import make_tiny_tokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300))
    tok.add_tokens(MARKERS, special_tokens=True)
    return tok


def _render(name, messages, add_generation_prompt=False, tools=None, **variables):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(MORE_CHAT_TEMPLATES[name]).render(
        messages=messages, tools=tools, bos_token="<s>", eos_token="</s>", add_generation_prompt=add_generation_prompt,
        **variables)


def _trained_runs(tokenizer, ids, labels) -> list[str]:
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_every_axolotl_name_is_registered(pm):
    from plait.chat_templates import named_chat_templates

    names = named_chat_templates(pm)
    assert set(TRAINED_RUNS) == set(MORE_CHAT_TEMPLATES)
    assert all(names[name] == MORE_CHAT_TEMPLATES[name] for name in MORE_CHAT_TEMPLATES)


def test_cohere_renders_command_r_turns():
    assert _render("cohere", CONVERSATION[:3], add_generation_prompt=False) == (
        "<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>be brief<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>sort the words<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>the words are sorted.<|END_OF_TURN_TOKEN|>")
    assert _render("cohere", CONVERSATION[1:2], add_generation_prompt=True) == (
        "<s><|START_OF_TURN_TOKEN|><|USER_TOKEN|>sort the words<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>")


def test_gemma4_turns_system_thinking_and_reasoning():
    answer = {"role": "assistant", "content": "the sum is 7", "reasoning_content": "3 plus 4"}
    assert _render("gemma4", [*CONVERSATION[:2], answer]) == (
        "<s><|turn>system\nbe brief<turn|>\n<|turn>user\nsort the words<turn|>\n"
        "<|turn>model\n<|channel>thought\n3 plus 4\n<channel|>the sum is 7<turn|>\n")
    assert _render("gemma4", CONVERSATION[1:2], add_generation_prompt=True, enable_thinking=True) == (
        "<s><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nsort the words<turn|>\n<|turn>model\n")
    assert _render("gemma4", CONVERSATION[1:2], add_generation_prompt=True).endswith(
        "<|turn>model\n<|channel>thought\n<channel|>")


def test_mistral_v2v3_puts_the_system_text_before_the_last_user_message():
    assert _render("mistral_v2v3", CONVERSATION) == (
        "<s>[INST] sort the words[/INST] the words are sorted.</s>"
        "[INST] be brief\n\nadd 3 and 4[/INST] the sum is 7</s>")
    # a prefix told where the conversation ends renders as the start of the whole
    assert _render("mistral_v2v3", CONVERSATION[:3], real_last_index=4) == (
        "<s>[INST] sort the words[/INST] the words are sorted.</s>")


def test_exaone_and_metharme_defaults():
    assert _render("exaone", CONVERSATION[1:3]) == (
        "[|system|][|endofturn|]\n[|user|]sort the words\n[|assistant|]the words are sorted.[|endofturn|]\n")
    assert _render("metharme", CONVERSATION[1:3], add_generation_prompt=False).startswith(
        "<s><|system|>Enter RP mode.")
    assert _render("metharme", CONVERSATION[:3]) == (
        "<s><|system|>be brief<|user|>sort the words<|model|>the words are sorted.</s>")


def test_image_parts_render_as_placeholders():
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it"}]}
    assert _render("pixtral", [message]) == "<s>[INST][IMG]what is it[/INST]"
    assert _render("gemma3n", [message]) == "<s><start_of_turn>user\n<image_soft_token>what is it<end_of_turn>\n"
    assert _render("llama3_2_vision", [message]) == (
        "<s><|start_header_id|>user<|end_header_id|>\n\n<|image|>what is it<|eot_id|>")


@pytest.mark.parametrize("name", sorted(TRAINED_RUNS))
def test_labels_train_exactly_the_assistant_turns(tokenizer, name):
    helpers = formats_helpers()
    out = helpers.run_format(tokenizer, {"messages": [CONVERSATION]}, type="chat_template", chat_template=name)
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert _trained_runs(tokenizer, ids, labels) == TRAINED_RUNS[name]
    # the system and user texts are in the row, untrained
    text = tokenizer.decode(ids)
    assert "be brief" in text and "add 3 and 4" in text


def test_gemma4_reasoning_is_trained_with_the_answer(tokenizer):
    helpers = formats_helpers()
    answer = {"role": "assistant", "content": "the sum is 7", "reasoning_content": "3 plus 4"}
    out = helpers.run_format(tokenizer, {"messages": [[*CONVERSATION[:2], answer]]}, type="chat_template",
                             chat_template="gemma4")
    assert _trained_runs(tokenizer, out["input_ids"][0], out["labels"][0]) == [
        "3 plus 4\n<channel|>the sum is 7<turn|>"]


@pytest.mark.parametrize("name", ["cohere", "gemma3n", "pixtral"])
def test_turns_that_do_not_alternate_are_a_bad_row(tokenizer, name):
    from plait.errors import BadRowError

    helpers = formats_helpers()
    with pytest.raises(BadRowError, match=f"{name} takes an optional system message first"):
        helpers.run_format(tokenizer, {"messages": [CONVERSATION[:2] + CONVERSATION[3:4]]}, type="chat_template",
                           chat_template=name)


def test_tools_are_refused_by_name(tokenizer):
    from plait.errors import BadRowError

    helpers = formats_helpers()
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    with pytest.raises(BadRowError, match="cohere here takes conversations without tool definitions"):
        helpers.run_format(tokenizer, {"messages": [CONVERSATION], "tools": [tools]}, type="chat_template",
                           chat_template="cohere")


def test_exaone4_reasoning_of_every_turn_is_trained(tokenizer):
    # inline <think> blocks (Axolotl's way of writing reasoning into the content) in two turns
    helpers = formats_helpers()
    conversation = [CONVERSATION[1], {"role": "assistant", "content": "<think>\nsorting\n</think>\n\nthe words"},
                    CONVERSATION[3], {"role": "assistant", "content": "<think>\nadding\n</think>\n\nseven"}]
    assert _render("exaone4", conversation) == (
        "[|user|]\nsort the words[|endofturn|]\n[|assistant|]\n<think>\nsorting\n</think>\n\nthe words[|endofturn|]\n"
        "[|user|]\nadd 3 and 4[|endofturn|]\n[|assistant|]\n<think>\nadding\n</think>\n\nseven[|endofturn|]\n")
    out = helpers.run_format(tokenizer, {"messages": [conversation]}, type="chat_template", chat_template="exaone4",
                             split_thinking=True)
    assert _trained_runs(tokenizer, out["input_ids"][0], out["labels"][0]) == [
        "sorting\n</think>\n\nthe words[|endofturn|]", "adding\n</think>\n\nseven[|endofturn|]"]


def test_a_system_message_given_as_parts():
    system = {"role": "system", "content": [{"type": "text", "text": "be brief"}]}
    assert _render("gemma4", [system, CONVERSATION[1]]).startswith("<s><|turn>system\nbe brief<turn|>\n")
    assert _render("pixtral", [system, CONVERSATION[1]]) == "<s>[INST]be brief\n\nsort the words[/INST]"


def test_exaone4_tools_calls_and_results(tokenizer):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 3}}}]}
    conversation = [CONVERSATION[3], call, {"role": "tool", "content": "7"}, CONVERSATION[4]]
    text = _render("exaone4", conversation, tools=tools)
    assert text.startswith('[|system|]\n# Available Tools\n')
    assert '<tool>{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}</tool>\n' in text
    assert text.endswith(
        "[|endofturn|]\n[|user|]\nadd 3 and 4[|endofturn|]\n"
        '[|assistant|]\n<think>\n\n</think>\n\n<tool_call>{"name": "add", "arguments": {"a": 3}}</tool_call>'
        '[|endofturn|]\n[|tool|]\n<tool_result>{"result": "7"}</tool_result>[|endofturn|]\n'
        "[|assistant|]\n<think>\n\n</think>\n\nthe sum is 7[|endofturn|]\n")
    helpers = formats_helpers()
    out = helpers.run_format(tokenizer, {"messages": [conversation], "tools": [tools]}, type="chat_template",
                             chat_template="exaone4")
    assert _trained_runs(tokenizer, out["input_ids"][0], out["labels"][0]) == [
        '<tool_call>{"name": "add", "arguments": {"a": 3}}</tool_call>[|endofturn|]', "the sum is 7[|endofturn|]"]

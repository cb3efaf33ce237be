"""Family templates under Axolotl's names, through the ``chat_templates`` hook.

The masks are checked token by token with plait-formats' own test helpers
(``run_format``, ``pieces_to_row`` in its tests' conftest), loaded by path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import plait_models
from plait_models.families._common import (ALPACA, CHATML_TOKENS, DEEPSEEK_TOKENS, DEEPSEEK_V2, DEEPSEEK_V3, FALCON_H1,
                                          GEMMA, GEMMA_TOKENS, LLAMA4, LLAMA4_TOKENS, MISTRAL_V1, MISTRAL_V3_TEKKEN, PHI3,
                                          PHI3_TOKENS, PHI35, QWEN3, QWEN25, QWEN25_DEFAULT_SYSTEM)

# the shared conversation and helpers (pytest's importlib mode does not put tests/ on sys.path)
sys.path.insert(0, str(Path(__file__).parent))
from chat_template_cases import CONVERSATION, formats_helpers  # noqa: E402


def _tokenizer_dir(tmp_path, markers, chat_template=None):
    """The kit's tiny tokenizer with a family's turn markers as special tokens."""
    from transformers import AutoTokenizer

    from plait.testing import make_tiny_tokenizer

    path = make_tiny_tokenizer(tmp_path / "tok", vocab_size=300, chat_template=chat_template)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens(list(markers), special_tokens=True)
    tokenizer.save_pretrained(path)
    return str(path)


def _assert_mask(tokenizer, messages, pieces, **dataset_keys):
    """Format ``messages`` as one ``chat_template`` row and check its tokens and
    labels against ``pieces`` (``(text, trained)`` runs); returns ``(ids, labels)``."""
    helpers = formats_helpers()
    out = helpers.run_format(tokenizer, {"messages": [messages]}, type="chat_template", **dataset_keys)
    ids, labels = helpers.pieces_to_row(tokenizer, pieces)
    assert out["input_ids"][0] == ids
    assert out["labels"][0] == labels
    return ids, labels


def _load_tokenizer(base, chat_template):
    """The run's tokenizer as ``plait train`` loads it, with core and plait-models only."""
    from plait.config import build_config
    from plait.testing import plugin_manager

    pm = plugin_manager(plait_models, entry_points=False)
    cfg = build_config(pm, {"base_model": base, "chat_template": chat_template})
    return pm.hook.load_tokenizer(cfg=cfg)


def test_axolotl_names_select_the_family_templates(pm):
    from plait.chat_templates import named_chat_templates

    names = named_chat_templates(pm)
    assert {"gemma": GEMMA, "gemma3": GEMMA, "phi_3": PHI3, "phi_35": PHI35, "qwen_25": QWEN25,
            "qwen3": QWEN3, "qwen3_5": QWEN3, "mistral_v1": MISTRAL_V1, "mistral_v3_tekken": MISTRAL_V3_TEKKEN, "alpaca": ALPACA,
            "deepseek_v2": DEEPSEEK_V2, "deepseek_v3": DEEPSEEK_V3, "falcon_h1": FALCON_H1,
            "llama4": LLAMA4}.items() <= names.items()
    assert {"chatml", "llama3"} <= set(names)  # core's, with no clash from the family CHATML/LLAMA3


@pytest.mark.parametrize("name, template, markers", [("gemma", GEMMA, GEMMA_TOKENS), ("phi_3", PHI3, PHI3_TOKENS)])
def test_names_and_fallback_through_load_tokenizer(tmp_path, name, template, markers):
    from plait.testing import CHATML_TEMPLATE

    bare = _tokenizer_dir(tmp_path / "bare", markers)
    own = _tokenizer_dir(tmp_path / "own", markers, chat_template=CHATML_TEMPLATE)
    assert _load_tokenizer(bare, name).chat_template == template
    assert _load_tokenizer(own, name).chat_template == template
    assert _load_tokenizer(bare, f"tokenizer_default_fallback_{name}").chat_template == template
    assert _load_tokenizer(own, f"tokenizer_default_fallback_{name}").chat_template == CHATML_TEMPLATE


def test_unknown_name_lists_the_family_names(tmp_path):
    from plait.errors import ConfigError

    with pytest.raises(ConfigError, match="'gemma_3' is not a known template; did you mean 'gemma3'") as info:
        _load_tokenizer(_tokenizer_dir(tmp_path, GEMMA_TOKENS), "gemma_3")
    assert all(name in str(info.value) for name in ("chatml", "llama3", "gemma", "gemma3", "phi_3"))


@pytest.mark.parametrize("where", ["run", "dataset"])
def test_gemma_multi_turn_mask(tmp_path, where):
    # Gemma calls the assistant "model"; its content and each <end_of_turn> after it are trained.
    # The name works as the run's chat_template and as one dataset's own chat_template.
    run_template, dataset_keys = ("gemma", {}) if where == "run" else ("chatml", {"chat_template": "gemma"})
    tokenizer = _load_tokenizer(_tokenizer_dir(tmp_path, GEMMA_TOKENS), run_template)
    ids, labels = _assert_mask(tokenizer, CONVERSATION[1:], [
        ("<|begin_of_text|><start_of_turn>user\nsort the words<end_of_turn>\n<start_of_turn>model\n", False),
        ("the words are sorted.", True),
        ("<end_of_turn>", True),
        ("\n<start_of_turn>user\nadd 3 and 4<end_of_turn>\n<start_of_turn>model\n", False),
        ("the sum is 7", True),
        ("<end_of_turn>", True),
        ("\n", False),
    ], **dataset_keys)
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert sum(1 for t, label in zip(ids, labels) if t == end and label == end) == 2


def test_phi_3_multi_turn_mask_with_system(tmp_path):
    tokenizer = _load_tokenizer(_tokenizer_dir(tmp_path, PHI3_TOKENS), "tokenizer_default_fallback_phi_3")
    _assert_mask(tokenizer, CONVERSATION, [
        ("<|begin_of_text|><|system|>\nbe brief<|end|>\n<|user|>\nsort the words<|end|>\n<|assistant|>\n", False),
        ("the words are sorted.", True),
        ("<|end|>", True),
        ("\n<|user|>\nadd 3 and 4<|end|>\n<|assistant|>\n", False),
        ("the sum is 7", True),
        ("<|end|>", True),
        ("\n", False),
    ])


def _render(template, messages, tools=None, add_generation_prompt=False):
    """``template``'s text in transformers' own jinja environment, as plait-formats renders it."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template).render(messages=messages, tools=tools, bos_token="<s>",
                                                    eos_token="</s>", add_generation_prompt=add_generation_prompt)


def test_qwen_25_opens_with_the_default_system_turn():
    text = _render(QWEN25, CONVERSATION[1:3], add_generation_prompt=True)
    assert text == (f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nsort the words<|im_end|>\n<|im_start|>assistant\nthe words are sorted.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # a conversation's own system message replaces the default, once
    assert _render(QWEN25, CONVERSATION[:2]) == ("<|im_start|>system\nbe brief<|im_end|>\n"
                                                 "<|im_start|>user\nsort the words<|im_end|>\n")


def test_qwen_25_tools_calls_and_responses():
    """Tools as JSON lines in the system turn; a call with and without text
    (OpenAI-style ``function`` wrapper or flat); consecutive tool results in one user turn."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "add 3 and 4, then 5 and 6"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 3, "b": 4}}},
            {"name": "add", "arguments": {"a": 5, "b": 6}}]},
        {"role": "tool", "content": "7"},
        {"role": "tool", "content": "11"},
        {"role": "assistant", "content": "7 and 11"},
    ]
    assert _render(QWEN25, messages, tools) == (
        f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nadd 3 and 4, then 5 and 6<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 5, "b": 6}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n7\n</tool_response>\n<tool_response>\n11\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n7 and 11<|im_end|>\n")


def test_phi_35_has_no_bos_and_skips_an_empty_system_message():
    messages = [{"role": "system", "content": ""}, *CONVERSATION[1:3]]
    assert _render(PHI35, messages, add_generation_prompt=True) == (
        "<|user|>\nsort the words<|end|>\n<|assistant|>\nthe words are sorted.<|end|>\n<|assistant|>\n")
    assert _render(PHI35, CONVERSATION[:1]) == "<|system|>\nbe brief<|end|>\n"


def test_mistral_v1_spacing_and_refusals():
    assert _render(MISTRAL_V1, CONVERSATION[1:]) == (
        "<s> [INST] sort the words [/INST] the words are sorted.</s> [INST] add 3 and 4 [/INST] the sum is 7</s>")
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match="user and assistant roles only, got system"):
        _render(MISTRAL_V1, CONVERSATION)
    with pytest.raises(TemplateError, match="alternate"):
        _render(MISTRAL_V1, [CONVERSATION[1], CONVERSATION[1]])
    assert _render(MISTRAL_V3_TEKKEN, CONVERSATION[1:]) == (
        "<s>[INST]sort the words[/INST]the words are sorted.</s>[INST]add 3 and 4[/INST]the sum is 7</s>")
    with pytest.raises(TemplateError, match="mistral_v3_tekken has user and assistant roles only"):
        _render(MISTRAL_V3_TEKKEN, CONVERSATION)


def test_qwen_25_mask_trains_the_answers_only(tmp_path):
    # the default system turn is part of the first prompt, never trained
    tokenizer = _load_tokenizer(_tokenizer_dir(tmp_path, CHATML_TOKENS), "qwen_25")
    _assert_mask(tokenizer, CONVERSATION[1:], [
        (f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}<|im_end|>\n"
         "<|im_start|>user\nsort the words<|im_end|>\n<|im_start|>assistant\n", False),
        ("the words are sorted.", True),
        ("<|im_end|>", True),
        ("\n<|im_start|>user\nadd 3 and 4<|im_end|>\n<|im_start|>assistant\n", False),
        ("the sum is 7", True),
        ("<|im_end|>", True),
        ("\n", False),
    ])


def test_qwen3_reasoning_after_the_last_query_only():
    """The final answer always gets a <think> block (empty without reasoning);
    an answer before the last user query loses its reasoning; reasoning_content
    or a <think>...</think> text prefix supplies it."""
    messages = [
        {"role": "user", "content": "sort the words"},
        {"role": "assistant", "content": "<think>\nalphabetical\n</think>\n\nthe words are sorted."},
        {"role": "user", "content": "add 3 and 4"},
        {"role": "assistant", "content": "the sum is 7", "reasoning_content": "3 + 4"},
    ]
    assert _render(QWEN3, messages) == (
        "<|im_start|>user\nsort the words<|im_end|>\n<|im_start|>assistant\nthe words are sorted.<|im_end|>\n"
        "<|im_start|>user\nadd 3 and 4<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n3 + 4\n</think>\n\nthe sum is 7<|im_end|>\n")
    assert _render(QWEN3, CONVERSATION[:3]) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nsort the words<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nthe words are sorted.<|im_end|>\n")
    # told the conversation goes on, a prefix renders its last answer as the whole does
    from transformers.utils.chat_template_utils import _compile_jinja_template

    prefix = _compile_jinja_template(QWEN3).render(messages=CONVERSATION[:3], real_last_index=4)
    assert _render(QWEN3, CONVERSATION).startswith(prefix)
    assert "<think>" not in prefix


def test_qwen3_multi_turn_mask(tmp_path):
    # each prefix renders as the start of the whole (plait-formats passes real_last_index):
    # without it the first answer would get a <think> block in its prefix and masking would refuse the row
    tokenizer = _load_tokenizer(_tokenizer_dir(tmp_path, CHATML_TOKENS), "qwen3")
    _assert_mask(tokenizer, CONVERSATION, [
        ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nsort the words<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("the words are sorted.", True),
        ("<|im_end|>", True),
        ("\n<|im_start|>user\nadd 3 and 4<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("the sum is 7", True),
        ("<|im_end|>", True),
        ("\n", False),
    ])


def test_qwen_25_tool_call_mask(tmp_path):
    # a trained tool-call turn (no text) trains its <tool_call> block; the tool's result is prompt
    tokenizer = _load_tokenizer(_tokenizer_dir(tmp_path, CHATML_TOKENS), "qwen_25")
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 3, "b": 4}}}
    messages = [
        {"role": "user", "content": "add 3 and 4"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "7"},
        {"role": "assistant", "content": "the sum is 7"},
    ]
    _assert_mask(tokenizer, messages, [
        (f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}<|im_end|>\n"
         "<|im_start|>user\nadd 3 and 4<|im_end|>\n<|im_start|>assistant\n", False),  # the generation prompt
        ('<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>', True),
        ("<|im_end|>", True),
        ("\n<|im_start|>user\n<tool_response>\n7\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        ("the sum is 7", True),
        ("<|im_end|>", True),
        ("\n", False),
    ])


def test_alpaca_blocks_and_refusals():
    assert _render(ALPACA, CONVERSATION, add_generation_prompt=False) == (
        "<s>be brief\n\n### Instruction:\nsort the words\n\n### Response:\nthe words are sorted.</s>\n\n"
        "### Instruction:\nadd 3 and 4\n\n### Response:\nthe sum is 7</s>")
    assert _render(ALPACA, CONVERSATION[1:2], add_generation_prompt=True) == (
        "<s>### Instruction:\nsort the words\n\n### Response:\n")
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match="one system message, first.*got system as message 1"):
        _render(ALPACA, [CONVERSATION[1], CONVERSATION[0]])  # Axolotl's would drop it silently
    with pytest.raises(TemplateError, match="got tool as message 0"):
        _render(ALPACA, [{"role": "tool", "content": "7"}])


def test_deepseek_tags_system_placement_and_reasoning():
    user, assistant, end = DEEPSEEK_TOKENS
    assert _render(DEEPSEEK_V2, CONVERSATION[:3], add_generation_prompt=False) == (
        f"<s>be brief\n\n{user}sort the words{assistant}the words are sorted.</s>")
    messages = [CONVERSATION[0], CONVERSATION[1], {"role": "assistant", "content": "<think>easy</think>sorted"},
                {"role": "system", "content": "and kind"}, CONVERSATION[3]]
    # every system message is joined after BOS; the reasoning before </think> is dropped
    assert _render(DEEPSEEK_V3, messages, add_generation_prompt=True) == (
        f"<s>be brief\n\nand kind{user}sort the words{assistant}sorted{end}{user}add 3 and 4{assistant}")
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match="text conversations.*got tool"):
        _render(DEEPSEEK_V3, [CONVERSATION[1], {"role": "tool", "content": "7"}])
    with pytest.raises(TemplateError, match="an assistant turn with tool_calls"):
        _render(DEEPSEEK_V3, [CONVERSATION[1], {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": "{}"}}]}])
    with pytest.raises(TemplateError, match="deepseek_v2 has system, user and assistant roles only, got tool"):
        _render(DEEPSEEK_V2, [{"role": "tool", "content": "7"}])


def test_alpaca_mask_trains_each_response_and_its_eos(tmp_path):
    tokenizer = _load_tokenizer(_tokenizer_dir(tmp_path, ()), "alpaca")
    eos = tokenizer.eos_token
    _assert_mask(tokenizer, CONVERSATION, [
        ("<|begin_of_text|>be brief\n\n### Instruction:\nsort the words\n\n### Response:\n", False),
        ("the words are sorted.", True),
        (eos, True),
        ("\n\n### Instruction:\nadd 3 and 4\n\n### Response:\n", False),
        ("the sum is 7", True),
        (eos, True),
    ])


def test_deepseek_v3_mask_trains_the_answers_and_their_end(tmp_path):
    user, assistant, end = DEEPSEEK_TOKENS
    tokenizer = _load_tokenizer(_tokenizer_dir(tmp_path, DEEPSEEK_TOKENS), "deepseek_v3")
    _assert_mask(tokenizer, CONVERSATION, [
        (f"<|begin_of_text|>be brief{user}sort the words{assistant}", False),
        ("the words are sorted.", True),
        (end, True),
        (f"{user}add 3 and 4{assistant}", False),
        ("the sum is 7", True),
        (end, True),
    ])


def test_falcon_h1_and_llama4_text_and_refusals():
    assert _render(FALCON_H1, CONVERSATION[:3], add_generation_prompt=True) == (
        "<s><|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nsort the words<|im_end|>\n"
        "<|im_start|>assistant\nthe words are sorted.<|im_end|>\n<|im_start|>assistant\n")
    padded = [{"role": "system", "content": "  be brief\n"}, *CONVERSATION[1:3]]
    assert _render(LLAMA4, padded, add_generation_prompt=True) == (
        "<s><|header_start|>system<|header_end|>\n\nbe brief<|eot|>"
        "<|header_start|>user<|header_end|>\n\nsort the words<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nthe words are sorted.<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n")
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match="falcon_h1 takes a system message first only, got one as message 1"):
        _render(FALCON_H1, [CONVERSATION[1], CONVERSATION[0]])
    tools = [{"type": "function", "function": {"name": "add"}}]
    with pytest.raises(TemplateError, match="without tool definitions"):
        _render(FALCON_H1, CONVERSATION[1:2], tools=tools)
    with pytest.raises(TemplateError, match="tool definitions are not supported"):
        _render(LLAMA4, CONVERSATION[1:2], tools=tools)
    with pytest.raises(TemplateError, match=r"message 1 \(tool\) is a tool message"):
        _render(LLAMA4, [CONVERSATION[1], {"role": "tool", "content": "7"}])


def test_llama4_mask_trains_the_answers_and_their_eot(tmp_path):
    tokenizer = _load_tokenizer(_tokenizer_dir(tmp_path, LLAMA4_TOKENS), "llama4")
    _assert_mask(tokenizer, CONVERSATION, [
        ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nbe brief<|eot|>"
         "<|header_start|>user<|header_end|>\n\nsort the words<|eot|><|header_start|>assistant<|header_end|>\n\n",
         False),
        ("the words are sorted.", True),
        ("<|eot|>", True),
        ("<|header_start|>user<|header_end|>\n\nadd 3 and 4<|eot|><|header_start|>assistant<|header_end|>\n\n",
         False),
        ("the sum is 7", True),
        ("<|eot|>", True),
    ])

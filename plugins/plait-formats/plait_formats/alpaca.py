"""Alpaca instruction rows: ``{"instruction", "input", "output"}``.

Prompt text is Axolotl's, word for word. The prompt (with the tokenizer's BOS)
is masked unless ``train_on_inputs``; the output and EOS are trained. Prompt
and output are tokenized separately and joined, so the boundary between
masked and trained tokens is exact and the prompt's tokens are the ones the
model gets at inference, when the prompt is tokenized alone.

``alpaca``           the classic "### Instruction:" layout
``alpaca_chat``      the same system text, "USER: ... ASSISTANT:" turns
``alpaca_w_system``  the row's own system text (``field_system``, default
                     ``system``) in place of the fixed one
"""

from __future__ import annotations

from plait_formats.common import (encode_prompts, encode_responses, join_prompt_response, text_column,
                                  train_on_inputs)

SYSTEM_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n")
SYSTEM_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n")

#: type -> (turn with input, turn without input)
TURNS = {
    "alpaca": ("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
               "### Instruction:\n{instruction}\n\n### Response:\n"),
    "alpaca_chat": ("USER: {instruction}\n{input}\nASSISTANT:", "USER: {instruction}\nASSISTANT:"),
    "alpaca_w_system": ("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
                        "### Instruction:\n{instruction}\n\n### Response:\n"),
}
TYPES = tuple(TURNS)


def build_prompt(kind: str, instruction: str, input_text: str | None, system: str | None = None) -> str:
    """The prompt text of one row (everything before the output)."""
    with_input, no_input = TURNS[kind]
    if input_text:
        head = SYSTEM_WITH_INPUT if system is None else system + "\n\n"
        return head + with_input.format(instruction=instruction, input=input_text)
    head = SYSTEM_NO_INPUT if system is None else system + "\n\n"
    return head + no_input.format(instruction=instruction)


def tokenize(cfg, dataset_cfg, tokenizer, batch) -> dict:
    kind = dataset_cfg.type.split(".")[0]
    instructions = text_column(batch, dataset_cfg.field_instruction or "instruction")
    outputs = text_column(batch, dataset_cfg.field_output or "output")
    inputs = text_column(batch, dataset_cfg.field_input or "input", required=False)
    systems = [None] * len(instructions)
    if kind == "alpaca_w_system":
        systems = text_column(batch, dataset_cfg.field_system or "system", required=False)
        systems = [s if s else dataset_cfg.system_prompt for s in systems]
    prompts = [build_prompt(kind, ins, inp, sys) for ins, inp, sys in zip(instructions, inputs, systems)]
    return join_prompt_response(encode_prompts(tokenizer, prompts), encode_responses(tokenizer, outputs),
                                train_prompt=train_on_inputs(cfg, dataset_cfg))

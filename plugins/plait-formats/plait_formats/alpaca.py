"""Alpaca instruction rows: ``{"instruction", "input", "output"}``.

The prompt (with the tokenizer's BOS) is masked unless ``train_on_inputs``;
the output and EOS are trained. Prompt and output are tokenized separately and
joined, so the boundary between masked and trained tokens is exact and the
prompt's tokens are the ones the model gets at inference, when the prompt is
tokenized alone (Axolotl tokenizes the same two pieces the same way).

Prompt text follows Axolotl's current prompters (``AlpacaPrompter`` with its
``instruct`` and ``chat`` styles, the prompters of ``alpaca_chat.py`` and
``alpaca_w_system.py``), character for character. A prompt is the system
text put through the style's system format, then the turn; rows whose input
is empty use the no-input system text and turn. ``type: X.load_Y`` picks
Axolotl's loader ``load_Y`` of ``X``; ``X`` alone and ``X.load`` are the
default loader.

``alpaca``
    "Below is an instruction that describes a task..." + "\\n\\n", then
    "### Instruction:\\n...\\n\\n### Input:\\n...\\n\\n### Response:\\n".
``alpaca_chat``, ``alpaca_chat.load``
    "SYSTEM: Below is an instruction that describes a task...\\n", then
    "USER: {instruction}\\n{input}\\nASSISTANT:".
``alpaca_chat.load_concise``
    the same layout with Axolotl's concise text ("Below is an instruction
    from a USER ..."), which ends in its own blank line, so three newlines
    come before "USER:".
``alpaca_chat.load_no_prompt``
    no system text, "USER: ...\\nASSISTANT:" only.
``alpaca_chat.load_qa``, ``alpaca_chat.load_camel_ai``
    as ``load_concise``, from the columns ``question``/``answer`` and
    ``message_1``/``message_2`` (no input).
``alpaca_w_system``, ``.load``, ``.load_chat``
    the row's ``system`` as "SYSTEM: {system}\\n", then the chat layout.
``alpaca_w_system.load_instruct``
    the row's ``system`` as "{system}\\n\\n", then the "### Instruction:"
    layout.
``alpaca_w_system.load_open_orca``
    the row's ``system_prompt`` column as "### System:\\n{system}\\n", then
    "### Human:\\n{instruction}\\n### Assistant:\\n", from ``question`` and
    ``response`` (no input).
``alpaca_w_system.load_open_orca_chatml``
    the same columns in chatml turns (``<|im_start|>system`` ...).

``alpaca_w_system`` variants take the system text from the row; a row
without one falls back to the dataset's ``system_prompt``, and with neither
the prompt has no system part (as in Axolotl, which renders nothing for an
empty system). Column defaults above yield to ``field_instruction``,
``field_input``, ``field_output`` and ``field_system``.

Any other variant is refused at config validation (the plugin's
``validate_config``), naming the accepted ones: a variant whose text is not
known exactly is not guessed.

Axolotl releases before early 2024 rendered other text (``alpaca_chat`` as
"Below is ... request.\\n\\nUSER: ...", the instruct system as
"### System:\\n{system}\\n\\n"); these are the texts of its prompters since.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.errors import ConfigError, closest

from plait_formats.common import (encode_prompts, encode_responses, join_prompt_response, text_column,
                                  train_on_inputs)

SYSTEM_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.")
SYSTEM_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.")
# Axolotl's concise texts still carry their own trailing blank line
CONCISE_WITH_INPUT = ("Below is an instruction from a USER that describes a task, paired with an input that provides "
                      "further context. The ASSISTANT writes a response that concisely and appropriately completes "
                      "the request.\n\n")
CONCISE_NO_INPUT = ("Below is an instruction from a USER that describes a task. The ASSISTANT writes a response "
                    "that appropriately and concisely completes the request.\n\n")


@dataclass(frozen=True)
class Style:
    """Turn layout: (turn with input, turn without input, system format)."""

    with_input: str
    no_input: str
    system_format: str


INSTRUCT = Style("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
                 "### Instruction:\n{instruction}\n\n### Response:\n", "{system}\n\n")
CHAT = Style("USER: {instruction}\n{input}\nASSISTANT:", "USER: {instruction}\nASSISTANT:", "SYSTEM: {system}\n")
ORCA = Style("### Human:\n{instruction}\n### Additional Context:\n{input}\n### Assistant:\n",
             "### Human:\n{instruction}\n### Assistant:\n", "### System:\n{system}\n")
ORCA_CHATML = Style("<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
                    "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
                    "<|im_start|>system\n{system}<|im_end|>\n")


@dataclass(frozen=True)
class Variant:
    """One ``type:`` value: layout, system text and default columns."""

    style: Style
    #: fixed system text (with input, without input); ``None``: the row's own
    system: tuple[str, str] | None
    instruction: str = "instruction"
    input: str | None = "input"  # None: the variant reads no input column
    output: str = "output"
    system_field: str = "system"

    def prompt(self, instruction: str, input_text: str | None, row_system: str | None = None) -> str:
        if self.system is None:
            system = row_system or ""
        else:
            system = self.system[0] if input_text else self.system[1]
        head = self.style.system_format.format(system=system) if system else ""
        if input_text:
            return head + self.style.with_input.format(instruction=instruction, input=input_text)
        return head + self.style.no_input.format(instruction=instruction)


_DEFAULT = (SYSTEM_WITH_INPUT, SYSTEM_NO_INPUT)
_CONCISE = (CONCISE_WITH_INPUT, CONCISE_NO_INPUT)
_CHAT = Variant(CHAT, _DEFAULT)
_W_SYSTEM_CHAT = Variant(CHAT, None)

#: type -> variant suffix ("" for none) -> Variant
VARIANTS: dict[str, dict[str, Variant]] = {
    "alpaca": {"": Variant(INSTRUCT, _DEFAULT)},
    "alpaca_chat": {
        "": _CHAT,
        "load": _CHAT,
        "load_concise": Variant(CHAT, _CONCISE),
        "load_no_prompt": Variant(CHAT, ("", "")),
        "load_qa": Variant(CHAT, _CONCISE, instruction="question", input=None, output="answer"),
        "load_camel_ai": Variant(CHAT, _CONCISE, instruction="message_1", input=None, output="message_2"),
    },
    "alpaca_w_system": {
        "": _W_SYSTEM_CHAT,
        "load": _W_SYSTEM_CHAT,
        "load_chat": _W_SYSTEM_CHAT,
        "load_instruct": Variant(INSTRUCT, None),
        "load_open_orca": Variant(ORCA, None, instruction="question", input=None, output="response",
                                  system_field="system_prompt"),
        "load_open_orca_chatml": Variant(ORCA_CHATML, None, instruction="question", input=None, output="response",
                                         system_field="system_prompt"),
    },
}
TYPES = tuple(VARIANTS)


def accepted_types(base: str) -> list[str]:
    """Every ``type:`` spelling accepted for ``base``."""
    return [base + ("." + suffix if suffix else "") for suffix in VARIANTS[base]]


def variant_for(type_name: str, where: str = "") -> Variant:
    """The :class:`Variant` of ``type_name``; :class:`ConfigError` naming the
    accepted variants when there is no such variant."""
    base, _, suffix = type_name.partition(".")
    variants = VARIANTS.get(base)
    if variants is None or suffix not in variants:
        raise unknown_variant(type_name, accepted_types(base) if variants else [], where)
    return variants[suffix]


def unknown_variant(type_name: str, accepted: list[str], where: str = "") -> ConfigError:
    """The error for a ``type:`` whose variant (after the dot) is not known."""
    base, _, suffix = type_name.partition(".")
    if accepted == [base]:
        close = accepted
    else:  # compare what follows the dot: the shared type name would make everything look close
        by_suffix = {name.partition(".")[2]: name for name in accepted}
        match = closest(suffix, by_suffix, cutoff=0.75)
        close = [by_suffix[match]] if match else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    what = (f"{base} has no variants" if accepted == [base]
            else f"it is not a variant of {base} that plait-formats knows")
    return ConfigError(f"{where or 'config key type'}: {type_name!r} is not accepted ({what}){hint}\n"
                       f"accepted: {', '.join(accepted)}")


def build_prompt(kind: str, instruction: str, input_text: str | None, system: str | None = None) -> str:
    """The prompt text of one row of type ``kind`` (everything before the
    output); ``system`` is the row's system text for ``alpaca_w_system``."""
    return variant_for(kind).prompt(instruction, input_text, system)


def tokenize(cfg, dataset_cfg, tokenizer, batch) -> dict:
    variant = variant_for(dataset_cfg.type, f"config key 'type' of dataset {dataset_cfg.path!r}")
    instructions = text_column(batch, dataset_cfg.field_instruction or variant.instruction)
    outputs = text_column(batch, dataset_cfg.field_output or variant.output)
    input_key = dataset_cfg.field_input or variant.input
    inputs = text_column(batch, input_key, required=False) if input_key else [None] * len(instructions)
    systems = [None] * len(instructions)
    if variant.system is None:
        systems = text_column(batch, dataset_cfg.field_system or variant.system_field, required=False)
        systems = [s if s else dataset_cfg.system_prompt for s in systems]
    prompts = [variant.prompt(ins, inp, sys) for ins, inp, sys in zip(instructions, inputs, systems)]
    return join_prompt_response(encode_prompts(tokenizer, prompts), encode_responses(tokenizer, outputs),
                                train_prompt=train_on_inputs(cfg, dataset_cfg))

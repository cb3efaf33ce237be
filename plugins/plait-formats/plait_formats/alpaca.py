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

``alpaca:instruct``, ``alpaca:chat``, ``alpaca:chatml``, ``alpaca:phi``
    Axolotl's ``base:style`` form: the alpaca columns and system text in one
    of its prompter's four layouts (``instruct`` is ``alpaca``'s, ``chat``
    is ``alpaca_chat``'s, ``chatml`` uses ``<|im_start|>`` turns, ``phi``
    ``<|user|>`` / ``<|end|>`` / ``<|assistant|>``; Phi's with-input turn puts
    the input right after ``<|end|>``, as Axolotl writes it). ``gpteacher``
    (columns instruction/input/response) and ``oasst`` (INSTRUCTION/RESPONSE)
    take the same styles, ``instruct`` by default.
``alpaca_instruct``, ``.load``, ``.load_no_prompt``
    ``alpaca``'s layout; ``load_no_prompt`` without the system text.
``orcamini``
    "### System:\n{system}\n\n### User:\n{question}\n\n### Response:\n"
    from ``system_prompt``/``question``/``response`` (the system part is
    always there, empty when the row has none).
``context_qa``, ``.load``, ``.load_404``, ``.load_v2``
    the chat layout with "Use the following contextual information to
    concisely answer the question.\n" as system text and "{article}\n===\n
    {question}" as instruction, trained on ``answer``; ``load_404`` asks
    ``unanswerable_question`` and trains Axolotl's fixed "The context
    provided does not contain ..." answer; ``load_v2`` has no system text:
    "Context: {context}\nQuestion: {question}\n", trained on
    "Answer: {answer}".
``metharme``
    the row's ``prompt`` as it is, trained on ``generation`` followed by
    three EOS tokens (Axolotl's Metharme strategy; one fewer when the
    generation already ends with EOS).

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

import re
from dataclasses import dataclass
from typing import Callable, Optional

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
#: Axolotl's ``phi`` prompt style, character for character (no newline after ``<|end|>`` with an input)
PHI = Style("<|user|>\n{instruction}<|end|>{input}<|assistant|>", "<|user|>\n{instruction}<|end|>\n<|assistant|>\n",
            "<|system|>\n{system}<|end|>\n")
ORCA_MINI = Style("", "### System:\n{system}\n\n### User:\n{instruction}\n\n### Response:\n", "")
#: a prompt that is the instruction alone
PLAIN = Style("{instruction}\n{input}", "{instruction}", "{system}")
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
    #: ``compose(row) -> (instruction, input, output)`` from the columns ``reads``,
    #: for variants that build their fields from several columns (context_qa)
    compose: Optional[Callable[[dict], tuple]] = None
    reads: tuple[str, ...] = ()
    #: EOS tokens after the output (Axolotl's Metharme strategy adds three)
    eos_count: int = 1
    #: the turn format holds the system text itself (orcamini), even when empty
    system_in_turn: bool = False

    def prompt(self, instruction: str, input_text: str | None, row_system: str | None = None) -> str:
        if self.system is None:
            system = row_system or ""
        else:
            system = self.system[0] if input_text else self.system[1]
        if self.system_in_turn:
            return self.style.no_input.format(system=system, instruction=instruction)
        head = self.style.system_format.format(system=system) if system else ""
        if input_text:
            return head + self.style.with_input.format(instruction=instruction, input=input_text)
        return head + self.style.no_input.format(instruction=instruction)


_DEFAULT = (SYSTEM_WITH_INPUT, SYSTEM_NO_INPUT)
CONTEXT_QA_SYSTEM = "Use the following contextual information to concisely answer the question.\n"
CONTEXT_404_ANSWER = ("The context provided does not contain any information about your inquiry. Therefore, I'm "
                      "unable to answer your question based on the given context.")
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


def _styles(**columns) -> dict[str, Variant]:
    """Axolotl's ``base:style`` forms of an alpaca-prompter type (plus the bare
    name, in the instruct style) over ``columns``."""
    styles = {"instruct": INSTRUCT, "chat": CHAT, "chatml": ORCA_CHATML, "phi": PHI}
    found = {":" + name: Variant(style, _DEFAULT, **columns) for name, style in styles.items()}
    return {"": found[":instruct"], **found}


VARIANTS["alpaca"].update(_styles())
VARIANTS.update({
    "gpteacher": _styles(output="response"),
    "oasst": _styles(instruction="INSTRUCTION", input=None, output="RESPONSE"),
    "alpaca_instruct": {"": Variant(INSTRUCT, _DEFAULT), "load": Variant(INSTRUCT, _DEFAULT),
                        "load_no_prompt": Variant(INSTRUCT, ("", ""))},
    "orcamini": {"": Variant(ORCA_MINI, None, instruction="question", input=None, output="response",
                             system_field="system_prompt", system_in_turn=True)},
    "context_qa": {
        **dict.fromkeys(("", "load"), Variant(
            CHAT, (CONTEXT_QA_SYSTEM, CONTEXT_QA_SYSTEM), reads=("article", "question", "answer"),
            compose=lambda row: (row["article"] + "\n===\n" + row["question"], None, row["answer"]))),
        "load_404": Variant(
            CHAT, (CONTEXT_QA_SYSTEM, CONTEXT_QA_SYSTEM), reads=("article", "unanswerable_question"),
            compose=lambda row: (row["article"] + "\n===\n" + row["unanswerable_question"], None,
                                 CONTEXT_404_ANSWER)),
        "load_v2": Variant(
            PLAIN, ("", ""), reads=("context", "question", "answer"),
            compose=lambda row: ("Context: " + row["context"] + "\nQuestion: " + row["question"] + "\n", None,
                                 "Answer: " + row["answer"])),
    },
    "metharme": {"": Variant(PLAIN, ("", ""), instruction="prompt", input=None, output="generation", eos_count=3)},
})
TYPES = tuple(VARIANTS)
#: a type's name, then a variant after a dot (``alpaca_chat.load_qa``) or a style after a colon (``alpaca:chat``)
_TYPE_PARTS = re.compile(r"(?P<base>[^.:]*)(?:(?P<sep>[.:])(?P<rest>.*))?", re.S)


def split_type(type_name: str) -> tuple[str, str]:
    """``(base, variant key)``: ``alpaca_chat.load_qa`` -> ``("alpaca_chat",
    "load_qa")``, ``alpaca:chat`` -> ``("alpaca", ":chat")``, ``alpaca`` ->
    ``("alpaca", "")``."""
    parts = _TYPE_PARTS.fullmatch(type_name)
    sep, rest = parts["sep"], parts["rest"]
    return parts["base"], ("" if sep is None else (":" + rest if sep == ":" else rest))


def accepted_types(base: str) -> list[str]:
    """Every ``type:`` spelling accepted for ``base``."""
    return [base + ("." + suffix if suffix and not suffix.startswith(":") else suffix) for suffix in VARIANTS[base]]


def variant_for(type_name: str, where: str = "") -> Variant:
    """The :class:`Variant` of ``type_name``; :class:`ConfigError` naming the
    accepted variants when there is no such variant."""
    base, suffix = split_type(type_name)
    variants = VARIANTS.get(base)
    if variants is None or suffix not in variants:
        raise unknown_variant(type_name, accepted_types(base) if variants else [], where)
    return variants[suffix]


def unknown_variant(type_name: str, accepted: list[str], where: str = "") -> ConfigError:
    """The error for a ``type:`` whose variant (after the dot) is not known."""
    base, suffix = split_type(type_name)
    if accepted == [base]:
        close = accepted
    else:  # compare what follows the dot: the shared type name would make everything look close
        by_suffix = {split_type(name)[1]: name for name in accepted}
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
    if variant.compose is not None:
        columns = {key: text_column(batch, key) for key in variant.reads}
        rows = [variant.compose(dict(zip(columns, values))) for values in zip(*columns.values())]
        instructions, inputs, outputs = (list(fields) for fields in zip(*rows)) if rows else ([], [], [])
    else:
        instructions = text_column(batch, dataset_cfg.field_instruction or variant.instruction)
        outputs = text_column(batch, dataset_cfg.field_output or variant.output)
        input_key = dataset_cfg.field_input or variant.input
        inputs = text_column(batch, input_key, required=False) if input_key else [None] * len(instructions)
    systems = [None] * len(instructions)
    if variant.system is None:
        systems = text_column(batch, dataset_cfg.field_system or variant.system_field, required=False)
        systems = [s if s else dataset_cfg.system_prompt for s in systems]
    prompts = [variant.prompt(ins, inp, sys) for ins, inp, sys in zip(instructions, inputs, systems)]
    responses = encode_responses(tokenizer, outputs)
    if variant.eos_count > 1 and tokenizer.eos_token_id is not None:
        # the EOS encode_responses added, and more up to eos_count (one fewer when the text ends with EOS)
        eos = tokenizer.eos_token_id
        responses = [ids + [eos] * (variant.eos_count - 1 - (len(ids) > 1 and ids[-2] == eos)) for ids in responses]
    return join_prompt_response(encode_prompts(tokenizer, prompts), responses,
                                train_prompt=train_on_inputs(cfg, dataset_cfg))

"""The hookimpls of plait-formats: register the formats.

Each format's function imports its module on first use, so loading the plugin
(every ``plait`` command does) costs nothing.
"""

from __future__ import annotations

import importlib
import re

from plait.hookspecs import hookimpl
from plait.registries import DatasetEntry, DatasetFormat


def _tokenize_with(module_name: str):
    """``tokenize`` of ``plait_formats.<module_name>``, imported on the first batch."""
    def tokenize(cfg, dataset_cfg, tokenizer, batch):
        module = importlib.import_module(f"plait_formats.{module_name}")
        return module.tokenize(cfg, dataset_cfg, tokenizer, batch)
    tokenize.__name__ = f"tokenize_{module_name}"
    return tokenize


def _tokenize_pretokenized(cfg, dataset_cfg, tokenizer, batch):
    # an entry without type is read as token ids only when the rows are token ids
    if dataset_cfg.type is None and "input_ids" not in batch:
        return None
    return _tokenize_with("pretokenized")(cfg, dataset_cfg, tokenizer, batch)


def _alpaca_variant(type_value: str, where: str) -> None:
    from plait_formats.alpaca import variant_for

    variant_for(type_value, where)


def _alpaca_prompt(type_value: str, row: dict) -> str:
    from plait_formats.alpaca import variant_for

    variant = variant_for(type_value)
    if variant.compose is not None:
        instruction, input_text, _ = variant.compose({key: row.get(key, "") for key in variant.reads})
        return variant.prompt(instruction, input_text)
    return variant.prompt(row.get(variant.instruction, ""), row.get(variant.input) if variant.input else None,
                          row.get(variant.system_field))


@hookimpl
def dataset_formats():
    from plait_formats.entries import (ChatTemplateEntry, InstructionEntry, Llama2ChatEntry, TextEntry,
                                       UserDefinedEntry)

    alpaca = _tokenize_with("alpaca")
    text = _tokenize_with("text")
    return [
        DatasetFormat("alpaca", alpaca, InstructionEntry, check_type=_alpaca_variant, prompt=_alpaca_prompt,
                      description="instruction/input/output rows, Alpaca's prompt (alpaca:chat, :chatml, :phi: "
                                  "Axolotl's other styles)"),
        DatasetFormat("alpaca_chat", alpaca, InstructionEntry, check_type=_alpaca_variant, prompt=_alpaca_prompt,
                      description="alpaca rows, USER/ASSISTANT prompt"),
        DatasetFormat("alpaca_w_system", alpaca, InstructionEntry, check_type=_alpaca_variant, prompt=_alpaca_prompt,
                      description="alpaca rows with a system prompt"),
        *(DatasetFormat(name, alpaca, InstructionEntry, check_type=_alpaca_variant, prompt=_alpaca_prompt,
                        description=description) for name, description in AXOLOTL_INSTRUCTION_TYPES.items()),
        DatasetFormat("chat_template", _tokenize_with("chat"), ChatTemplateEntry,
                      description="conversations rendered with a chat template"),
        DatasetFormat("llama2_chat", _tokenize_with("llama2_chat"), Llama2ChatEntry,
                      description="conversations in Llama 2 chat's [INST] <<SYS>> layout"),
        DatasetFormat("pygmalion", _tokenize_with("pygmalion"), DatasetEntry,
                      description="Pygmalion conversations (system/human/bot), <|user|>/<|model|> turns"),
        DatasetFormat("completion", text, TextEntry, description="raw text, every token trained"),
        DatasetFormat("pretraining", text, TextEntry, description="raw text of a local corpus"),
        DatasetFormat("input_output", _tokenize_with("segments"), DatasetEntry,
                      description="segments with per-segment label flags"),
        DatasetFormat("user_defined", _tokenize_with("user_defined"), UserDefinedEntry,
                      description="prompt format written in the config"),
        DatasetFormat("pretokenized", _tokenize_pretokenized, DatasetEntry, untyped=True,
                      description="input_ids (and labels) already tokenized; also rows without type"),
    ]


#: Axolotl's other single-turn instruction strategies, tokenized like alpaca (plait_formats.alpaca)
AXOLOTL_INSTRUCTION_TYPES = {
    "alpaca_instruct": "alpaca rows, Alpaca's prompt (load_no_prompt: without the system text)",
    "gpteacher": "instruction/input/response rows, Alpaca's prompt (or :chat, :chatml, :phi)",
    "oasst": "INSTRUCTION/RESPONSE rows, Alpaca's prompt (or :chat, :chatml, :phi)",
    "orcamini": "system_prompt/question/response rows, Orca Mini's ### System/### User prompt",
    "context_qa": "article/question/answer rows, a contextual QA prompt (load_404, load_v2)",
    "metharme": "prompt/generation rows, the prompt as written, three EOS after the generation",
}

#: types whose model reads the prompt text as it was trained (no chat template)
PLAIN_TEXT_TYPES = ("completion", "pretraining")
#: the alpaca family: one prompt layout per type and variant (plait_formats.alpaca)
ALPACA_TYPES = ("alpaca", "alpaca_chat", "alpaca_w_system", *AXOLOTL_INSTRUCTION_TYPES)


@hookimpl
def inference_prompt(cfg, dataset_cfg, messages):
    """Alpaca-style and user_defined models are prompted in their training
    layout, a completion model with the text alone; chat_template and the
    rest return ``None`` (core applies the chat template)."""
    base = re.split(r"[.:]", dataset_cfg.type or "", maxsplit=1)[0]
    if base not in (*ALPACA_TYPES, "user_defined", *PLAIN_TEXT_TYPES):
        return None
    user = messages[-1]["content"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    if base in ALPACA_TYPES:
        from plait_formats.alpaca import build_prompt

        # one turn: alpaca rows have no history; a system message is used by
        # the variants that read one from the row (alpaca_w_system)
        return build_prompt(dataset_cfg.type, user, None, system or dataset_cfg.system_prompt)
    if base == "user_defined":
        from plait_formats.user_defined import build_prompt as user_defined_prompt

        return user_defined_prompt(dataset_cfg, user, None, system)
    return user  # completion / pretraining: the text as it was trained

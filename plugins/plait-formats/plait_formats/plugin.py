"""The hookimpls of plait-formats: register the formats.

Each format's function imports its module on first use, so loading the plugin
(every ``plait`` command does) costs nothing.
"""

from __future__ import annotations

import importlib

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
    from plait_formats.alpaca import build_prompt

    return build_prompt(type_value, row.get("instruction", ""), row.get("input"), row.get("system"))


@hookimpl
def dataset_formats():
    from plait_formats.entries import ChatTemplateEntry, InstructionEntry, TextEntry, UserDefinedEntry

    alpaca = _tokenize_with("alpaca")
    text = _tokenize_with("text")
    return [
        DatasetFormat("alpaca", alpaca, InstructionEntry, check_type=_alpaca_variant, prompt=_alpaca_prompt,
                      description="instruction/input/output rows, Alpaca's prompt"),
        DatasetFormat("alpaca_chat", alpaca, InstructionEntry, check_type=_alpaca_variant, prompt=_alpaca_prompt,
                      description="alpaca rows, USER/ASSISTANT prompt"),
        DatasetFormat("alpaca_w_system", alpaca, InstructionEntry, check_type=_alpaca_variant, prompt=_alpaca_prompt,
                      description="alpaca rows with a system prompt"),
        DatasetFormat("chat_template", _tokenize_with("chat"), ChatTemplateEntry,
                      description="conversations rendered with a chat template"),
        DatasetFormat("completion", text, TextEntry, description="raw text, every token trained"),
        DatasetFormat("pretraining", text, TextEntry, description="raw text of a local corpus"),
        DatasetFormat("input_output", _tokenize_with("segments"), DatasetEntry,
                      description="segments with per-segment label flags"),
        DatasetFormat("user_defined", _tokenize_with("user_defined"), UserDefinedEntry,
                      description="prompt format written in the config"),
        DatasetFormat("pretokenized", _tokenize_pretokenized, DatasetEntry, untyped=True,
                      description="input_ids (and labels) already tokenized; also rows without type"),
    ]

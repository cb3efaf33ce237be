"""The hookimpls of plait-formats: declare the types, dispatch ``tokenize``.

Format modules are imported on first use, so loading the plugin (every
``plait`` command does) costs nothing.
"""

from __future__ import annotations

import importlib

from plait.hookspecs import hookimpl

#: type -> module under plait_formats that tokenizes it
FORMATS = {
    "alpaca": "alpaca",
    "alpaca_chat": "alpaca",
    "alpaca_w_system": "alpaca",
    "chat_template": "chat",
    "completion": "text",
    "pretraining": "text",
    "input_output": "segments",
    "user_defined": "user_defined",
    "pretokenized": "pretokenized",
}


@hookimpl
def dataset_types():
    return list(FORMATS)


@hookimpl
def tokenize(cfg, dataset_cfg, tokenizer, batch):
    if dataset_cfg.type is None:
        # rows that are already token ids need no type
        if "input_ids" not in batch:
            return None
        module_name = "pretokenized"
    else:
        module_name = FORMATS.get(dataset_cfg.type.split(".")[0])
        if module_name is None:
            return None
    module = importlib.import_module(f"plait_formats.{module_name}")
    return module.tokenize(cfg, dataset_cfg, tokenizer, batch)

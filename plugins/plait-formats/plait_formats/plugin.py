"""The hookimpls of plait-formats: declare the types, check their variants,
dispatch ``tokenize``.

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
#: types with dotted variants (``alpaca_chat.load_concise``), listed by the module
WITH_VARIANTS = ("alpaca", "alpaca_chat", "alpaca_w_system")


@hookimpl
def dataset_types():
    return list(FORMATS)


@hookimpl
def validate_config(cfg):
    """A dotted ``type:`` of one of these formats must name a variant the
    format has: ``alpaca.whatever`` fails here, before any model is loaded,
    rather than being read as ``alpaca``."""
    declared = _declared_elsewhere(cfg)
    for list_key in ("datasets", "test_datasets"):
        for index, entry in enumerate(getattr(cfg, list_key, None) or ()):
            type_name = entry.type
            if not type_name or "." not in type_name or type_name in declared:
                continue
            base = type_name.partition(".")[0]
            if base not in FORMATS:
                continue  # another plugin's type
            where = f"config key '{list_key}.{index}.type' (dataset {entry.path!r})"
            from plait_formats import alpaca

            if base in WITH_VARIANTS:
                alpaca.variant_for(type_name, where)
            else:
                raise alpaca.unknown_variant(type_name, [base], where)


def _declared_elsewhere(cfg) -> set[str]:
    """Full dotted names another plugin declares (it answers those itself)."""
    pm = getattr(cfg, "_pm", None)
    if pm is None:
        return set()
    names = set()
    for types in pm.hook.dataset_types():
        names.update(t for t in types or () if "." in t)
    return names


@hookimpl
def tokenize(cfg, dataset_cfg, tokenizer, batch):
    if dataset_cfg.type is None:
        # rows that are already token ids need no type
        if "input_ids" not in batch:
            return None
        module_name = "pretokenized"
    else:
        base, _, suffix = dataset_cfg.type.partition(".")
        module_name = FORMATS.get(base)
        if module_name is None:
            return None
        if suffix and base not in WITH_VARIANTS:
            from plait_formats.alpaca import unknown_variant

            raise unknown_variant(dataset_cfg.type, [base], f"config key 'type' of dataset {dataset_cfg.path!r}")
    module = importlib.import_module(f"plait_formats.{module_name}")
    return module.tokenize(cfg, dataset_cfg, tokenizer, batch)

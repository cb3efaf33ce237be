"""Core's default ``tokenize``: the ``dataset_formats`` registry's function
for the entry's ``type`` (formats themselves come from plugins such as
plait-formats)."""

from __future__ import annotations

from plait.hookspecs import hookimpl
from plait.registries import find_format


@hookimpl(trylast=True)
def tokenize(cfg, dataset_cfg, tokenizer, batch):
    fmt = find_format(cfg.plugin_manager, dataset_cfg.type, key=f"type of dataset {dataset_cfg.path!r}")
    if fmt is None:  # no type and no format reads untyped entries
        return None
    return fmt.tokenize(cfg, dataset_cfg, tokenizer, batch)

"""Validate a raw config dict into the typed run config.

Core's :class:`~plait.config.schema.CoreConfig` and every plugin's
``config_schema`` model are combined by inheritance into one pydantic class;
the instance flows through the whole run. Errors name the key, the bad value
and what is accepted.
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import BaseModel, ValidationError, create_model

from plait.config.axolotl_keys import KEYS_OF_PLUGINS, UNSUPPORTED_KEYS
from plait.config.schema import CoreConfig, DatasetConfig
from plait.errors import ConfigError, did_you_mean


def config_class(pm) -> type[CoreConfig]:
    """The run's config class: core's keys plus every plugin's.

    Two plugins (or a plugin and core) declaring the same key is an error that
    names both.
    """
    owners: dict[str, str] = {key: "core" for key in CoreConfig.model_fields}
    plugin_models: list[type[BaseModel]] = []
    for impl in pm.hook.config_schema.get_hookimpls():
        model = impl.function()
        if model is None:
            continue
        plugin = impl.plugin_name
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ConfigError(f"plugin {plugin!r}: config_schema() must return a pydantic BaseModel subclass, got {model!r}")
        for key in model.model_fields:
            if key in owners:
                raise ConfigError(
                    f"config key {key!r} is declared by two plugins: {owners[key]!r} and {plugin!r}; "
                    f"disable one of them (disable_plugins or PLAIT_DISABLE_PLUGINS)"
                )
            owners[key] = plugin
        plugin_models.append(model)
    if not plugin_models:
        return CoreConfig
    return create_model("PlaitConfig", __base__=(CoreConfig, *plugin_models))


def _suggest(key: str, known) -> str:
    return did_you_mean(key, known, cutoff=0.75)


def _check_keys(raw: dict, cls: type[BaseModel], allow_unsupported: bool) -> None:
    """Unknown keys get a suggestion; known-but-unsupported Axolotl keys are
    gathered into one message."""
    known = set(cls.model_fields)
    unsupported, missing_plugin, unknown = [], [], []
    for key in raw:
        if key in known:
            continue
        if key in UNSUPPORTED_KEYS:
            unsupported.append(f"  {key}: {UNSUPPORTED_KEYS[key]}")
        elif key in KEYS_OF_PLUGINS:
            missing_plugin.append(f"  {key}: install the plugin package {KEYS_OF_PLUGINS[key]!r} (or enable it)")
        else:
            unknown.append(f"unknown config key {key!r}{_suggest(key, known)}")
    if unknown:
        raise ConfigError("\n".join(unknown))
    if missing_plugin:
        raise ConfigError("these keys need a plugin that is not loaded:\n" + "\n".join(missing_plugin))
    if unsupported:
        message = "these Axolotl keys are not supported by Plait:\n" + "\n".join(unsupported)
        if not allow_unsupported:
            raise ConfigError(message + "\n(pass --allow-unsupported to ignore them with a warning)")
        ignored = [line.split(":")[0].strip() for line in unsupported]
        # one plain line on stderr (python's warnings would add a file path and a source line)
        print(f"warning: ignoring Axolotl keys Plait does not support (--allow-unsupported): {', '.join(ignored)}",
              file=sys.stderr)
        for key in ignored:
            raw.pop(key)
    for list_key in ("datasets", "test_datasets"):
        for index, entry in enumerate(raw.get(list_key) or []):
            if isinstance(entry, dict):
                for key in entry:
                    if key not in DatasetConfig.model_fields:
                        raise ConfigError(
                            f"unknown key {key!r} in {list_key}.{index}{_suggest(key, DatasetConfig.model_fields)}"
                        )


def _describe_error(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "missing":
        return f"config key {key!r} is required and was not given"
    value = error.get("input")
    return f"config key {key!r}: {value!r} is not accepted: {error['msg']}"


def build_config(
    pm,
    raw: dict[str, Any],
    sources: dict[str, str] | None = None,
    *,
    allow_unsupported: bool = False,
) -> CoreConfig:
    """Validate ``raw`` against core's and the plugins' keys, then run every
    plugin's ``validate_config``. Returns the typed config with its sources."""
    raw = dict(raw)
    cls = config_class(pm)
    _check_keys(raw, cls, allow_unsupported)
    try:
        cfg = cls.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe_error(e) for e in exc.errors())) from None
    cfg._sources.update(sources or {})
    cfg._pm = pm
    _check_dataset_types(pm, cfg)
    pm.hook.validate_config(cfg=cfg)
    return cfg


def _check_dataset_types(pm, cfg) -> None:
    known: set[str] = set()
    for types in pm.hook.dataset_types():
        known.update(types or ())
    for list_key in ("datasets", "test_datasets"):
        for index, entry in enumerate(getattr(cfg, list_key)):
            if entry.type is None:
                continue
            base = entry.type.split(".")[0]
            if base not in known:
                accepted = ", ".join(sorted(known)) or "none (no format plugin is installed: pip install plait-formats)"
                raise ConfigError(
                    f"config key '{list_key}.{index}.type': {entry.type!r} is not a known dataset type{_suggest(base, known)}\n"
                    f"accepted: {accepted}"
                )


def explain(cfg) -> list[tuple[str, Any, str]]:
    """Every resolved key with its value and source, for ``plait config explain``."""
    rows = []
    data = cfg.model_dump()
    for key in type(cfg).model_fields:
        value = data[key]
        source = cfg.source_of(key)
        nested = [s for k, s in cfg._sources.items() if k.startswith(key + ".")]
        if "override" in nested:  # a list or mapping the command line reached into
            source = "override"
        elif source == "default" and nested:
            source = nested[0]
        rows.append((key, value, source))
    return rows

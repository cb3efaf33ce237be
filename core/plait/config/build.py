"""Validate a raw config dict into the typed run config.

Core's :class:`~plait.config.schema.CoreConfig` and every plugin's
``config_schema`` model are combined by inheritance into one pydantic class;
the instance flows through the whole run. Errors name the key, the bad value
and what is accepted.
"""

from __future__ import annotations

import sys
from typing import Any

from typing import Annotated, Union

from pydantic import BaseModel, Discriminator, Field, Tag, ValidationError, create_model

from plait.config.axolotl_keys import KEYS_OF_PLUGINS, UNSUPPORTED_KEYS
from plait.config.schema import CoreConfig
from plait.errors import ConfigError, did_you_mean
from plait.registries import DatasetEntry, check_names, check_variant, find_format, format_key, registry, untyped_format


def config_class(pm) -> type[CoreConfig]:
    """The run's config class: core's keys plus every plugin's.

    Two plugins (or a plugin and core) declaring the same key is an error that
    names both. ``datasets``/``test_datasets`` entries are a union
    discriminated on ``type``: each validates against its format's
    ``entry_model`` (from the ``dataset_formats`` registry).
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
    entries, described = entry_union(pm), entry_description(pm)
    return create_model("PlaitConfig", __base__=(CoreConfig, *plugin_models),
                        datasets=(list[entries], Field(default_factory=list, description=described)),
                        test_datasets=(list[entries], Field(default_factory=list, description=described)))


def entry_description(pm) -> str:
    """Which ``type`` selects which entry model, for ``plait config schema``."""
    by_model: dict[str, list[str]] = {}
    for name, fmt in registry(pm, "dataset_formats").items():
        by_model.setdefault(fmt.entry_model.__name__, []).append(name)
    listed = "; ".join(f"{', '.join(names)}: {model}" for model, names in by_model.items())
    return f"Dataset entries; the part of 'type' before the first dot selects the keys ({listed or 'no formats'})."


def entry_union(pm):
    """The type of one ``datasets:`` entry: each registered format's
    ``entry_model``, chosen by the entry's ``type`` (see
    :func:`plait.registries.format_key`); an entry without ``type`` takes the
    untyped format's model, or core's :class:`DatasetEntry`."""
    formats = registry(pm, "dataset_formats")
    untyped = untyped_format(formats)
    model_of = {name: fmt.entry_model for name, fmt in formats.items()}
    model_of[""] = untyped.entry_model if untyped else DatasetEntry
    # one union member per model (formats may share one: alpaca and its variants), tagged by the model
    models = list(dict.fromkeys(model_of.values()))
    members = [Annotated[model, Tag(f"{model.__module__}.{model.__qualname__}")] for model in models]

    def tag(value) -> str:
        type_value = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
        if not isinstance(type_value, (str, type(None))):
            return f"{DatasetEntry.__module__}.{DatasetEntry.__qualname__}"  # its type: str refuses the value
        model = model_of.get(format_key(type_value, formats), DatasetEntry)
        return f"{model.__module__}.{model.__qualname__}"

    if len(members) == 1:
        return models[0]
    return Annotated[Union[tuple(members)], Discriminator(tag)]


def _suggest(key: str, known) -> str:
    return did_you_mean(key, known, cutoff=0.75)


def _check_keys(pm, raw: dict, cls: type[BaseModel], allow_unsupported: bool) -> None:
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
        entries = raw.get(list_key)
        # anything but a list (`datasets: true`) is the schema's to report, with the key
        for index, entry in enumerate(entries if isinstance(entries, list) else []):
            if isinstance(entry, dict):
                _check_entry_keys(pm, entry, f"{list_key}.{index}")


def _check_entry_keys(pm, entry: dict, where: str) -> None:
    """An entry's ``type`` must be a registered format, and its keys that
    format's: an unknown key is reported against the format's model, naming
    the format that owns it when another one does."""
    type_value = entry.get("type")
    if type_value is not None and not isinstance(type_value, str):
        return  # pydantic reports the wrong type
    fmt = find_format(pm, type_value, key=f"{where}.type")
    model = fmt.entry_model if fmt else DatasetEntry
    owners: dict[str, str] = {}
    for name, other in registry(pm, "dataset_formats").items():
        for key in other.entry_model.model_fields:
            owners.setdefault(key, name)
    for key in entry:
        if key in model.model_fields:
            continue
        what = f"format {fmt.name!r}" if fmt else "an entry without type"
        accepted = f"\naccepted for {what}: {', '.join(model.model_fields)}"
        if key in owners:
            raise ConfigError(f"unknown key {key!r} in {where}: it is a key of format {owners[key]!r}, "
                              f"not of {what}{accepted}")
        raise ConfigError(f"unknown key {key!r} in {where}{_suggest(key, model.model_fields)}{accepted}")


def _describe_error(error: dict) -> str:
    # a union's members show up in the location (gradient_checkpointing.bool): the key is the path before them
    key = ".".join(str(part) for part in error["loc"] if not _is_type_tag(part))
    kind = error["type"]
    if kind == "missing":
        return f"config key {key!r} is required and was not given"
    value = error.get("input")
    message = error["msg"].removeprefix("Value error, ")  # our validators' messages read as they are
    return f"config key {key!r}: {value!r} is not accepted: {message}"


def _is_type_tag(part) -> bool:
    """A union member's name in an error location: a type (``bool``, ``list[str]``) or a
    dataset entry model's tag (``plait_formats.entries.InstructionEntry``)."""
    import re

    return isinstance(part, str) and (part in ("bool", "int", "float", "str", "dict", "list") or "[" in part
                                      or re.fullmatch(r"[\w.]+\.[A-Z]\w*", part) is not None)


def build_config(
    pm,
    raw: dict[str, Any],
    sources: dict[str, str] | None = None,
    *,
    allow_unsupported: bool = False,
) -> CoreConfig:
    """Validate ``raw`` against core's and the plugins' keys, run every
    plugin's ``configure`` then ``validate_config``, and look the registered
    names up (dataset types and their variants, optimizer, schedule). Returns
    the typed config with its sources."""
    raw = dict(raw)
    cls = config_class(pm)
    _check_keys(pm, raw, cls, allow_unsupported)
    try:
        cfg = cls.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe_error(e) for e in exc.errors())) from None
    cfg._sources.update(sources or {})
    cfg._pm = pm
    _check_variants(pm, cfg)
    pm.hook.configure(cfg=cfg)
    pm.hook.validate_config(cfg=cfg)
    check_names(cfg, pm)
    return cfg


def _check_variants(pm, cfg) -> None:
    for list_key in ("datasets", "test_datasets"):
        for index, entry in enumerate(getattr(cfg, list_key)):
            if entry.type is not None:
                fmt = find_format(pm, entry.type, key=f"{list_key}.{index}.type")
                check_variant(fmt, entry.type, f"config key '{list_key}.{index}.type' (dataset {entry.path!r})")


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

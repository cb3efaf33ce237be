"""Validate a raw config dict into the typed run config.

Core's :class:`~plait.config.schema.CoreConfig` and every plugin's
``config_schema`` model are combined by inheritance into one pydantic class;
the instance flows through the whole run. Every problem found on the way is
gathered (:mod:`plait.config.problems`) and raised in one message naming each
key, the bad value and what is accepted.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Union

from pydantic import BaseModel, Discriminator, Field, Tag, ValidationError, create_model

from plait.model.names import ATTENTION_FLAGS, substitute_attention
from plait.model.transformers_kernels import apply_axolotl_experts_flags
from plait.config.axolotl_keys import (ATTENTION_SWITCHES, DTYPE_SWITCHES, NO_OP_KEYS, RENAMED_KEYS, asks_for_nothing,
                                       is_axolotl_key, lacking_reason)
from plait.config.plugin_keys import unloaded_key_owners
from plait.config.problems import Problems
from plait.config.schema import CoreConfig
from plait.config.trl_block import read_trl_block
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
    formats = registry(pm, "dataset_formats")
    # the class depends only on the plugins' models and each format's name, entry model and untyped flag;
    # building it is pydantic's schema generation (~0.1 s), so runs with the same plugins share one
    key = (tuple(plugin_models), tuple((name, fmt.entry_model, bool(fmt.untyped)) for name, fmt in formats.items()))
    try:
        hash(key)
    except TypeError:  # an unhashable model class: build it for this run alone
        return _compose(key[0], formats)
    cls = _COMPOSED.get(key)
    if cls is None:
        if len(_COMPOSED) >= 32:  # plugin sets made on the fly (tests): keep the cache small
            _COMPOSED.clear()
        cls = _COMPOSED[key] = _compose(key[0], formats)
    return cls


_COMPOSED: dict[tuple, type] = {}


def _compose(plugin_models: tuple, formats) -> type[CoreConfig]:
    entries, described = _entry_union(formats), _entry_description(formats)
    return create_model("PlaitConfig", __base__=(CoreConfig, *plugin_models),
                        datasets=(list[entries], Field(default_factory=list, description=described)),
                        test_datasets=(list[entries], Field(default_factory=list, description=described)))


def entry_description(pm) -> str:
    """Which ``type`` selects which entry model, for ``plait config schema``."""
    return _entry_description(registry(pm, "dataset_formats"))


def _entry_description(formats) -> str:
    by_model: dict[str, list[str]] = {}
    for name, fmt in formats.items():
        by_model.setdefault(fmt.entry_model.__name__, []).append(name)
    listed = "; ".join(f"{', '.join(names)}: {model}" for model, names in by_model.items())
    return (f"Dataset entries; the part of 'type' before the first dot or colon selects the keys "
            f"({listed or 'no formats'}).")


def entry_union(pm):
    """The type of one ``datasets:`` entry: each registered format's
    ``entry_model``, chosen by the entry's ``type`` (see
    :func:`plait.registries.format_key`); an entry without ``type`` takes the
    untyped format's model, or core's :class:`DatasetEntry`."""
    return _entry_union(registry(pm, "dataset_formats"))


def _entry_union(formats):
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


def _blank_means_unset(cls: type[BaseModel], raw: dict, sources: dict) -> None:
    """A blank value (``fp16:``) means "unset", as in Axolotl: drop it so the
    key takes its default, and forget that the file set it (plugins ask
    ``source_of`` whether a user gave a key)."""
    for key in [k for k, v in raw.items() if v is None]:
        sources.pop(key, None)
        if key in cls.model_fields and (cls.model_fields[key].default is not None
                                        or cls.model_fields[key].is_required()):
            del raw[key]


def _sort_keys(raw: dict, cls: type[BaseModel], pm, problems: Problems, allow_unsupported: bool) -> list[str]:
    """Keep the keys the config class declares; file every other key as a
    problem (unknown, an Axolotl feature Plait lacks, a key of a plugin that is
    not loaded) or drop it (a no-op, a blank or default value of an Axolotl
    key). Returns the no-op keys the config sets, for ``plait train`` to name."""
    known = set(cls.model_fields)
    owners = None
    ignored, unsupported = [], []
    read_trl_block(raw, problems)  # Axolotl's trl: {beta: ...} is rl_beta
    for switch, backend in ATTENTION_SWITCHES.items():
        if raw.pop(switch, None):  # Axolotl's xformers_attention: true is attn_implementation: xformers
            chosen = raw.get("attn_implementation") or next(
                (flag for flag in ATTENTION_FLAGS.values() if raw.get(flag)), None)
            if chosen is not None:
                problems.add("value", f"{switch}: true and {chosen} both choose the attention backend; keep one")
            else:
                raw["attn_implementation"] = backend
    backend, note = substitute_attention(raw.get("attn_implementation"))
    if note:
        raw["attn_implementation"] = backend
        problems.note(note)
    for key in list(raw):
        if key in DTYPE_SWITCHES:
            value = raw.pop(key)
            if value:  # Axolotl's bfloat16: true loads the weights in that dtype
                dtype = DTYPE_SWITCHES[key]
                if raw.get("torch_dtype") not in (None, dtype):
                    problems.add("value", f"{key}: true and torch_dtype: {raw['torch_dtype']} disagree; keep one")
                raw["torch_dtype"] = dtype
            continue
        if key in RENAMED_KEYS and RENAMED_KEYS[key] in known:
            target = RENAMED_KEYS[key]
            value = raw.pop(key)
            if raw.get(target) is not None and value is not None and raw[target] != value:
                problems.add("value", f"{key} (Axolotl's name of {target}) and {target} are both set, to "
                                      f"{value!r} and {raw[target]!r}; keep one")
            elif value is not None:
                raw[target] = value
            continue
        if key in known:
            continue
        value = raw.pop(key)
        if key in NO_OP_KEYS:
            if value is not None:  # set, to anything: say that it changes nothing
                ignored.append(key)
            continue
        if owners is None:
            owners = unloaded_key_owners(pm)
        if key in owners:
            if value is not None:
                problems.add("plugin", f"{key}: {owners[key].advice()}")
            continue
        if is_axolotl_key(key):
            if asks_for_nothing(key, value):
                continue
            if allow_unsupported:
                unsupported.append(key)
            else:
                problems.add("lacking", f"{key}: {lacking_reason(key)}")
            continue
        suggestion = _suggest(key, known) or _suggest(key, NO_OP_KEYS)
        if suggestion:  # most likely a misspelt key, whose value would otherwise be lost without a word
            problems.add("unknown", f"unknown config key {key!r}{suggestion}")
        elif value is not None:
            # near no key at all: not a typo of one. Axolotl drops keys it does not know, so configs carry
            # such keys (a test marker, a key of some older release); Plait says so and goes on
            problems.note(f"config key {key!r} is not a key of Plait or of Axolotl, and near none of them; it is "
                          f"ignored (as Axolotl ignores keys it does not know)")
    if unsupported:
        # one plain line on stderr (python's warnings would add a file path and a source line)
        print(f"warning: ignoring Axolotl keys Plait does not support (--allow-unsupported): {', '.join(unsupported)}",
              file=sys.stderr)
    elif problems.by_group.get("lacking"):
        problems.note("--allow-unsupported ignores the Axolotl features Plait does not have, with a warning")
    for list_key in ("datasets", "test_datasets"):
        entries = raw.get(list_key)
        # anything but a list (`datasets: true`) is the schema's to report, with the key
        if not isinstance(entries, list):
            continue
        kept = []
        for index, entry in enumerate(entries):
            if isinstance(entry, dict):
                for key in [k for k, v in entry.items() if v is None]:
                    del entry[key]  # blank means unset here too
                if isinstance(entry.get("type"), dict):
                    entry = _inline_type(entry, bool(raw.get("rl")), f"{list_key}.{index}", problems)
                if not _check_entry_keys(pm, entry, f"{list_key}.{index}", problems):
                    continue  # an unknown type: its keys cannot be checked, the problem is filed
            kept.append(entry)
        raw[list_key] = kept
    return ignored


def _inline_type(entry: dict, preference: bool, where: str, problems: Problems) -> dict:
    """Axolotl's custom dataset type written as a mapping under ``type:``
    (``type: {field_prompt: ..., prompt_format: ...}``): Axolotl reads it as
    ``user_defined.default`` for preference tuning (``rl:``) and as
    ``user_defined`` otherwise, the mapping's keys being that format's. The
    entry becomes that type with the keys beside it; a key set in both places
    to different values is a problem."""
    spec = {key: value for key, value in entry["type"].items() if value is not None}
    rest = {key: value for key, value in entry.items() if key != "type"}
    for key in sorted(spec):
        if key in rest and rest[key] != spec[key]:
            problems.add("dataset", f"{where}.type.{key} is {spec[key]!r} but {where}.{key} is {rest[key]!r}; keep one")
    return {**rest, **spec, "type": "user_defined.default" if preference else "user_defined"}


def _check_entry_keys(pm, entry: dict, where: str, problems: Problems) -> bool:
    """An entry's ``type`` must be a registered format, and its keys that
    format's: every unknown key is filed (and dropped), naming the format that
    owns it when another one does. ``False`` when the type is unknown."""
    type_value = entry.get("type")
    if type_value is not None and not isinstance(type_value, str):
        return True  # pydantic reports the wrong type
    try:
        fmt = find_format(pm, type_value, key=f"{where}.type")
    except ConfigError as exc:
        problems.add_error("dataset", exc)
        return False
    model = fmt.entry_model if fmt else DatasetEntry
    owners: dict[str, str] = {}
    for name, other in registry(pm, "dataset_formats").items():
        for key in other.entry_model.model_fields:
            owners.setdefault(key, name)
    for key in list(entry):
        if key in model.model_fields:
            continue
        entry.pop(key)
        what = f"format {fmt.name!r}" if fmt else "an entry without type"
        accepted = f"\naccepted for {what}: {', '.join(model.model_fields)}"
        if key in owners:
            problems.add("dataset", f"unknown key {key!r} in {where}: it is a key of format {owners[key]!r}, "
                                    f"not of {what}{accepted}")
        else:
            problems.add("dataset", f"unknown key {key!r} in {where}{_suggest(key, model.model_fields)}{accepted}")
    return True


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
    problems: Problems | None = None,
    extra_checks=(),
    machine_facts: str = "refuse",
) -> CoreConfig:
    """Validate ``raw`` against core's and the plugins' keys, then run every
    plugin's ``validate_config`` and each of ``extra_checks(cfg)``.

    Every problem found on the way is gathered into ``problems`` and raised
    together (:class:`~plait.config.problems.ConfigProblems`, a
    :class:`ConfigError`). Returns the typed config with its sources; the
    notes (``cfg.notes``) and the no-op keys it set (``cfg.ignored_keys``)
    travel with it. ``machine_facts``: ``"refuse"`` (train) files a
    :class:`~plait.errors.MachineFactError` as a problem, ``"note"``
    (validate) as a note."""
    problems = Problems() if problems is None else problems
    problems.machine_facts = machine_facts
    raw = {key: (dict(v) if isinstance(v, dict) else v) for key, v in raw.items()}
    for list_key in ("datasets", "test_datasets"):
        if isinstance(raw.get(list_key), list):
            raw[list_key] = [dict(e) if isinstance(e, dict) else e for e in raw[list_key]]
    cls = config_class(pm)
    sources = dict(sources or {})
    try:
        for line in apply_axolotl_experts_flags(raw):
            problems.note(line)
            sources["experts_implementation"] = "Axolotl's experts flag"
    except ConfigError as exc:
        problems.add_error("value", exc)
    ignored = _sort_keys(raw, cls, pm, problems, allow_unsupported)
    _blank_means_unset(cls, raw, sources)
    try:
        cfg = cls.model_validate(raw)
    except ValidationError as exc:
        for error in exc.errors():
            problems.add("value", _describe_error(error))
        problems.raise_if_any()
        raise AssertionError("unreachable") from None
    except ConfigError as exc:  # a cross-key rule of a model validator
        problems.add_error("value", exc)
        problems.raise_if_any()
        raise
    cfg._sources.update(sources)
    cfg._pm = pm
    cfg._ignored_keys = ignored
    _check_variants(pm, cfg, problems)
    try:
        pm.hook.configure(cfg=cfg)  # defaults and derived values; a refusal here stops the checks after it
    except ConfigError as exc:
        problems.add_error("value", exc)
        problems.raise_if_any()
    _run_validate_config(pm, cfg, problems)
    # the registries' lookups (optimizer, schedule), then the caller's checks
    for check in (lambda cfg: check_names(cfg, pm), *extra_checks):
        try:
            check(cfg)
        except ConfigError as exc:
            problems.add_error("value", exc)
    problems.raise_if_any()
    cfg._notes = [*problems.notes, *(note for note in cfg._notes if note not in problems.notes)]
    return cfg


def _run_validate_config(pm, cfg, problems: Problems) -> None:
    """Call every plugin's ``validate_config`` (last registered first, as
    pluggy would) and keep going after one refuses, so all are heard."""
    for impl in reversed(pm.hook.validate_config.get_hookimpls()):
        kwargs = {"cfg": cfg}
        try:
            impl.function(*[kwargs[name] for name in impl.argnames])
        except ConfigError as exc:
            problems.add_error("value", exc)


def _check_variants(pm, cfg, problems: Problems) -> None:
    for list_key in ("datasets", "test_datasets"):
        for index, entry in enumerate(getattr(cfg, list_key)):
            if entry.type is None:
                continue
            try:
                fmt = find_format(pm, entry.type, key=f"{list_key}.{index}.type")
                check_variant(fmt, entry.type, f"config key '{list_key}.{index}.type' (dataset {entry.path!r})")
            except ConfigError as exc:
                problems.add_error("dataset", exc)


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

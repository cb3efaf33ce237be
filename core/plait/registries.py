"""Named things plugins register: dataset formats, optimizers, schedules.

Each registry hook (:func:`plait.hookspecs.dataset_formats`,
:func:`~plait.hookspecs.optimizers`, :func:`~plait.hookspecs.schedulers`)
returns a list of the records below. Every plugin is asked and the answers are
combined; two plugins registering the same name is a
:class:`~plait.errors.PluginError` naming both. Names are checked at config
time by a lookup (:func:`find_optimizer`, :func:`find_scheduler`,
:func:`find_format`), never by a trial call, so a typo fails before any model
or data work, with the closest accepted name.

This module is part of the published plugin API::

    from plait.registries import DatasetEntry, DatasetFormat, Optimizer, Scheduler
"""

from __future__ import annotations

import importlib.util
import weakref
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Union

from pydantic import ConfigDict, Field, field_validator

from plait.errors import ConfigError, MachineFactError, PluginError, did_you_mean
from plait.values import ValuesAsGiven, not_empty


class DatasetEntry(ValuesAsGiven):
    """One entry of ``datasets:`` / ``test_datasets:``: where the rows come from.

    These keys are read by core (loading, splitting, sharding) whatever the
    format. A format adds its own keys by subclassing this model and naming the
    subclass as its :attr:`DatasetFormat.entry_model`; the config then
    validates each entry against the model of its ``type`` (the part before
    the first dot), so ``plait config schema`` shows each format's keys and an
    unknown key is reported against that format.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    path: str = Field(description="Local file or directory, or a hub dataset name.")
    _path_not_empty = field_validator("path")(not_empty)
    type: Optional[str] = Field(None, description="Format: alpaca, chat_template, completion, ... "
                                "(a format's variant after a dot: chat_template.default; Axolotl's prompt "
                                "style after a colon: alpaca:chat).")
    ds_type: Optional[str] = Field(None, description="File type when the extension does not tell: json, parquet, "
                                   "csv, arrow, text.")
    data_files: Optional[Union[str, list[str]]] = Field(
        None,
        description="File name(s) inside path to read (a hub dataset's or a directory's), instead of all of them.")
    split: str = Field("train", description="The split to train on (local files have one split, train).")
    train_on_split: Optional[str] = Field(None, description="Split to train on (Axolotl's key; wins over split).")
    name: Optional[str] = Field(None, description="Dataset configuration name on the hub.")
    shards: Optional[int] = Field(
        None, ge=1, description="Split the dataset into this many contiguous shards and keep one (shards_idx).")
    shards_idx: Optional[int] = Field(None, ge=0, description="Which shard to keep, 0 to shards - 1 (default 0).")
    revision: Optional[str] = Field(None, description="Hub dataset revision (branch, tag or commit).")
    trust_remote_code: bool = Field(
        False, description="Let datasets run the dataset's own loading script from the hub.")
    field: Optional[str] = Field(None, description="Top-level JSON field holding the rows (a format may also read "
                                 "it, e.g. completion's text field).")
    train_on_inputs: Optional[bool] = Field(None, description="This dataset's train_on_inputs (default: the run's).")


@dataclass(frozen=True)
class DatasetFormat:
    """A dataset ``type:`` and how its rows become tokens.

    ``name``
        The ``type:`` value (the part before the first dot; ``chat_template``
        also answers ``chat_template.default``).
    ``tokenize``
        ``tokenize(cfg, dataset_cfg, tokenizer, batch) -> dict`` with the
        contract of :func:`plait.hookspecs.tokenize` (return ``None`` only for
        a batch the format cannot read at all).
    ``entry_model``
        The pydantic model of this format's entries: :class:`DatasetEntry` or a
        subclass adding the format's keys.
    ``check_type``
        Optional ``check_type(type_value, where)`` called at config time with
        the full ``type:`` value (``alpaca.load_concise``), to refuse a variant
        the format does not have; ``where`` names the config key for messages.
    ``untyped``
        This format also reads entries without ``type:`` (at most one format
        may say so; core asks it and it returns ``None`` for rows it cannot read).
    ``description``
        One line for listings.
    ``prompt``
        Optional ``prompt(type_value, row) -> str``: the text the trained part
        of ``row`` (a dict of the format's columns) follows, for formats built
        on a prompt, so a trained model can be asked the way it was trained
        (``plait quickstart`` scores with it).
    ``cache_inputs``
        Optional ``cache_inputs(cfg) -> JSON-able value``: what else in the
        config shapes this format's rows, beyond the entry's own keys and the
        run keys core always hashes (:data:`plait.data.cache.RUN_KEYS`). It
        joins the prepared data's cache key, so changing it prepares the data
        again instead of reusing rows made for other settings.
    """

    name: str
    tokenize: Callable[..., Any]
    entry_model: type[DatasetEntry] = DatasetEntry
    check_type: Optional[Callable[[str, str], None]] = None
    untyped: bool = False
    description: str = ""
    prompt: Optional[Callable[[str, dict], str]] = None
    cache_inputs: Optional[Callable[[Any], Any]] = None


@dataclass(frozen=True)
class Optimizer:
    """An ``optimizer:`` name and how to build it.

    ``build(cfg, params) -> torch.optim.Optimizer``: ``params`` are parameter
    groups (dicts with ``params`` and ``weight_decay``). ``requires`` lists the
    import names it needs and ``install`` what to install when one is missing
    (checked at config time). ``check(cfg)`` optionally validates the keys the
    optimizer reads (``optim_args``) at config time, raising
    :class:`~plait.errors.ConfigError`. ``embeddings_apart``: the input and
    output embeddings' parameters come in groups of their own, marked
    ``embeddings: True`` (Muon trains them with AdamW).
    """

    name: str
    build: Callable[..., Any]
    requires: tuple[str, ...] = ()
    install: str = ""
    check: Optional[Callable[[Any], None]] = None
    description: str = ""
    embeddings_apart: bool = False


@dataclass(frozen=True)
class Scheduler:
    """An ``lr_scheduler:`` name and how to build it.

    ``build(cfg, optimizer, total_steps) -> LRScheduler``, stepped once per
    optimizer step. ``kwargs`` are the ``lr_scheduler_kwargs`` it accepts
    (anything else is refused at config time); ``check(cfg)`` optionally
    validates more.
    """

    name: str
    build: Callable[..., Any]
    kwargs: tuple[str, ...] = ()
    check: Optional[Callable[[Any], None]] = None
    description: str = ""


def build_transformers_optimizer(cfg, params):
    """The optimizer transformers' ``Trainer`` builds for ``cfg.optimizer``
    (a name of ``transformers.training_args.OptimizerNames``), from Plait's
    keys (``learning_rate``, ``weight_decay``, ``adam_*``); ``optim_args``
    override its keyword arguments. A ready ``Optimizer.build`` for plugins."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=cfg.output_dir, optim=cfg.optimizer, learning_rate=cfg.learning_rate,
                             weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,
                             adam_epsilon=cfg.adam_epsilon, report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    return cls(params, **{**kwargs, **cfg.optim_args})


@dataclass(frozen=True)
class Elsewhere:
    """Names Plait knows but no installed plugin registers, and why a lookup
    of one is refused: the package that provides it, or why Plait does not
    support it. ``reason`` completes ``config key 'optimizer': 'NAME' ...``."""

    registry: str  # "optimizers", "schedulers" or "dataset_formats"
    names: tuple[str, ...]
    reason: str


#: transformers' optimizer and schedule names that no first-party registry serves here
ELSEWHERE = (
    Elsewhere("optimizers", (
        "adamw_bnb_8bit", "adamw_8bit", "ademamix", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
        "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit",
        "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"),
        "is a bitsandbytes optimizer; install plait-bnb (pip install plait-bnb) to use it"),
    Elsewhere("optimizers", (
        "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
        "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "apollo_adamw", "apollo_adamw_layerwise",
        "lomo", "adalomo"),
        "is not supported by Plait: it needs the model's target modules and a per-layer update "
        "(GaLore/APOLLO/LOMO) that the training loop does not do"),
    Elsewhere("optimizers", ("schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd"),
              "is not supported by Plait: schedule-free optimizers must be switched between train() and eval() "
              "around evaluation, which the training loop does not do"),
    Elsewhere("optimizers", ("optimi_adamw", "adopt_adamw", "came_pytorch", "dion", "lion_pytorch",
                             "flash_adamw", "ao_adamw_fp8", "q_galore_adamw8bit", "sinkgd"),
              "is one of Axolotl's own optimizers, which Plait does not have; use adamw_torch (or "
              "adamw_torch_8bit / adamw_torch_4bit for less memory), or register it from a plugin's optimizers() "
              "hook"),
    Elsewhere("optimizers", ("adamw_torch_xla",), "needs a TPU (torch_xla); not supported by Plait"),
    Elsewhere("optimizers", ("adamw_torch_npu_fused",), "needs an Ascend NPU (torch_npu); not supported by Plait"),
    Elsewhere("schedulers", ("reduce_lr_on_plateau",),
              "is not supported by Plait: it needs the eval loss at every step, which the loop "
              "does not pass to the schedule"),
    Elsewhere("schedulers", ("greedy",),
              "is not supported by Plait: it needs the training loss at every step (transformers' "
              "GreedyLR), which the loop does not pass to the schedule"),
)

#: ``{registry: {name: reason}}`` from :data:`ELSEWHERE`, read-only (a lookup miss names the reason)
KNOWN_ELSEWHERE: Mapping[str, Mapping[str, str]] = MappingProxyType({
    registry: MappingProxyType({name: record.reason for record in ELSEWHERE if record.registry == registry
                                for name in record.names})
    for registry in ("optimizers", "schedulers", "dataset_formats")})


def missing_requirements(requires) -> list[str]:
    """The import names of ``requires`` that are not installed."""
    return [name for name in requires if importlib.util.find_spec(name) is None]


# per manager: hook name -> (the hookimpls asked, their combined answer)
_CACHES: "weakref.WeakKeyDictionary[Any, dict[str, tuple]]" = weakref.WeakKeyDictionary()


def registry(pm, hook_name: str) -> dict[str, Any]:
    """``{name: record}`` from every plugin's ``hook_name`` (``dataset_formats``,
    ``optimizers``, ``schedulers``), in registration order.

    Two plugins giving the same name is a :class:`PluginError` naming both.
    The result is kept per manager until a plugin is registered or removed.
    """
    hook = getattr(pm.hook, hook_name)
    impls = hook.get_hookimpls()
    key = tuple(impl.function for impl in impls)
    cached = _CACHES.setdefault(pm, {}).get(hook_name)
    if cached is not None and cached[0] == key:
        return cached[1]
    found: dict[str, Any] = {}
    owners: dict[str, str] = {}
    for impl in impls:  # pluggy lists them first-registered first
        for record in impl.function() or ():
            if record.name in owners:
                raise PluginError(f"{hook_name}: {record.name!r} is registered by two plugins: "
                                  f"{owners[record.name]!r} and {impl.plugin_name!r}; disable one of them "
                                  f"(disable_plugins or PLAIT_DISABLE_PLUGINS)")
            owners[record.name] = impl.plugin_name
            found[record.name] = record
    _CACHES[pm][hook_name] = (key, found)
    return found


def _unknown(key: str, value: str, what: str, hook_name: str, names) -> ConfigError:
    names = list(names)
    elsewhere = KNOWN_ELSEWHERE[hook_name].get(value)
    if elsewhere:
        return ConfigError(f"config key {key!r}: {value!r} {elsewhere}")
    return ConfigError(f"config key {key!r}: {value!r} is not a known {what}{did_you_mean(value, names)}\n"
                       f"accepted: {', '.join(names) or 'none'}")


def find_optimizer(pm, name: str, *, key: str = "optimizer") -> Optimizer:
    """The registered optimizer ``name``; an unknown name or a missing package
    is a :class:`ConfigError` naming ``key``, the closest names or what to install."""
    found = registry(pm, "optimizers")
    if name not in found:
        raise _unknown(key, name, "optimizer", "optimizers", found)
    record = found[name]
    missing = missing_requirements(record.requires)
    if missing:
        # a fact of this machine: validate notes it, train refuses it
        raise MachineFactError(f"config key {key!r}: {name!r} needs {', '.join(missing)}, which is not installed; "
                          f"{record.install or 'pip install ' + ' '.join(missing)}")
    return record


def find_scheduler(pm, name: str, *, key: str = "lr_scheduler") -> Scheduler:
    """The registered schedule ``name``, or a :class:`ConfigError` with the closest names."""
    found = registry(pm, "schedulers")
    if name not in found:
        raise _unknown(key, name, "schedule", "schedulers", found)
    return found[name]


def format_key(type_value: Optional[str], names) -> str:
    """The registry name a ``type:`` value selects: the whole value when a
    format registers it (``chat_template.mine``), else the part before the
    first dot or colon (Axolotl's ``alpaca:chat``); ``""`` for an entry
    without ``type``."""
    if type_value is None:
        return ""
    from plait.config.axolotl_types import type_base

    return type_value if type_value in names else type_base(type_value)


def find_format(pm, type_value: Optional[str], *, key: str = "type") -> Optional[DatasetFormat]:
    """The format of a ``type:`` value (``None``: the format that reads untyped
    entries, if one is registered); an unknown type is a :class:`ConfigError`."""
    found = registry(pm, "dataset_formats")
    if type_value is None:
        return untyped_format(found)
    name = format_key(type_value, found)
    if name not in found:
        from plait.config.axolotl_types import lacking_type_reason

        names = sorted(found)
        accepted = ", ".join(names) or "none (no format plugin is installed: pip install plait-formats)"
        reason = lacking_type_reason(type_value)
        if reason:  # an Axolotl type Plait does not have: say why and what to use
            raise ConfigError(f"config key {key!r}: {type_value!r} {reason}\naccepted: {accepted}")
        raise ConfigError(f"config key {key!r}: {type_value!r} is not a known dataset type"
                          f"{did_you_mean(name, names, cutoff=0.75)}\naccepted: {accepted}")
    return found[name]


def check_variant(fmt: DatasetFormat, type_value: str, where: str) -> None:
    """A dotted ``type:`` (or Axolotl's ``base:style``) must name a variant
    its format has (``fmt.check_type`` decides); a format without variants
    refuses any dot or colon."""
    if type_value == fmt.name or ("." not in type_value and ":" not in type_value):
        return
    if fmt.check_type is not None:
        fmt.check_type(type_value, where)
        return
    raise ConfigError(f"{where}: {type_value!r} is not accepted ({fmt.name} has no variants); "
                      f"did you mean {fmt.name!r}?\naccepted: {fmt.name}")


def untyped_format(found: dict[str, DatasetFormat]) -> Optional[DatasetFormat]:
    """The one format that reads entries without ``type`` (``untyped=True``), if any."""
    untyped = [fmt for fmt in found.values() if fmt.untyped]
    if len(untyped) > 1:
        raise PluginError(f"dataset_formats: {' and '.join(repr(f.name) for f in untyped)} both read entries "
                          f"without type (untyped=True); at most one format may")
    return untyped[0] if untyped else None


def check_names(cfg, pm) -> None:
    """Look ``optimizer`` and ``lr_scheduler`` up in the registries (a lookup,
    never a trial build) and run their config checks. Called by
    :func:`plait.config.build.build_config`; a :class:`ConfigError` names the
    key, the closest accepted name or what to install."""
    optimizer = find_optimizer(pm, cfg.optimizer)
    if optimizer.check:
        optimizer.check(cfg)
    scheduler = find_scheduler(pm, cfg.lr_scheduler)
    unknown = [k for k in cfg.lr_scheduler_kwargs if k not in scheduler.kwargs]
    if unknown:
        raise ConfigError(f"config key 'lr_scheduler_kwargs': {unknown} are not arguments of schedule "
                          f"{cfg.lr_scheduler!r}; accepted: {', '.join(scheduler.kwargs) or 'none'}")
    if scheduler.check:
        scheduler.check(cfg)

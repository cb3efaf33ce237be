"""Build the plugin manager for one run.

Plugins come from three places, registered in this order (later ones are asked
first by firstresult hooks, so they override earlier ones):

1. core's own defaults (:data:`DEFAULT_PLUGINS`), hookimpls like any other;
2. installed distributions with an entry point in the group ``plait``;
3. dotted import paths listed under ``plugins:`` in the config.

``PLAIT_LOAD_PLUGINS=name1,name2`` loads only those entry-point plugins (empty
string: none); ``PLAIT_DISABLE_PLUGINS`` or the config's ``disable_plugins``
skips the named ones. A name in any of the three that matches no plugin is an
error naming the variable or key and the installed plugins (a typo never
silently loads or skips nothing). A plugin that fails to import or declares a
hook that does not exist is an error naming the plugin and its distribution. There is no
global manager: each run builds its own and passes it down.

``PLAIT_TRACE_HOOKS=1`` logs every hook call (logger ``plait.hooks``): the
arguments' names, the plugins asked in call order, and what came back
(:func:`trace_hook_calls`, through pluggy's hook-call monitoring).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import pluggy

from plait import hookspecs
from plait.errors import PluginError, did_you_mean

ENTRY_POINT_GROUP = "plait"

DEFAULT_PLUGINS = (
    "plait.builtin.model",
    "plait.builtin.formats",
    "plait.builtin.optim",
    "plait.builtin.lr_groups",
    "plait.builtin.collate",
    "plait.builtin.save",
    "plait.builtin.loss",
    "plait.builtin.tracking",
    "plait.builtin.hub",
    "plait.builtin.profiler",
)
#: core's defaults the pipeline cannot run without (as pytest's ``essential_plugins``):
#: disabling one is an error. A plugin replaces one by answering its hooks first, never by disabling it.
ESSENTIAL_PLUGINS = tuple(name for name in DEFAULT_PLUGINS
                          if name not in ("plait.builtin.tracking", "plait.builtin.profiler"))


@dataclass
class PluginInfo:
    """How one plugin got here, for ``plait plugins`` and error messages."""

    name: str
    distribution: str | None = None
    version: str | None = None
    source: str = "builtin"  # builtin | entrypoint | config | test
    hooks: list[str] = field(default_factory=list)


class PlaitPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers where each plugin came from."""

    def __init__(self) -> None:
        super().__init__("plait")
        self.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}

    def register_plugin(self, plugin, name: str, *, source: str, distribution=None, version=None):
        """Register ``plugin`` and validate its hooks now, so a bad hookimpl is
        blamed on the plugin that declared it."""
        owner = f"plugin {name!r}" + (f" (distribution {distribution} {version})" if distribution else "")
        try:
            self.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"{owner} declares an invalid hook: {exc}") from None
        except ValueError as exc:  # already registered
            raise PluginError(f"{owner} cannot be registered: {exc}") from None
        for attr_name in dir(plugin):
            attr = getattr(plugin, attr_name, None)
            if not (callable(attr) and hasattr(attr, "plait_impl")):
                continue
            # hookimpl(specname=...) lets one plugin give a hook two implementations
            impl_name = (attr.plait_impl or {}).get("specname") or attr_name
            caller = getattr(self.hook, impl_name, None)
            # pluggy keeps hookimpls without a spec pending; we refuse them at once
            if caller is None or not caller.has_spec():
                self.unregister(name=name)
                raise PluginError(f"{owner} implements {impl_name!r}, which is not a Plait hook")
        self.info[name] = PluginInfo(
            name=name,
            distribution=distribution,
            version=version,
            source=source,
            hooks=sorted(impl.name for impl in self._hookimpls_of(name)),
        )
        return plugin

    def _hookimpls_of(self, name: str):
        plugin = self.get_plugin(name)
        for caller in self.get_hookcallers(plugin) or ():
            yield caller

    def list_plugins(self) -> list[PluginInfo]:
        return list(self.info.values())


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def build_plugin_manager(
    config_plugins: list[str] = (),
    *,
    disable: list[str] = (),
    env: dict[str, str] | None = None,
    entry_points: bool = True,
    extra: list = (),
) -> PlaitPluginManager:
    """Build the manager for one run.

    ``config_plugins`` are dotted module paths from the config's ``plugins:``;
    ``disable`` are plugin names to skip; ``extra`` are plugin objects to
    register last (the test kit uses this).
    """
    env = os.environ if env is None else env
    # a config's `plugins: a.module` is one name, never a list of its characters (the schema agrees)
    config_plugins = [config_plugins] if isinstance(config_plugins, str) else list(config_plugins)
    disable = [disable] if isinstance(disable, str) else list(disable)
    allow = _names(env.get("PLAIT_LOAD_PLUGINS"))
    env_disabled = _names(env.get("PLAIT_DISABLE_PLUGINS")) or []
    disabled = set(disable) | set(env_disabled)

    installed = _installed_entry_points(tuple(sys.path))
    ep_names = [ep.name for ep, _, _ in installed]
    extra_names = [_extra_name(plugin) for plugin in extra]
    known = [*DEFAULT_PLUGINS, *ep_names, *config_plugins, *extra_names]
    _check_names(allow or [], "environment variable PLAIT_LOAD_PLUGINS", [*DEFAULT_PLUGINS, *ep_names], ep_names)
    _check_names(env_disabled, "environment variable PLAIT_DISABLE_PLUGINS", known, ep_names)
    _check_names(list(disable), "config key 'disable_plugins'", known, ep_names)
    _check_not_essential(env_disabled, "environment variable PLAIT_DISABLE_PLUGINS")
    _check_not_essential(list(disable), "config key 'disable_plugins'")

    pm = PlaitPluginManager()
    for module_name in DEFAULT_PLUGINS:
        if module_name in disabled:
            continue
        pm.register_plugin(importlib.import_module(module_name), module_name, source="builtin", distribution="plait",
                           version=_installed_version("plait", tuple(sys.path)))

    if entry_points:
        for ep, dist, version in installed:
            if ep.name in disabled or (allow is not None and ep.name not in allow):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {ep.name!r} (distribution {dist} {version}) failed to import {ep.value!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            pm.register_plugin(plugin, ep.name, source="entrypoint", distribution=dist, version=version)

    for dotted in config_plugins:
        if dotted in disabled:
            continue
        try:
            plugin = importlib.import_module(dotted)
        except Exception as exc:
            raise PluginError(
                f"plugin {dotted!r} listed under 'plugins:' failed to import: {type(exc).__name__}: {exc}"
            ) from exc
        if not pm.is_registered(plugin):  # already loaded through its entry point
            pm.register_plugin(plugin, dotted, source="config")

    for plugin in extra:
        if pm.is_registered(plugin):  # the test kit passing an installed plugin again
            continue
        pm.register_plugin(plugin, _extra_name(plugin), source="test")
    if env.get("PLAIT_TRACE_HOOKS", "") not in ("", "0"):
        trace_hook_calls(pm)
    return pm


def _describe_result(value) -> str:
    """A short description of a hook's answer (never a model's or a tensor's repr)."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_describe_result(v) for v in value) + "]"
    return type(value).__name__


def trace_hook_calls(pm) -> Callable[[], None]:
    """Log every hook call of ``pm`` at INFO on ``plait.hooks``: before, the
    hook, its arguments' names and the plugins in the order pluggy asks them
    (the last registered first, ``tryfirst``/``trylast`` applied); after, the
    result's type or the exception. Returns the function that stops it."""
    import logging

    log = logging.getLogger("plait.hooks")

    def before(hook_name, hook_impls, kwargs):
        order = [impl.plugin_name for impl in reversed(hook_impls)]
        log.info("%s(%s): asking %s", hook_name, ", ".join(kwargs), ", ".join(order) or "no plugin")

    def after(outcome, hook_name, hook_impls, kwargs):
        if outcome.exception is not None:
            log.info("%s raised %s: %s", hook_name, type(outcome.exception).__name__, outcome.exception)
        else:
            log.info("%s returned %s", hook_name, _describe_result(outcome.get_result()))

    return pm.add_hookcall_monitoring(before, after)


def call_required(pm, name: str, **kwargs):
    """Call the firstresult hook ``name`` where the pipeline needs its result:
    ``None`` (no plugin answered) is an error naming the hook (:func:`no_result_error`)."""
    result = getattr(pm.hook, name)(**kwargs)
    if result is None:
        raise no_result_error(pm, name)
    return result


def no_result_error(pm, name: str) -> PluginError:
    """The error for a firstresult hook that returned nothing where a result is needed."""
    implementers = [impl.plugin_name for impl in getattr(pm.hook, name).get_hookimpls()]
    return PluginError(
        f"hook {name!r} returned nothing (None), and the run needs its result; implemented by: "
        f"{', '.join(reversed(implementers)) or 'no plugin'}. A plugin answering {name!r} must return a value "
        f"or leave it to core's default")


def _extra_name(plugin) -> str:
    return getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{id(plugin):x}"


def _check_names(names: list[str], where: str, known: list[str], installed: list[str]) -> None:
    """A plugin name that matches nothing is an error, never a silent no-op."""
    unknown = [name for name in names if name not in known]
    if not unknown:
        return
    lines = []
    for name in unknown:
        lines.append(f"{where}: {name!r} is not an installed plugin{did_you_mean(name, known)}")
    listed = ", ".join(installed) or "none"
    lines.append(f"installed entry-point plugins: {listed}; core's own: {', '.join(DEFAULT_PLUGINS)} "
                 f"(`plait plugins` lists them)")
    raise PluginError("\n".join(lines))


def _check_not_essential(names: list[str], where: str) -> None:
    essential = [name for name in names if name in ESSENTIAL_PLUGINS]
    if essential:
        raise PluginError(
            f"{where}: {', '.join(map(repr, essential))} cannot be disabled: core's essential defaults "
            f"({', '.join(ESSENTIAL_PLUGINS)}) are what the pipeline falls back on; a plugin that implements the "
            f"same hooks takes over without disabling them")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# Discovery reads every installed distribution's metadata files (tens of ms,
# and a test suite builds a manager hundreds of times), so its answer is kept
# per sys.path: a distribution put on a new path entry (as the tests' fake
# distributions are) changes the key and is found.
@functools.lru_cache(maxsize=8)
def _installed_entry_points(search_path: tuple[str, ...]) -> tuple:
    """``(entry point, distribution name, version)`` of each ``plait`` entry
    point on ``search_path`` (``sys.path`` as a tuple), sorted by name."""
    found = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    return tuple((ep, ep.dist.name if ep.dist else None, ep.dist.version if ep.dist else None) for ep in found)


@functools.lru_cache(maxsize=8)
def _installed_version(dist: str, search_path: tuple[str, ...]) -> str | None:
    """:func:`_version`, kept per ``search_path`` like the entry points."""
    return _version(dist)


def split_plugin_entries(entries: list[str], problems) -> tuple[list[str], list[str]]:
    """Sort a config's ``plugins:`` into Plait plugin modules that can be
    imported and Axolotl integrations (``axolotl.integrations.*``, which
    :mod:`plait.config.axolotl_plugins` translates). An entry that cannot be
    imported is filed in ``problems`` (all of them, not the first) and left
    out, so the rest of the config is still checked."""
    import importlib.util

    from plait.config.axolotl_plugins import integration_of

    plait_entries, axolotl_entries = [], []
    if isinstance(entries, str):  # one string is one entry, never its characters
        entries = [entries]
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, str):
            problems.add("plugins", f"{entry!r}: an entry is a dotted module path (a string)")
        elif integration_of(entry) is not None:
            axolotl_entries.append(entry)
        else:
            try:
                found = importlib.util.find_spec(entry) is not None
            except (ImportError, ValueError):  # a parent package that is missing, or an empty name
                found = False
            if found:
                plait_entries.append(entry)
            else:
                problems.add("plugins", f"{entry}: no module of this name can be imported (a dotted module path of "
                                        f"a Plait plugin; Axolotl's own are axolotl.integrations.*)")
    return plait_entries, axolotl_entries

"""Argument and config handling shared by the subcommands."""

from __future__ import annotations

import sys


def add_config_arguments(parser) -> None:
    """``CONFIG [key=value ...]`` and the flags every config-taking command has."""
    parser.add_argument("config", help="path to the YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys (OmegaConf dotlist: lr=1e-4 datasets.0.path=x.jsonl); "
                             "before or after the flags")
    parser.add_argument("--allow-unsupported", action="store_true",
                        help="warn about Axolotl keys Plait does not support instead of failing")


def load_run_config(args, pm=None, *, check_sources: bool = True):
    """Read, merge and validate the config named on the command line.

    Builds the run's plugin manager (adding the config's ``plugins:``) and
    returns ``(cfg, pm)``. Raises :class:`plait.errors.ConfigError` before any
    model work. ``check_sources`` also refuses a ``base_model`` or
    ``tokenizer_config`` that names a local path that does not exist (off for
    commands that create it, like ``quickstart``, or only show the config).
    """
    from plait.model.loading import check_model_sources
    from plait.config import build_config, load_raw_config
    from plait.plugins import build_plugin_manager

    raw, sources = load_raw_config(args.config, args.overrides)
    config_plugins = plugin_names(raw, "plugins")
    disable = plugin_names(raw, "disable_plugins")
    if pm is None or config_plugins or disable:
        pm = build_plugin_manager(config_plugins, disable=disable, extra=getattr(args, "extra_plugins", []))
    cfg = build_config(pm, raw, sources, allow_unsupported=args.allow_unsupported)
    if check_sources:
        check_model_sources(cfg)
    return cfg, pm


def plugin_names(raw: dict, key: str) -> list[str]:
    """``plugins:`` / ``disable_plugins:`` as a list of names (one string is one
    name); a value of another shape gives none here, and the schema reports it."""
    value = raw.get(key)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return value
    return []


def not_implemented(name: str) -> int:
    print(f"plait {name} is not implemented yet", file=sys.stderr)
    return 2

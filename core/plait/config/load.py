"""Load a YAML config, apply command-line overrides, record where values came from.

This step knows nothing about the schema: it produces a plain dict and a map
``dotted key -> "file" | "override"``. :mod:`plait.config.build` validates it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plait.errors import ConfigError


def _leaf_paths(value: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf of a nested dict/list (``datasets.0.path``)."""
    if isinstance(value, dict):
        if not value and prefix:
            return [prefix]
        paths = []
        for key, child in value.items():
            paths.extend(_leaf_paths(child, f"{prefix}.{key}" if prefix else str(key)))
        return paths
    if isinstance(value, list):
        if not value and prefix:
            return [prefix]
        paths = [prefix] if prefix else []
        for index, child in enumerate(value):
            paths.extend(_leaf_paths(child, f"{prefix}.{index}"))
        return paths
    return [prefix]


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_raw_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[dict, dict[str, str]]:
    """Read ``path`` (YAML) and merge ``key=value`` overrides (OmegaConf dotlist).

    Returns the resolved plain dict and the sources of every leaf that the file
    or an override set. Interpolation (``${other_key}``) is resolved; no custom
    resolvers are registered, so a config cannot run code.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    sources: dict[str, str] = {}
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            file_cfg = OmegaConf.load(path)
            if not isinstance(file_cfg, DictConfig):
                raise ConfigError(f"{path}: the top level of a config must be a mapping of keys to values")
        else:
            file_cfg = OmegaConf.create({})
        for path_key in _leaf_paths(OmegaConf.to_container(file_cfg, resolve=False)):
            sources[path_key] = "file"

        merged = file_cfg
        for item in overrides:
            if "=" not in item:
                raise ConfigError(
                    f"override {item!r} is not key=value; write e.g. learning_rate=1e-4 or datasets.0.path=data.jsonl"
                )
            key = item.split("=", 1)[0].strip()
            # parse the value as OmegaConf does (YAML scalars, lists, dicts), then
            # set it by path so `datasets.0.path=...` reaches into the list
            try:
                value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)
            except Exception as exc:  # the override's own syntax, not the file's (yaml errors, OmegaConf's)
                raise ConfigError(f"override {item!r}: could not parse its value: {_first_line(exc)}; write "
                                  f"e.g. seed=1, lora_target_modules=[q_proj,v_proj] or 'key=\"a string\"'") from None
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=False)
            try:
                OmegaConf.update(merged, key, value, merge=True, force_add=True)
            except (OmegaConfBaseException, IndexError, KeyError) as exc:
                raise ConfigError(f"override {item!r}: cannot set {key!r} here: {exc}") from None
            for path_key in _leaf_paths(value, key):
                sources[path_key] = "override"
        raw = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}could not read the config: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError and friends
        if isinstance(exc, ConfigError):
            raise
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}could not parse the YAML: {exc}") from exc
    if raw is None:
        raw = {}
    return raw, sources

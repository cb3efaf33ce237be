"""Configuration: load YAML + overrides, validate with pydantic, explain sources.

This package's namespace (not its submodules) is part of the published plugin
API: ``build_config`` and ``StrictModel``, the base of a plugin's
``config_schema`` model (unknown keys are refused)."""

from plait.config.build import build_config, config_class, explain
from plait.config.load import load_raw_config
from plait.config.schema import CoreConfig, DatasetConfig, StrictModel

__all__ = ["CoreConfig", "DatasetConfig", "StrictModel", "build_config", "config_class", "explain", "load_raw_config"]

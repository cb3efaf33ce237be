"""Configuration: load YAML + overrides, validate with pydantic, explain sources."""

from plait.config.build import build_config, config_class, explain
from plait.config.load import load_raw_config
from plait.config.schema import CoreConfig, DatasetConfig

__all__ = ["CoreConfig", "DatasetConfig", "build_config", "config_class", "explain", "load_raw_config"]

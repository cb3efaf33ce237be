"""Plait: fine-tune large language models from one YAML file.

The public API for plugin authors is :mod:`plait.hookspecs` (``hookimpl``),
:mod:`plait.errors` and :mod:`plait.testing`.
"""

from plait.hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"

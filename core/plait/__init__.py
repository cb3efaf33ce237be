"""Plait: fine-tune large language models from one YAML file.

The modules plugin authors may import are listed in CONTRIBUTING.md ("The
plugin API"): :mod:`plait.hookspecs` (``hookimpl``), :mod:`plait.errors`,
:mod:`plait.config`, :mod:`plait.registries`, :mod:`plait.families`,
:mod:`plait.chat_templates`, :mod:`plait.model` and :mod:`plait.testing`.
"""

from plait.hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"

"""`plait evaluate`."""

from __future__ import annotations

from plait.commands.common import add_config_arguments, not_implemented


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args, pm) -> int:
    return not_implemented("evaluate")

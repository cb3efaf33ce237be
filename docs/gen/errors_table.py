"""The error classes of ``plait.errors``, for the troubleshooting page."""

from __future__ import annotations

import inspect


def error_classes() -> list[type]:
    from plait import errors

    return [obj for _, obj in inspect.getmembers(errors, inspect.isclass)
            if issubclass(obj, errors.PlaitError) and obj.__module__ == errors.__name__]


def render() -> str:
    lines = ["| error | raised for |", "|---|---|"]
    for cls in sorted(error_classes(), key=lambda c: (c.__name__ != "PlaitError", c.__name__)):
        first = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ").replace("``", "`")
        lines.append(f"| `{cls.__name__}` | {first} |")
    return "\n".join(lines)

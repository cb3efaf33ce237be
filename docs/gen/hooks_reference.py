"""The hook reference, generated from ``plait/hookspecs.py``.

One entry per hookspec in source order, under the section comments of that
file (``# ---- data``), with its signature, whether the first result wins,
and its docstring with Sphinx roles turned into Markdown code.
"""

from __future__ import annotations

import inspect
import re

SECTION = re.compile(r"^# -+ (?P<name>[\w ,:/-]+)$")
ROLE = re.compile(r":(?:func|class|mod|meth|attr|data):`~?([^`]+)`")


def _markdown(docstring: str) -> str:
    text = inspect.cleandoc(docstring)
    text = ROLE.sub(r"`\1`", text)
    text = text.replace("``", "`")
    # an indented line after a line naming an argument is that argument's text: keep it in a list item
    out = []
    for line in text.splitlines():
        if line.startswith("    ") and out and out[-1].startswith("- `"):
            out[-1] += " " + line.strip()
        elif re.fullmatch(r"`\w+`", line.strip()):
            out.append(f"- {line.strip()}:")
        else:
            out.append(line)
    return "\n".join(out)


def hookspecs() -> list[tuple[str, str, object, bool]]:
    """``(section, name, function, firstresult)`` in source order."""
    from plait import hookspecs as module

    source = inspect.getsource(module).splitlines()
    sections: list[tuple[int, str]] = [(n, m["name"].strip()) for n, line in enumerate(source, 1)
                                       if (m := SECTION.match(line))]
    out = []
    for name, function in vars(module).items():
        options = getattr(function, "plait_spec", None)
        if options is None:
            continue
        line = inspect.getsourcelines(function)[1]
        section = next((title for start, title in reversed(sections) if start < line), "")
        out.append((line, section, name, function, bool(options.get("firstresult"))))
    return [(section, name, function, first) for _, section, name, function, first in sorted(out)]


def render() -> str:
    from plait import hookspecs as module

    lines = ["# Hook reference", "",
             "Generated from `core/plait/hookspecs.py` when the site is built. Implement a hook with",
             "`@plait.hookimpl` (or",
             "`from plait.hookspecs import hookimpl`) in a module your package names under the `plait`",
             "entry-point group; see [Writing a plugin](../plugins.md).", "",
             _markdown(module.__doc__ or ""), ""]
    current = None
    for section, name, function, firstresult in hookspecs():
        if section != current:
            lines += [f"## {section[:1].upper() + section[1:]}", ""]
            current = section
        signature = f"{name}{inspect.signature(function)}"
        kind = "firstresult: the first non-`None` answer wins" if firstresult else "every plugin is called"
        lines += [f"### `{name}`", "", f"```python\n{signature}\n```", "", f"*{kind}*", "",
                  _markdown(function.__doc__ or ""), ""]
    return "\n".join(lines)

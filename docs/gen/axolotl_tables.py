"""Tables for "Coming from Axolotl", read from the code that decides.

- refused keys: ``plait.config.axolotl_keys.UNSUPPORTED_KEYS`` (key -> why);
- keys that need a plugin package: ``KEYS_OF_PLUGINS``;
- keys accepted with no effect: declared keys whose description says so.
"""

from __future__ import annotations

from config_reference import NO_EFFECT_MARKERS, rows


def refused() -> str:
    from plait.config.axolotl_keys import UNSUPPORTED_KEYS

    lines = ["| key | why it is refused |", "|---|---|"]
    lines += [f"| `{key}` | {why} |" for key, why in sorted(UNSUPPORTED_KEYS.items())]
    return "\n".join(lines)


def needs_plugin() -> str:
    from plait.config.axolotl_keys import KEYS_OF_PLUGINS

    by_package: dict[str, list[str]] = {}
    for key, package in KEYS_OF_PLUGINS.items():
        by_package.setdefault(package, []).append(key)
    lines = ["| package | keys it adds |", "|---|---|"]
    lines += [f"| `{package}` | {', '.join(f'`{k}`' for k in sorted(keys))} |"
              for package, keys in sorted(by_package.items())]
    return "\n".join(lines)


def no_effect(pm) -> str:
    lines = ["| key | what Plait does with it |", "|---|---|"]
    for row in rows(pm):
        if any(marker in row.description.lower() for marker in NO_EFFECT_MARKERS):
            name = f"{row.section}.{row.key}" if row.section else row.key
            lines.append(f"| `{name}` | {row.description} |")
    return "\n".join(lines)

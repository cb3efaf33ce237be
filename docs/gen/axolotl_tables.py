"""Tables for "Coming from Axolotl", read from the code that decides.

``plait.config.axolotl_keys`` says what Plait does with an Axolotl key it does
not declare. Two layouts of it are read, so the page builds before and after
the Axolotl-compatibility work lands: ``UNSUPPORTED_KEYS`` / ``KEYS_OF_PLUGINS``,
or ``LACKING_KEYS`` / ``FORMER_AXOLOTL_KEYS`` / ``NO_OP_KEYS`` / ``RENAMED_KEYS``
with ``plait.config.plugin_keys``. DeepSpeed: the translation of
``plait_parallel.deepspeed`` when it exists, else the FSDP settings to write.
"""

from __future__ import annotations

from config_reference import NO_EFFECT_MARKERS, rows


def _keys():
    from plait.config import axolotl_keys

    return axolotl_keys


def renamed() -> str:
    keys = _keys()
    pairs = sorted(getattr(keys, "RENAMED_KEYS", {}).items())
    pairs += [(f"{switch}: true", f"torch_dtype: {dtype}")
              for switch, dtype in sorted(getattr(keys, "DTYPE_SWITCHES", {}).items())]
    if not pairs:
        return "None: every Axolotl key Plait has goes by Axolotl's name."
    return "\n".join(["| Axolotl | Plait |", "|---|---|", *(f"| `{a}` | `{b}` |" for a, b in pairs)])


def refused() -> str:
    keys = _keys()
    table = {**getattr(keys, "UNSUPPORTED_KEYS", {}), **getattr(keys, "LACKING_KEYS", {}),
             **getattr(keys, "FORMER_AXOLOTL_KEYS", {})}
    lines = ["| key | why it is refused, and what to use instead |", "|---|---|"]
    lines += [f"| `{key}` | {why} |" for key, why in sorted(table.items())]
    return "\n".join(lines)


def needs_plugin(pm) -> str:
    keys = _keys()
    by_package: dict[str, set[str]] = {}
    for key, package in getattr(keys, "KEYS_OF_PLUGINS", {}).items():
        by_package.setdefault(package, set()).add(key)
    for row in rows(pm):  # what the installed plugins declare
        if not row.section and row.owner != "plait" and row.axolotl != "Plait only":
            by_package.setdefault(row.owner, set()).add(row.key)
    try:
        from plait.config.plugin_keys import FIRST_PARTY_KEYS
    except ImportError:
        FIRST_PARTY_KEYS = {}
    for package, names in FIRST_PARTY_KEYS.items():
        by_package.setdefault(package, set()).update(names)
    lines = ["| package | Axolotl keys it brings |", "|---|---|"]
    lines += [f"| `{package}` | {', '.join(f'`{k}`' for k in sorted(names))} |"
              for package, names in sorted(by_package.items())]
    return "\n".join(lines)


def no_effect(pm) -> str:
    found = dict(getattr(_keys(), "NO_OP_KEYS", {}))
    for row in rows(pm):
        if any(marker in row.description.lower() for marker in NO_EFFECT_MARKERS):
            found.setdefault(f"{row.section}.{row.key}" if row.section else row.key, row.description)
    lines = ["| key | what Plait does with it |", "|---|---|"]
    lines += [f"| `{key}` | {why} |" for key, why in sorted(found.items())]
    return "\n".join(lines)


MANUAL_DEEPSPEED = """Plait does not run DeepSpeed, and `deepspeed:` is refused: write the FSDP2 settings of
plait-parallel instead, on the same launchers.

| DeepSpeed | Plait |
|---|---|
| ZeRO-1/2 (optimizer state / gradients sharded) | `fsdp: [shard_grad_op]`, `fsdp_version: 2` |
| ZeRO-3 (parameters sharded too) | `fsdp: [full_shard]` or `fsdp: true`, `fsdp_version: 2` |
| ZeRO-3 with CPU offload | add `offload` to the words, or `fsdp_config: {offload_params: true}` |
| multi-node ZeRO-3 with replication | `dp_replicate_size` (replicas) x `dp_shard_size` (shards) |"""


def deepspeed() -> str:
    try:
        from plait_parallel.deepspeed import AXOLOTL_FILES, apply_deepspeed
    except ImportError:
        return MANUAL_DEEPSPEED
    lines = ["Plait does not run DeepSpeed; FSDP2 (plait-parallel) does the same job. A `deepspeed:` value",
             "(a ZeRO JSON path, Axolotl's `deepspeed_configs/` names, inline JSON or a mapping) is translated",
             "to FSDP2 keys before validation (`plait config explain` shows them); ZeRO-3 becomes",
             "`fsdp: [full_shard]`, ZeRO-1/2 `fsdp: [shard_grad_op]`, CPU offload `offload_params`, and",
             "DeepSpeed settings FSDP2 has no use for are refused by name. Axolotl's files become:", "",
             "| `deepspeed:` | becomes |", "|---|---|"]
    for name in sorted(AXOLOTL_FILES):
        try:
            out = apply_deepspeed({"deepspeed": f"deepspeed_configs/{name}"})
        except Exception as exc:  # noqa: BLE001 - a refused file: the page says why
            lines.append(f"| `{name}` | refused: {str(exc).splitlines()[0]} |")
            continue
        shown = {k: v for k, v in out.items() if k != "deepspeed"}
        lines.append(f"| `{name}` | {', '.join(f'`{k}: {v}`' for k, v in shown.items())} |")
    return "\n".join(lines)

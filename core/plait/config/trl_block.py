"""Axolotl's nested ``trl:`` block, read into Plait's flat keys.

Axolotl passes ``trl:`` to TRL's trainers. Its ``beta`` is ``rl_beta`` (Axolotl
says so); the rest configure TRL's generation for online RL (GRPO, GDPO:
completions, vLLM, reward functions), which Plait does not have. A block
that only sets ``beta`` (and leaves the rest blank or off) is read; any other
option set is named, so a config never trains without something it asked for.
"""

from __future__ import annotations

#: trl.<key> -> the flat key it is
FLAT_KEYS = {"beta": "rl_beta"}


def read_trl_block(raw: dict, problems) -> None:
    """Pop ``trl`` from ``raw``: its ``beta`` becomes ``rl_beta``; every other
    option it sets is filed as a problem."""
    block = raw.pop("trl", None)
    if block is None:
        return
    if not isinstance(block, dict):
        problems.add("value", f"config key 'trl': {block!r} is not accepted; give a mapping (trl: {{beta: 0.1}})")
        return
    lacking = []
    for key, value in block.items():
        if key in FLAT_KEYS:
            flat = FLAT_KEYS[key]
            if value is None:
                continue
            if raw.get(flat) is not None and raw[flat] != value:
                problems.add("value", f"trl.{key} ({value!r}) and {flat} ({raw[flat]!r}) are the same setting; "
                                      f"keep one")
            else:
                raw[flat] = value
        elif value not in (None, False, [], {}):
            lacking.append(f"trl.{key}")
    if lacking:
        problems.add("lacking", f"{', '.join(lacking)}: TRL's generation options for online RL (GRPO, GDPO) are not "
                                f"implemented; of the trl block Plait reads beta (rl_beta)")

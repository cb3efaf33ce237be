"""Every problem of a config, gathered into one message.

Validation does not stop at the first bad key: it files each problem under a
group (unknown keys, Axolotl features Plait lacks, keys of a plugin that is
not loaded, ``plugins:`` entries, bad values, dataset entries) and raises one
:class:`ConfigProblems` at the end, so a user fixes a config in one round.

Notes are facts worth knowing that do not stop ``plait config validate``
(a backend that needs a package this machine lacks, keys that change nothing
in Plait); a pre-flight of the machine adds its own with :meth:`Problems.note`
and turns them into refusals for ``plait train`` with :meth:`Problems.add`.
"""

from __future__ import annotations

from plait.errors import ConfigError, MachineFactError

#: group -> heading, in the order the message shows them
GROUPS = {
    "unknown": "unknown keys",
    "lacking": "Axolotl features Plait does not have",
    "plugin": "keys of a plugin that is not loaded",
    "plugins": "'plugins:' entries",
    "value": "bad values",
    "dataset": "dataset entries",
    "preflight": "files and directories (pre-flight)",
    "machine": "this machine",
}


class ConfigProblems(ConfigError):
    """Several config problems at once; ``str()`` is the grouped message."""

    def __init__(self, problems: "Problems"):
        self.problems = problems
        super().__init__(problems.message())


class Problems:
    """Collects problems by group and notes, in the order they were found."""

    def __init__(self) -> None:
        self.by_group: dict[str, list[str]] = {}
        self.notes: list[str] = []
        #: "refuse" (train: a MachineFactError is a problem) or "note" (validate)
        self.machine_facts = "refuse"

    def add(self, group: str, line: str) -> None:
        if group not in GROUPS:
            raise ValueError(f"unknown problem group {group!r}; known: {', '.join(GROUPS)}")
        lines = self.by_group.setdefault(group, [])
        if line not in lines:
            lines.append(line)

    def add_error(self, group: str, error: ConfigError) -> None:
        """File an error raised by a check (a plugin's ``validate_config``, say),
        one problem per line it names (a grouped error keeps its groups)."""
        if isinstance(error, ConfigProblems):
            self.merge(error.problems)
            return
        text = str(error).strip()
        if not text:
            return
        if isinstance(error, MachineFactError):
            if self.machine_facts == "note":
                self.note(text)
            else:
                self.add("machine", text)
        else:
            self.add(group, text)

    def merge(self, other: "Problems") -> None:
        for group, lines in other.by_group.items():
            for line in lines:
                self.add(group, line)
        for line in other.notes:
            self.note(line)

    def note(self, line: str) -> None:
        if line not in self.notes:
            self.notes.append(line)

    def __len__(self) -> int:
        return sum(len(lines) for lines in self.by_group.values())

    def message(self) -> str:
        count = len(self)
        if count == 1:  # one problem reads best as itself
            parts = [line for lines in self.by_group.values() for line in lines]
        else:
            parts = [f"{count} problems in the config:"]
        for group, heading in GROUPS.items():
            if count == 1:
                break
            lines = self.by_group.get(group)
            if not lines:
                continue
            parts.append(f"{heading}:")
            for line in lines:
                first, *rest = line.splitlines()
                parts.append(f"  - {first}")
                parts.extend(f"    {more}" for more in rest)
        if self.notes:
            parts.append("notes:")
            parts.extend(f"  - {note}" for note in self.notes)
        return "\n".join(parts)

    def raise_if_any(self) -> None:
        if len(self):
            raise ConfigProblems(self)

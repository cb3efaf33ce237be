"""Errors a user can act on.

Every error Plait raises for bad input derives from :class:`PlaitError`; the
CLI prints its message and exits 2 without a traceback (``--debug`` shows it).
"""

from __future__ import annotations


class PlaitError(Exception):
    """A problem with the user's input that a person can fix."""


class ConfigError(PlaitError):
    """An invalid configuration: names the key, the value and what is accepted."""


class PluginError(PlaitError):
    """A plugin failed to load or declares hooks that do not exist."""


class DataError(PlaitError):
    """A dataset problem, with the file and the row where known."""

    def __init__(self, message: str, *, path: str | None = None, row: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if row is not None:
                where += f", row {row}"
            where += ": "
        super().__init__(where + message)
        self.path = path
        self.row = row


class BadRowError(PlaitError):
    """Raised by a ``tokenize`` hookimpl for one bad row of a batch.

    ``index`` is the row's position within the batch the hook received; core
    translates it into the row number in the source file.
    """

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index
        self.message = message


class TrainingError(PlaitError):
    """The run cannot go on (NaN loss, a failed rank); says which keys to change."""


def closest(word: str, known, cutoff: float = 0.6) -> str | None:
    """The entry of ``known`` nearest to ``word`` (difflib), or ``None``."""
    import difflib

    matches = difflib.get_close_matches(str(word), list(known), n=1, cutoff=cutoff)
    return matches[0] if matches else None


def did_you_mean(word: str, known, cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the nearest entry of ``known``, else ``""``:
    the suffix every unknown-name error of Plait and its plugins ends with."""
    match = closest(word, known, cutoff)
    return f"; did you mean {match!r}?" if match else ""


class MachineFactError(ConfigError):
    """The config is valid, but this machine cannot run it as it stands: an
    optional package is missing, the world size does not match the parallel
    sizes, there is no GPU. ``plait config validate`` prints it as a note
    (the config may be meant for another machine); ``plait train`` refuses
    it before the model loads."""

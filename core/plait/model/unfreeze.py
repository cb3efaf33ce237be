"""``unfrozen_parameters``: train only the parameters whose names match.

Axolotl's meaning: every parameter is frozen except those whose name matches
one of the regexes anywhere in the name (``re.search``; anchor with ``^`` and
``$`` to match the whole name). Axolotl's row ranges (``...weight$[:32000]``)
are refused at validation: they are a gradient mask, not a freeze.
"""

from __future__ import annotations

import re

from plait.errors import ConfigError

#: Axolotl's optional row range after a pattern: ``$[start:end]``
_RANGE = re.compile(r"\[\d*:\d*\]$")


def check_patterns(patterns) -> None:
    """Refuse what is not a regex, and Axolotl's row ranges."""
    for pattern in patterns or ():
        if _RANGE.search(pattern):
            raise ConfigError(f"config key 'unfrozen_parameters': {pattern!r} has a row range ([start:end]), which "
                              "Plait does not support; give the whole parameter's regex")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"config key 'unfrozen_parameters': {pattern!r} is not a regular expression "
                              f"({exc})") from None


def freeze_except(model, patterns) -> list[str]:
    """Set ``requires_grad`` to whether a parameter's name matches; returns the
    trained names. No match at all is an error naming the patterns."""
    compiled = [re.compile(pattern) for pattern in patterns]
    trained = []
    for name, param in model.named_parameters():
        keep = any(pattern.search(name) for pattern in compiled)
        param.requires_grad_(keep)
        if keep:
            trained.append(name)
    if not trained:
        example = next(iter(dict(model.named_parameters())), "")
        raise ConfigError(f"config key 'unfrozen_parameters': {list(patterns)} match no parameter of the model "
                          f"(names look like {example!r}); nothing would train")
    return trained

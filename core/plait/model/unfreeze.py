"""``unfrozen_parameters``: train only the parameters whose names match.

Axolotl's meaning: every parameter is frozen except those whose name matches
one of the regexes anywhere in the name (``re.search``; anchor with ``^`` and
``$`` to match the whole name). Axolotl's row ranges (``...weight$[:32000]``)
are refused at validation: they are a gradient mask, not a freeze.

With an adapter (``adapter: lora/qlora``) Axolotl applies the patterns after
the adapter is attached, to the adapted model's names (peft's
``base_model.model.`` prefix, then the base name; adapter weights end in
``lora_A.default.weight``): whatever they miss is frozen, the adapter's
weights included. Plait does the same, so a pattern list can train the adapter
of chosen layers only. A base weight matched under an adapter is refused: the
saved adapter would not hold it (Axolotl trains it and drops it on save).
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


#: how every parameter name of a peft-adapted model starts
ADAPTED_PREFIX = "base_model.model."


def can_match_adapted_names(pattern: str) -> bool:
    """Whether ``pattern`` may match a name under :data:`ADAPTED_PREFIX`: an
    unanchored pattern may; one anchored with ``^`` only when its literal start
    agrees with the prefix (``^model.layers`` cannot match, ``^base_model`` can)."""
    if not pattern.startswith("^"):
        return True
    literal = re.match(r"(?:[\w-]|\\\.|\.(?![*+?{]))*", pattern[1:]).group(0).replace("\\.", ".")
    return ADAPTED_PREFIX.startswith(literal) or literal.startswith(ADAPTED_PREFIX)


def is_adapter_parameter(name: str) -> bool:
    """A weight the adapter added (peft's LoRA/DoRA tensors), not one of the base model's."""
    return any(part.startswith("lora_") for part in name.split("."))


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
    base = [name for name in trained if name.startswith(ADAPTED_PREFIX) and not is_adapter_parameter(name)]
    if base:
        raise ConfigError(f"config key 'unfrozen_parameters': {list(patterns)} match base weights of the adapted "
                          f"model ({', '.join(base[:3])}{', ...' if len(base) > 3 else ''}); the saved adapter holds "
                          f"only the adapter's weights, so their training would be lost (Axolotl trains and drops "
                          f"them). Match only adapter parameters (lora_), or train without an adapter")
    return trained

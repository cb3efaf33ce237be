"""``unfrozen_parameters``: train only the parameters whose names match.

Axolotl's meaning (``axolotl.utils.freeze.LayerNamePattern``): every
parameter is frozen except those whose name one of the patterns matches *at
its start* (``re.match``: ``model.layers.1`` also matches
``model.layers.10.mlp...``; end a pattern with ``$`` to match the whole name,
and a pattern does not match in the middle of a name). A dot is a literal dot
(``lm_head.weight`` is ``lm_head\.weight``), except in ``.+``, which stays
"one or more of any character"; so ``.*`` is "any number of literal dots".
Axolotl's row ranges (``...weight$[:32000]``) are refused at validation: they
are a gradient mask, not a freeze. A dot the user escaped (``\.``) is a
literal dot too (Axolotl escapes it a second time, after which the pattern
matches nothing).

With an adapter (``adapter: lora/qlora``) Axolotl applies the patterns after
the adapter is attached, to the adapted model's names (peft's
``base_model.model.`` prefix, then the base name; adapter weights end in
``lora_A.default.weight``): whatever they miss is frozen, the adapter's weights
included. Plait does the same, so a pattern list can train the adapter
of chosen layers only (``base_model.model.model.layers.1.+lora_``). A base
weight matched under an adapter is refused: the saved adapter would not hold
it (Axolotl trains it and drops it on save).
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


def axolotl_regex(pattern: str) -> "re.Pattern":
    """``pattern`` as Axolotl compiles it: every dot not followed by ``+`` made
    literal (one already escaped stays as it is). Use it with ``.match``."""
    return re.compile(re.sub(r"(?<!\\)\.(?!\+)", r"\\.", pattern))


def literal_start(pattern: str) -> str:
    """The text every name ``pattern`` matches starts with (``re.match``):
    its leading letters, digits, ``_``, ``-`` and dots, up to the first
    other regex syntax or a character a quantifier makes optional."""
    regex = axolotl_regex(pattern).pattern
    regex = regex[1:] if regex.startswith("^") else regex
    return re.match(r"(?:(?:[\w-]|\\\.)(?![*?{]))*", regex).group(0).replace("\\.", ".")


def can_match_adapted_names(pattern: str) -> bool:
    """Whether ``pattern`` may match a name under :data:`ADAPTED_PREFIX`: the
    patterns match at the start of a name, so only when their literal start
    agrees with the prefix (``model.layers`` cannot match, ``base_model`` and
    ``[a-z_]+.model`` can)."""
    literal = literal_start(pattern)
    return ADAPTED_PREFIX.startswith(literal) or literal.startswith(ADAPTED_PREFIX)


def is_adapter_parameter(name: str) -> bool:
    """A weight the adapter added (peft's LoRA/DoRA tensors), not one of the base model's."""
    return any(part.startswith("lora_") for part in name.split("."))


def freeze_except(model, patterns) -> list[str]:
    """Set ``requires_grad`` to whether a parameter's name matches; returns the
    trained names. No match at all is an error naming the patterns."""
    compiled = [axolotl_regex(pattern) for pattern in patterns]
    trained = []
    for name, param in model.named_parameters():
        keep = any(pattern.match(name) for pattern in compiled)
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

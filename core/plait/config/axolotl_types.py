"""Axolotl dataset ``type:`` values Plait does not have, and what to use instead.

Axolotl resolves a ``type:`` by importing ``axolotl.prompt_strategies.<name>``
(``name.load_fn`` picks a loader), else a user's own module by its dotted
path, else one of its built-in prompters as ``base`` or ``base:style``.
Plait's formats are registered by plugins (the ``dataset_formats`` hook);
:func:`lacking_type_reason` explains, for a type no format registers, why it
is missing and what to write instead, so the refusal names the way forward
rather than only the closest name.
"""

from __future__ import annotations

import re

_USER_DEFINED = "write its prompt with type: user_defined (format, no_input_format, field_* keys)"

#: Axolotl's type name (the part before the first '.' or ':') -> why Plait lacks it and what to use
LACKING_TYPES: dict[str, str] = {
    # preference types live in plait-preference: consulted only when it is not installed
    **dict.fromkeys(("bradley_terry", "chatml", "llama3"),
                    "is a preference (or reward-model) dataset type of plait-preference: pip install "
                    "plait-preference, and set rl: (dpo, ipo, orpo, kto, simpo) or reward_model: true"),
    "stepwise_supervised": "is plait-preference's process-reward-model dataset type: pip install plait-preference "
                           "and set process_reward_model: true",
    "messages": "(Axolotl's older conversation type) is not a Plait format; use type: chat_template",
    "sharegpt": "was removed from Axolotl in favour of chat_template; use type: chat_template (ShareGPT's "
                "conversations of from/value messages are read as they are)",
    "sharegpt_jokes": "was removed from Axolotl in favour of chat_template; use type: chat_template",
    "sharegpt_simple": "was removed from Axolotl in favour of chat_template; use type: chat_template",
    "creative_acr": "(Axolotl's creative answer/critique/revise prompts) is not a Plait format; " + _USER_DEFINED,
    "jeopardy": "is not a Plait format; " + _USER_DEFINED,
    "summarizetldr": "is not a Plait format; " + _USER_DEFINED,
    "explainchoice": "is not a Plait format; " + _USER_DEFINED,
    "concisechoice": "is not a Plait format; " + _USER_DEFINED,
    "reflection": "is not a Plait format; " + _USER_DEFINED,
    "pretrain": "is the type of Axolotl's pretraining_dataset entries; in datasets use type: completion (or "
                "pretraining), or set pretraining_dataset",
    "_synthetic": "(Axolotl's generated benchmark rows) is not a Plait format; use a small local dataset",
}

#: Axolotl's EBFT trainer's data transforms (ebft_chat_multiturn.transform, ...)
_EBFT = re.compile(r"ebft(_\w+)?$")
_EBFT_REASON = ("is a data transform of Axolotl's EBFT trainer (rl: ebft), which Plait does not have")
_TRANSFORM_REASON = ("names a Python data transform of your own (Axolotl imports it for its online RL "
                     "trainers, GRPO/EBFT); Plait has no online RL and does not import code from a dataset type: "
                     "use a registered format, or a plugin with a dataset_formats() hook")


def type_base(type_value: str) -> str:
    """The part of a ``type:`` before the first ``.`` or ``:``."""
    return re.split(r"[.:]", type_value, maxsplit=1)[0]


def lacking_type_reason(type_value: str) -> str | None:
    """Why Plait has no format for Axolotl's ``type_value`` and what to use
    instead; ``None`` for a value Axolotl does not know either (a typo)."""
    base = type_base(type_value)
    if base in LACKING_TYPES:
        return LACKING_TYPES[base]
    if _EBFT.match(base):
        return _EBFT_REASON
    if "." in type_value and type_value.rsplit(".", 1)[1].endswith("transform"):
        return _TRANSFORM_REASON
    return None

"""``pygmalion``: Pygmalion's role-play conversations, as Axolotl tokenizes them.

Rows hold ``conversations: [{"role": system|human|bot, "value": ...}]``. Each
message is tokenized on its own:

* ``system``: ``"<|system|>Persona: " + text`` with the tokenizer's BOS (a
  trailing ``"\\n<START>"`` is dropped), masked;
* ``human``: ``"<|user|> " + text``, masked;
* ``bot``: ``"<|model|> " + text`` and EOS; the tokens of ``"<|model|>"`` are
  masked, the rest (the answer and the EOS) trained.

Texts are stripped of surrounding whitespace. With ``train_on_inputs`` every
token is trained (Axolotl's strategy masks the prompt whatever it says).
"""

from __future__ import annotations

from plait.errors import BadRowError

from plait_formats.common import IGNORE, column, train_on_inputs

TYPES = ("pygmalion",)
BOT_PREFIX = "<|model|>"


def tokenize(cfg, dataset_cfg, tokenizer, batch) -> dict:
    conversations = column(batch, dataset_cfg.field or "conversations")
    train_all = train_on_inputs(cfg, dataset_cfg)
    prefix_len = len(tokenizer(BOT_PREFIX, add_special_tokens=False)["input_ids"])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = {"input_ids": [], "labels": []}
    for index, messages in enumerate(conversations):
        if not messages:
            raise BadRowError(index, "empty conversation")
        ids, labels = [], []
        for number, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            text = message.get("value") if isinstance(message, dict) else None
            if not isinstance(text, str):
                raise BadRowError(index, f"message {number} needs a 'value' string, got {message!r}")
            if role == "system":
                text = text[:-len("\n<START>")] if text.endswith("\n<START>") else text
                piece = tokenizer("<|system|>Persona: " + text.strip())["input_ids"]
                if eos and piece[-1:] == eos and tokenizer.bos_token_id != eos[0]:
                    piece = piece[:-1]  # a tokenizer that appends EOS to every text: not here
                trained = [IGNORE] * len(piece)
            elif role == "human":
                piece = tokenizer("<|user|> " + text.strip(), add_special_tokens=False)["input_ids"]
                trained = [IGNORE] * len(piece)
            elif role == "bot":
                piece = tokenizer(BOT_PREFIX + " " + text.strip(), add_special_tokens=False)["input_ids"] + eos
                trained = [IGNORE] * prefix_len + piece[prefix_len:]
            else:
                raise BadRowError(index, f"message {number} has role {role!r}; pygmalion rows use system, human "
                                         f"and bot")
            ids += piece
            labels += list(piece) if train_all else trained
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out

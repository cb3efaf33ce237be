"""Pre-tokenized rows: ``input_ids`` (and optionally ``labels``) passed through.

Answers ``type: pretokenized`` and rows with an ``input_ids`` column and no
``type``. Each row is checked: a list of integers, token ids inside the
vocabulary, labels of the same length holding token ids or -100. Missing
labels train every token.
"""

from __future__ import annotations

from plait.errors import BadRowError

from plait_formats.common import IGNORE, column

TYPES = ("pretokenized",)


def _check_ids(index: int, name: str, values, vocab: int, allow_ignore: bool) -> list[int]:
    if not isinstance(values, (list, tuple)) or not values:
        raise BadRowError(index, f"{name} must be a non-empty list of token ids, got {type(values).__name__}")
    for position, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRowError(index, f"{name}[{position}] is {value!r}, expected an integer")
        if allow_ignore and value == IGNORE:
            continue
        if not 0 <= value < vocab:
            raise BadRowError(index, f"{name}[{position}] is {value}, outside the vocabulary (0 to {vocab - 1}"
                                     + (", or -100" if allow_ignore else "") + ")")
    return list(values)


def tokenize(cfg, dataset_cfg, tokenizer, batch) -> dict:
    vocab = len(tokenizer)
    all_ids = column(batch, "input_ids")
    all_labels = column(batch, "labels", required=False)
    out = {"input_ids": [], "labels": []}
    for index, (ids, labels) in enumerate(zip(all_ids, all_labels)):
        ids = _check_ids(index, "input_ids", ids, vocab, allow_ignore=False)
        if labels is None:
            labels = list(ids)
        else:
            labels = _check_ids(index, "labels", labels, vocab, allow_ignore=True)
            if len(labels) != len(ids):
                raise BadRowError(index, f"labels has {len(labels)} entries but input_ids has {len(ids)}")
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out

"""The ``stepwise_supervised`` dataset type: rows for process reward models.

A row holds a ``prompt``, its ``completions`` (the reasoning steps, a list of
strings) and ``labels`` (one per step: is the step right, a boolean or a class
number below ``num_labels``), as in TRL's math_shepherd layout. Axolotl's
strategy of the same name (after TRL's ``PRMTrainer``) turns it into one
sequence; this module builds the same ids::

    BOS prompt  step0 sep  step1 sep
    input_ids   b  p p p    s s s /     t t /
    labels      -- -- -- -- -- -- -- 1  -- -- 0

Each step is tokenized alone with ``step_separator`` appended, and the step's
label sits on the last of those tokens (the separator's last token); every
other token is ignored (-100). With ``train_on_last_step_only`` only the last
step keeps its label. ``max_completion_length`` cuts the steps (after joining)
to that many tokens, and the whole sequence is cut to ``sequence_len``, both
before the BOS-prefixed prompt is counted as Axolotl does: the prompt is
never cut by ``max_completion_length``.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from plait.errors import BadRowError, ConfigError
from plait.registries import DatasetEntry, DatasetFormat

NAME = "stepwise_supervised"
IGNORE = -100


class StepwiseEntry(DatasetEntry):
    """Keys of a ``stepwise_supervised`` entry (Axolotl's names and defaults)."""

    step_separator: str = Field("\n", description="Text appended to every step; the step's label sits on its last "
                                                   "token (default a newline).")
    max_completion_length: Optional[int] = Field(
        None, ge=1, description="Cut the joined steps to this many tokens (the prompt is not counted); unset: no cut.")
    train_on_last_step_only: bool = Field(
        False, description="Train on the last step's label only; every other step's label is ignored.")


def _steps(row: dict, index: int) -> tuple[str, list[str], list[int]]:
    """The prompt, the steps and their labels (as ints) of one raw row, or a bad-row error."""
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise BadRowError(index, f"'prompt' must be a string, found {type(prompt).__name__} "
                                 f"(row keys: {sorted(row)})")
    steps, labels = row.get("completions"), row.get("labels")
    if not isinstance(steps, list) or not steps or not all(isinstance(step, str) for step in steps):
        raise BadRowError(index, "'completions' must be a non-empty list of strings (the steps), found "
                                 f"{type(steps).__name__}")
    if not isinstance(labels, list) or len(labels) != len(steps):
        count = len(labels) if isinstance(labels, list) else type(labels).__name__
        raise BadRowError(index, f"'labels' must be a list with one label per step: {len(steps)} steps, "
                                 f"labels: {count}")
    ints = []
    for number, label in enumerate(labels):
        # bool first: True is an int in Python, and math_shepherd's labels are booleans
        if isinstance(label, bool) or (isinstance(label, int) and label >= 0):
            ints.append(int(label))
        else:
            raise BadRowError(index, f"label {number} is {label!r}; a label is true/false or a class number >= 0")
    return prompt, steps, ints


def tokenize_row(tokenizer, row: dict, index: int, *, separator: str, max_completion_length: Optional[int],
                 last_step_only: bool, sequence_len: Optional[int], num_labels: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one row (see the module docstring)."""
    prompt, steps, labels = _steps(row, index)
    for number, label in enumerate(labels):
        if label >= num_labels:
            raise BadRowError(index, f"label {number} is {label}, but num_labels is {num_labels} "
                                     f"(labels 0 to {num_labels - 1})")
    if last_step_only:
        labels = [IGNORE] * (len(labels) - 1) + labels[-1:]
    separator_ids = tokenizer.encode(separator, add_special_tokens=False)
    completion_ids: list[int] = []
    completion_labels: list[int] = []
    for number, (step, label) in enumerate(zip(steps, labels)):
        ids = tokenizer(step, add_special_tokens=False)["input_ids"] + separator_ids
        if not ids:
            raise BadRowError(index, f"step {number} is empty and step_separator adds no token: its label has no "
                                     f"token to sit on")
        completion_ids += ids
        completion_labels += [IGNORE] * (len(ids) - 1) + [label]
    if max_completion_length:
        completion_ids = completion_ids[:max_completion_length]
        completion_labels = completion_labels[:max_completion_length]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    input_ids = prompt_ids + completion_ids
    full_labels = [IGNORE] * len(prompt_ids) + completion_labels
    if sequence_len:
        input_ids, full_labels = input_ids[:sequence_len], full_labels[:sequence_len]
    return input_ids, full_labels


def tokenize(cfg, dataset_cfg, tokenizer, batch: dict) -> dict:
    """The format's batch function (:attr:`plait.registries.DatasetFormat.tokenize`)."""
    from plait_preference.process_reward import num_labels

    names = list(batch)
    out = {"input_ids": [], "labels": []}
    for index, values in enumerate(zip(*(batch[name] for name in names))):
        ids, labels = tokenize_row(tokenizer, dict(zip(names, values)), index,
                                   separator=dataset_cfg.step_separator,
                                   max_completion_length=dataset_cfg.max_completion_length,
                                   last_step_only=dataset_cfg.train_on_last_step_only,
                                   sequence_len=cfg.sequence_len, num_labels=num_labels(cfg))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out


def _check_type(type_value: str, where: str) -> None:
    if type_value != NAME:
        raise ConfigError(f"{where}: {type_value!r} is not accepted (stepwise_supervised has no variants)\n"
                          f"accepted: {NAME}")


def stepwise_format() -> DatasetFormat:
    return DatasetFormat(NAME, tokenize, StepwiseEntry, check_type=_check_type,
                         description="process reward model rows: prompt, completions (steps), labels (one per step)")

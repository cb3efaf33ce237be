"""Helpers shared by the formats: reading fields of a batch, special tokens."""

from __future__ import annotations

from plait.errors import BadRowError

IGNORE = -100


def column(batch: dict, key: str, *, required: bool = True, what: str = "field") -> list:
    """The column ``key`` of ``batch``; a missing column is a bad first row
    (every row lacks it) and a ``None`` cell a bad row."""
    if key not in batch:
        if not required:
            return [None] * batch_size(batch)
        raise BadRowError(0, f"missing {what} {key!r}; the rows have {sorted(batch)}")
    values = batch[key]
    if required:
        for index, value in enumerate(values):
            if value is None:
                raise BadRowError(index, f"missing {what} {key!r}")
    return values


def text_column(batch: dict, key: str, *, required: bool = True) -> list:
    """Like :func:`column`, and every present value must be a string."""
    values = column(batch, key, required=required)
    for index, value in enumerate(values):
        if value is not None and not isinstance(value, str):
            raise BadRowError(index, f"field {key!r} is a {type(value).__name__} ({value!r}), expected text")
    return values


def batch_size(batch: dict) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def train_on_inputs(cfg, dataset_cfg) -> bool:
    """The dataset's ``train_on_inputs`` when set, else the run's."""
    return cfg.train_on_inputs if dataset_cfg.train_on_inputs is None else dataset_cfg.train_on_inputs


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of prompts, with the BOS the tokenizer adds (its own rule),
    and without an EOS some tokenizers also append."""
    encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is not None and eos != bos:
        encoded = [ids[:-1] if ids and ids[-1] == eos else ids for ids in encoded]
    return encoded


def encode_responses(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of responses followed by EOS, so the model learns to stop."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [ids + eos for ids in encoded]


def join_prompt_response(prompts, responses, *, train_prompt: bool) -> dict:
    """``input_ids``/``labels`` of prompt + response rows; the prompt is masked
    unless ``train_prompt``."""
    out = {"input_ids": [], "labels": []}
    for prompt, response in zip(prompts, responses):
        out["input_ids"].append(prompt + response)
        out["labels"].append((list(prompt) if train_prompt else [IGNORE] * len(prompt)) + response)
    return out

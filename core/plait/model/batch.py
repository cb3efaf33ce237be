"""Model inputs from tokenized rows: the padded batch every collator starts from."""

from __future__ import annotations


def pad_rows(rows, pad_token_id: int, pad_to: int | None = None):
    """Right-pad ``input_ids``/``labels`` of ``rows`` to the longest row (or ``pad_to``)."""
    import torch

    longest = max(len(r["input_ids"]) for r in rows)
    width = max(longest, pad_to or 0)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def drop_full_attention_mask(batch: dict) -> dict:
    """``batch`` without its 2-D ``attention_mask`` when that mask is all ones.

    Rows without padding need no mask: the model then runs plain causal
    attention. With the mask, transformers checks on the device whether it is
    all ones, a host sync at the start of every forward; here the check is on
    the CPU tensor, before it moves. Packed batches keep theirs (segment ids
    above 1, or another layout).
    """
    mask = batch.get("attention_mask")
    if mask is None or not hasattr(mask, "dim") or mask.dim() != 2 or mask.device.type != "cpu":
        return batch
    if mask.dtype.is_floating_point or not bool((mask == 1).all()):
        return batch
    return {key: value for key, value in batch.items() if key != "attention_mask"}

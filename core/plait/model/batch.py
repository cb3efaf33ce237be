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
    attention, and skips materializing a mask. The check is on the CPU tensor,
    before it moves (on the device, reading it would be a host sync).
    Packed batches keep theirs (segment ids above 1, or another layout).
    """
    mask = _host_padding_mask(batch)
    if mask is None or not bool((mask == 1).all()):
        return batch
    return _without_mask(batch)


def drop_right_padding_mask(batch: dict) -> dict:
    """``batch`` without its 2-D ``attention_mask`` when every row is
    right-padded (its ones, then only zeros).

    Under causal attention no real token attends to the padding after it, so
    the real tokens' outputs are the same without the mask; the model then
    runs unmasked causal attention (flash attention under SDPA). Only for
    callers that read nothing at the padded positions and whose model reads
    the mask for nothing else: NEFTune's noise scale and an MoE model's
    router loss count real tokens through it. Like
    :func:`drop_full_attention_mask`, the check runs on the CPU tensor.
    """
    import torch

    mask = _host_padding_mask(batch)
    if mask is None:
        return batch
    right_padded = torch.arange(mask.shape[1])[None, :] < mask.sum(dim=1, keepdim=True)
    if not bool((mask == right_padded).all()):
        return batch
    return _without_mask(batch)


def _host_padding_mask(batch: dict):
    """The batch's ``attention_mask`` when it is a 2-D integer tensor still on
    the CPU (what the two functions above may drop), else ``None``."""
    mask = batch.get("attention_mask")
    if mask is None or not hasattr(mask, "dim") or mask.dim() != 2 or mask.device.type != "cpu":
        return None
    return None if mask.dtype.is_floating_point else mask


def _without_mask(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key != "attention_mask"}

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


def drop_right_padding_mask(batch: dict) -> dict:
    """``batch`` without its 2-D ``attention_mask`` when every row is
    right-padded (its ones, then only zeros).

    Under causal attention no real token attends to the padding after it, so
    the real tokens' outputs are the same without the mask; the model then
    runs unmasked causal attention (flash attention under SDPA, and no device
    check of the mask, a host sync, at the start of every forward). Only for
    callers that read nothing at the padded positions and whose model reads
    the mask for nothing else: NEFTune's noise scale and an MoE model's
    router loss count real tokens through it. Like
    :func:`drop_full_attention_mask`, the check runs on the CPU tensor.
    """
    import torch

    mask = batch.get("attention_mask")
    if mask is None or not hasattr(mask, "dim") or mask.dim() != 2 or mask.device.type != "cpu":
        return batch
    if mask.dtype.is_floating_point:
        return batch
    lengths = mask.sum(dim=1, keepdim=True)
    right_padded = torch.arange(mask.shape[1])[None, :] < lengths
    if not bool((mask == right_padded).all()):
        return batch
    return {key: value for key, value in batch.items() if key != "attention_mask"}

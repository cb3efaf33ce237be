"""A micro-batch of vision rows: the prepared ids and labels, and the pixels.

Each row's images are opened here, from the references the prepared data
kept, and the processor turns the row's rendered text and images into its
model inputs (``pixel_values``, ``image_grid_thw``, ``image_sizes``,
``token_type_ids``, ``cross_attention_mask`` ... whatever the model takes).
One processor call per row: the processor's own padding side and length
would otherwise decide the layout; here rows are right-padded like every
Plait batch. The processor's ids must equal the prepared ones; they differ
only when the processor or image settings changed after the data was
prepared, which is an error rather than silently misplaced image features.
"""

from __future__ import annotations

#: processor outputs laid along the sequence: padded like input_ids
SEQUENCE_KEYS = ("attention_mask", "token_type_ids", "mm_token_type_ids", "cross_attention_mask")
#: processor outputs the prepared rows already hold
TEXT_KEYS = ("input_ids", "attention_mask", "offset_mapping")


def collate_vision(cfg, rows, tokenizer, processor) -> dict:
    import torch
    from plait.model.batch import pad_rows
    from plait.errors import DataError

    from plait_vision.images import ImageError, open_image

    if any(row.get("seq_lens") for row in rows):
        raise DataError("packed rows reached the vision collator; sample_packing is not supported with "
                        "processor_type")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = pad_rows(rows, pad_id, cfg.sequence_len if cfg.pad_to_sequence_len else None)
    width = batch["input_ids"].shape[1]
    per_key: dict[str, list] = {}
    for number, row in enumerate(rows):
        extras = (row.get("extras") or [{}])[0]
        if "text" not in extras:
            raise DataError("a row without its rendered text and images reached the vision collator; prepare the "
                            "data again with processor_type set (delete dataset_prepared_path)")
        try:
            images = [open_image(ref, cfg.image_size, cfg.image_resize_algorithm) for ref in extras["images"]]
        except ImageError as exc:  # checked while preparing; the file changed since
            raise DataError(f"{exc} (it was readable when the data was prepared)") from None
        encoded = processor(text=[extras["text"]], images=[images] if images else None, add_special_tokens=False,
                            return_tensors="pt")
        length = len(row["input_ids"])
        ids = encoded["input_ids"][0][:length].tolist()
        if ids != list(row["input_ids"]):
            raise DataError("the processor now gives other token ids for a prepared row than when it was "
                            "prepared (the processor, chat template or image_size changed?); prepare the data "
                            "again (delete dataset_prepared_path)")
        for key, value in encoded.items():
            if key in TEXT_KEYS or not hasattr(value, "shape"):
                continue
            if key in SEQUENCE_KEYS:
                value = _pad_sequence(value[:, :length], width)
            per_key.setdefault(key, []).append(value)
    for key, values in per_key.items():
        batch[key] = _concat(values, torch)
    return batch


def _pad_sequence(value, width: int):
    import torch.nn.functional as F

    pad = [0, 0] * (value.dim() - 2) + [0, width - value.shape[1]]
    return F.pad(value, pad)


def _concat(values: list, torch):
    """Concatenate per-row tensors on their first dimension, zero-padding the
    others to the largest (Mllama's images per row, tiles per image)."""
    dims = max(v.dim() for v in values)
    if dims > 1:
        sizes = [max(v.shape[d] for v in values) for d in range(1, dims)]
        padded = []
        for v in values:
            pad = []
            for d in reversed(range(1, dims)):
                pad += [0, sizes[d - 1] - v.shape[d]]
            padded.append(torch.nn.functional.pad(v, pad) if any(pad) else v)
        values = padded
    return torch.cat(values, dim=0)

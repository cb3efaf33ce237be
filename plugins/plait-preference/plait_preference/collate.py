"""Tell the objective which positions belong to which sequence.

Core's collator lays the rows out (each pair row has ``seq_lens``, so it is
collated like a packed bin: positions restart per sequence and attention
stays inside it). This adds ``segment_index`` (``[B, W]``: the sequence each
position belongs to, numbered over the micro-batch; -1 for padding) and
``segment_roles`` (``[S]``: chosen, rejected, KTO completion or KL sequence,
numbered as :data:`plait_preference.rows.SEGMENT_NAMES`) from the
``segment_names`` in the rows' extras, and ``ref_logps`` (``[S]``) where the
rows carry precomputed reference log-probs.
"""

from __future__ import annotations


def add_segments(batch: dict, rows: list[dict]) -> dict:
    import torch

    from plait_preference.rows import SEGMENT_NAMES

    number = {name: i for i, name in enumerate(SEGMENT_NAMES)}
    width = batch["input_ids"].shape[1]
    index = torch.full((len(rows), width), -1, dtype=torch.long)
    roles: list[int] = []
    ref: list[float] = []
    for b, row in enumerate(rows):
        start = 0
        row_roles = [number[name] for extras in row["extras"] for name in extras["segment_names"]]
        if len(row_roles) != len(row["seq_lens"]):
            raise ValueError(f"a preference row has {len(row['seq_lens'])} sequences and {len(row_roles)} roles")
        ref += [value for extras in row["extras"] for value in extras.get("ref_logps", ())]
        for length, role in zip(row["seq_lens"], row_roles):
            index[b, start:start + length] = len(roles)
            roles.append(role)
            start += length
    out = {**batch, "segment_index": index, "segment_roles": torch.tensor(roles, dtype=torch.long)}
    if ref:  # precompute_ref_log_probs: the reference's sum of each segment, stored with the rows
        if len(ref) != len(roles):
            raise ValueError(f"{len(ref)} reference log-probs for {len(roles)} sequences")
        out["ref_logps"] = torch.tensor(ref, dtype=torch.float32)
    return out


def to_device(batch: dict, device) -> dict:
    """Tensors (and a flex ``BlockMask``) moved to ``device``; ints stay as they are."""
    return {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}

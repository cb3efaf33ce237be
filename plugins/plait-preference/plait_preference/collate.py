"""Lay preference rows out for the forward, and tell the objective which
positions belong to which sequence.

Two layouts, the same sequences in the same order:

* **one row per sequence** (:func:`collate_as_rows`, the default): chosen and
  rejected of a pair (or a KTO row's completion and KL sequence) become rows
  of their own, right-padded, as TRL batches them. Attention is plain causal
  attention over each row, so no sequence pays for the length of its
  partner; where nothing else reads the padding mask the objective drops it
  (``objective.padding_mask_is_read``), and SDPA takes its flash kernel.
* **segments of one row** (core's collator, under ``sample_packing`` or the
  ``plait_varlen`` attention): each pair row has ``seq_lens``, so it is
  collated like a packed bin; positions restart per sequence and attention
  stays inside it (a block-diagonal mask or varlen offsets). Pairs can then
  be packed together.

Either way the batch gets ``segment_index`` (``[B, W]``: the sequence each
position belongs to, numbered over the micro-batch; -1 for padding) and
``segment_roles`` (``[S]``: chosen, rejected, KTO completion or KL sequence,
numbered as :data:`plait_preference.rows.SEGMENT_NAMES`) from the
``segment_names`` in the rows' extras, and ``ref_logps`` (``[S]``) where the
rows carry precomputed reference log-probs; for ``rl:`` methods also
``scoring_plan``, the positions the objective scores (:func:`add_scoring_plan`).
"""

from __future__ import annotations


def rows_per_sequence(cfg) -> bool:
    """Whether each sequence gets a row of its own (see the module docstring):
    not when packing asks for bins, nor for the ``plait_varlen`` attention,
    which reads segment offsets and no padding mask."""
    return not cfg.sample_packing and cfg.attn_implementation != "plait_varlen"


def _segments(row: dict) -> list[tuple[int, int]]:
    """``(length, role)`` of each sequence of a (possibly packed) preference row, in order."""
    from plait_preference.rows import SEGMENT_NAMES

    number = {name: i for i, name in enumerate(SEGMENT_NAMES)}
    roles = [number[name] for extras in row["extras"] for name in extras["segment_names"]]
    if len(roles) != len(row["seq_lens"]):
        raise ValueError(f"a preference row has {len(row['seq_lens'])} sequences and {len(roles)} roles")
    return list(zip(row["seq_lens"], roles))


def collate_as_rows(cfg, rows: list[dict], pad_token_id: int) -> dict:
    """Every sequence of ``rows`` as a row of its own, right-padded, with its
    segment fields: the first layout of the module docstring."""
    from plait.model.batch import pad_rows

    sequences, layout = [], []
    for row in rows:
        start = 0
        for length, role in _segments(row):
            sequences.append({"input_ids": row["input_ids"][start:start + length],
                              "labels": row["labels"][start:start + length]})
            layout.append([(length, role)])
            start += length
    pad_to = cfg.sequence_len if cfg.pad_to_sequence_len else None
    return _with_segments(pad_rows(sequences, pad_token_id, pad_to), layout, _ref_logps(rows))


def add_segments(batch: dict, rows: list[dict]) -> dict:
    """The segment fields of a batch core laid out as packed bins (one batch row per preference row)."""
    return _with_segments(batch, [_segments(row) for row in rows], _ref_logps(rows))


def add_scoring_plan(cfg, batch: dict) -> dict:
    """``batch`` with its :class:`plait_preference.logps.ScoringPlan` under
    ``scoring_plan`` (for ``rl:`` methods; a reward model scores last tokens).
    Worked out here, at collation, so the training loop's collate thread does
    it while the previous step runs, not the thread that launches the forward;
    ORPO also scores every chosen token for its NLL."""
    if not cfg.rl:
        return batch
    from plait_preference.logps import scoring_plan
    from plait_preference.rows import CHOSEN

    whole = (CHOSEN,) if cfg.rl == "orpo" else ()
    return {**batch, "scoring_plan": scoring_plan(batch, whole_roles=whole)}


def _ref_logps(rows: list[dict]) -> list[float]:
    return [value for row in rows for extras in row["extras"] for value in extras.get("ref_logps", ())]


def _with_segments(batch: dict, layout: list[list[tuple[int, int]]], ref: list[float]) -> dict:
    """``layout[b]``: the ``(length, role)`` of each sequence in batch row ``b``, in order."""
    import torch

    index = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
    roles: list[int] = []
    for b, segments in enumerate(layout):
        start = 0
        for length, role in segments:
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
    """Tensors (and a flex ``BlockMask``) moved to ``device`` as core moves a
    training batch (:func:`plait.data.batching.to_device`: pinned, without
    blocking); ints stay as they are; a 2-D ``attention_mask`` of all ones is
    dropped (core's :func:`plait.model.batch.drop_full_attention_mask`)."""
    from plait.data.batching import to_device as move_batch
    from plait.model.batch import drop_full_attention_mask

    return move_batch(drop_full_attention_mask(batch), device)

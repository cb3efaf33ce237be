"""Which rows go into which micro-batch, and fetching them.

The plan for one epoch is a list of micro-batches; each micro-batch is a list
of *bins*; each bin is a list of row indices that become one sequence::

    unpacked, micro_batch_size 2:   [[[7], [2]], [[5], [0]], [[3]]]
    packed (sample_packing):        [[[7, 2, 9], [5, 0]], [[3, 1]]]

Plans are a pure function of ``(seed, epoch, rank, world_size)`` so every
rank agrees without talking, and a resumed run rebuilds the exact epoch plan
and skips the micro-batches it already trained on.

The training order of unpacked rows is, as in Axolotl (transformers' samplers):

* shuffled with ``seed`` and ``epoch`` (the default);
* ``curriculum_sampling``: the dataset's order, every epoch (with
  ``sample_packing`` too: bins are filled in row order, next-fit);
* ``group_by_length``: :func:`length_grouped_order`, transformers'
  length-grouped sampler (shuffled, then sorted by length within mega-batches
  of 50 optimizer steps' rows, the longest row first).
"""

from __future__ import annotations

import json
import random
from typing import Sequence


def _epoch_rng(seed: int, epoch: int) -> random.Random:
    # its own generator: the plan must not depend on (or disturb) the global RNGs
    return random.Random((int(seed) * 1_000_003 + int(epoch)) & 0xFFFFFFFF)


def plan_batches(cfg, lengths: Sequence[int], epoch: int, rank: int = 0, world_size: int = 1, *,
                 split: str = "train", micro_batch_size: int | None = None) -> list[list[list[int]]]:
    """This rank's micro-batches for ``epoch``.

    Unpacked rows are shuffled (train split only) with ``cfg.seed`` and
    ``epoch``; rows are dealt round robin to ranks after dropping fewer than
    ``world_size`` rows, so every rank gets a disjoint part and the same number
    of micro-batches (the last one may be smaller). With ``sample_packing``
    (``eval_sample_packing`` for eval) the plan comes from
    :func:`plait.data.packing.plan_packed_batches`.
    """
    if micro_batch_size is None:
        micro_batch_size = (cfg.eval_batch_size or cfg.micro_batch_size) if split == "eval" else cfg.micro_batch_size
    packed = cfg.sample_packing
    if split == "eval" and cfg.eval_sample_packing is not None:
        packed = cfg.eval_sample_packing
    in_order = split == "eval" or getattr(cfg, "curriculum_sampling", False)
    if packed:
        from plait.data.packing import plan_packed_batches

        plan = plan_packed_batches(lengths, cfg.sequence_len, micro_batch_size, cfg.seed, epoch, rank, world_size,
                                   max_rows_per_bin=cfg.sample_packing_bin_size,
                                   in_order=split == "train" and in_order,
                                   sequential=split == "train" and getattr(cfg, "sample_packing_sequentially", False))
        return _drop_last_if_short(cfg, plan, micro_batch_size)

    order = list(range(len(lengths)))
    if not in_order and getattr(cfg, "group_by_length", False):
        # one optimizer step of every data rank takes this many rows: each is grouped by length
        step_rows = micro_batch_size * cfg.gradient_accumulation_steps * world_size
        order = length_grouped_order(lengths, step_rows, _epoch_rng(cfg.seed, epoch))
    elif not in_order:
        _epoch_rng(cfg.seed, epoch).shuffle(order)
    order = order[: len(order) - len(order) % world_size]
    mine = order[rank::world_size]
    plan = [[[i] for i in mine[start:start + micro_batch_size]] for start in range(0, len(mine), micro_batch_size)]
    return _drop_last_if_short(cfg, plan, micro_batch_size)


def _drop_last_if_short(cfg, plan: list, micro_batch_size: int) -> list:
    """``dataloader_drop_last`` (transformers' meaning, train and eval): without the
    last micro-batch when it holds fewer rows (packed: bins) than the others. Every
    data rank has the same number of rows (bins), so all drop it together."""
    if getattr(cfg, "dataloader_drop_last", False) and plan and len(plan[-1]) < micro_batch_size:
        return plan[:-1]
    return plan


def length_grouped_order(lengths: Sequence[int], batch_size: int, rng: random.Random,
                         mega_batch_mult: int | None = None) -> list[int]:
    """Row indices in transformers' ``group_by_length`` order: a random
    permutation cut into mega-batches of ``mega_batch_mult * batch_size``
    rows (``mega_batch_mult``: ``len // (4 * batch_size)``, between 1 and 50),
    each sorted longest first, and the longest row of all moved to the very
    first place (an out-of-memory error shows at the first step, not late).

    So consecutive batches hold rows of similar length (little padding) while
    the order still changes with every ``rng`` (epoch)."""
    if mega_batch_mult is None:
        mega_batch_mult = max(1, min(len(lengths) // (batch_size * 4), 50))
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = mega_batch_mult * batch_size
    megabatches = [sorted(order[i:i + size], key=lambda i: -lengths[i]) for i in range(0, len(order), size)]
    if not megabatches:
        return []
    longest = max(range(len(megabatches)), key=lambda m: lengths[megabatches[m][0]])
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [i for megabatch in megabatches for i in megabatch]


def materialize(dataset, bin_indices: Sequence[int]) -> dict:
    """The row dict of one bin.

    One row: its ``input_ids`` and ``labels``. Several rows: their
    concatenation plus ``seq_lens`` (the length of each row), which the packing
    collator turns into position ids and a block-diagonal attention mask.
    Rows a format gave ``extras`` (see :mod:`plait.data.prepare`) carry them as
    ``extras``: a list with one dict per row of the bin. A row whose extras
    give ``seq_lens`` (segments of its own, e.g. a preference pair)
    contributes those segments instead of one, so it is collated like a
    packed bin even alone.
    """
    if len(bin_indices) == 1:
        row = dataset[int(bin_indices[0])]
        one = {"input_ids": list(row["input_ids"]), "labels": list(row["labels"])}
        if row.get("extras"):
            one["extras"] = [json.loads(row["extras"])]
            if one["extras"][0].get("seq_lens"):
                one["seq_lens"] = list(one["extras"][0]["seq_lens"])
        return one
    rows = dataset[[int(i) for i in bin_indices]]
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, labs in zip(rows["input_ids"], rows["labels"]):
        input_ids.extend(ids)
        labels.extend(labs)
    packed = {"input_ids": input_ids, "labels": labels, "seq_lens": [len(ids) for ids in rows["input_ids"]]}
    if any(rows.get("extras") or ()):
        packed["extras"] = [json.loads(extra) if extra else {} for extra in rows["extras"]]
        packed["seq_lens"] = [n for ids, extra in zip(rows["input_ids"], packed["extras"])
                              for n in (extra.get("seq_lens") or [len(ids)])]
    return packed


def row_lengths(dataset) -> list[int]:
    """Token count of every row: the ``length`` column when present."""
    if "length" in dataset.column_names:
        return [int(n) for n in dataset["length"]]
    return [len(ids) for ids in dataset["input_ids"]]


def to_device(batch: dict, device) -> dict:
    """Move a collated batch to ``device``: tensors and ``BlockMask`` move
    (both have ``.to``), ints such as ``max_length_q`` stay as they are; see
    :func:`move_to_device`. The moved ``attention_mask`` and ``position_ids``
    keep the CPU tensors they came from (:mod:`plait.model.host_copies`), so
    transformers' padding check (:mod:`plait.model.mask_checks`) and the search
    for packed rows (:func:`plait.model.forward.packed_segments`) read nothing
    on the device."""
    from plait.model.host_copies import keep_host_copies

    moved = {key: move_to_device(value, device) for key, value in batch.items()}
    return keep_host_copies(batch, moved)


def move_to_device(value, device):
    """``value`` on ``device`` (anything without ``.to`` is returned as it is).

    A CPU tensor bound for a GPU goes through pinned memory without blocking:
    a copy from pageable memory makes the host wait until the device has
    finished all the work queued before it, so every step would start with
    the GPU idle while the host launches its first kernels. The pinned buffer
    comes from torch's caching host allocator, which keeps it alive until the
    copy has run."""
    if not hasattr(value, "to"):
        return value
    import torch

    device = torch.device(device)
    if isinstance(value, torch.Tensor) and value.device.type == "cpu" and device.type == "cuda":
        return value.pin_memory().to(device, non_blocking=True)
    return value.to(device)

"""``dataset_exact_deduplication``: drop rows whose tokens repeat an earlier row.

Axolotl compares whole tokenized rows (a hash of every column) and keeps the
first copy. Plait compares what a row trains on: ``input_ids``, ``labels``
and ``extras`` (a format's per-row data, e.g. a preference pair's segments);
``attention_mask`` and ``length`` follow from ``input_ids``. Rows are hashed
(SHA-256 of their JSON), so the result depends only on the rows and their
order, never on the process or the machine.
"""

from __future__ import annotations

import hashlib
import json

#: the columns that make two rows the same
COMPARED = ("input_ids", "labels", "extras")


def row_digests(dataset) -> list[bytes]:
    """One SHA-256 digest per row of ``dataset``, in order."""
    columns = [name for name in COMPARED if name in dataset.column_names]
    digests = []
    for batch in dataset.select_columns(columns).iter(batch_size=1024):
        for values in zip(*(batch[name] for name in columns)):
            digests.append(hashlib.sha256(json.dumps(values, separators=(",", ":")).encode()).digest())
    return digests


def deduplicate(parts: list, stats: list) -> list:
    """``parts`` with every row that repeats an earlier one (in this part or a
    part before it) removed; each part's :class:`~plait.data.rows.DatasetStats`
    in ``stats`` (same order) counts its dropped rows and loses their tokens."""
    seen: set[bytes] = set()
    kept_parts = []
    for part, stat in zip(parts, stats):
        keep = []
        for index, digest in enumerate(row_digests(part)):
            if digest not in seen:
                seen.add(digest)
                keep.append(index)
        dropped = len(part) - len(keep)
        if dropped:
            removed = part.select(sorted(set(range(len(part))) - set(keep)))
            stat.dropped_duplicate += dropped
            stat.kept -= dropped
            stat.tokens -= sum(removed["length"])
            stat.trained_tokens -= sum(sum(1 for label in labels[1:] if label != -100) for labels in removed["labels"])
            part = part.select(keep)
        kept_parts.append(part)
    return kept_parts

"""``input_output``: rows of ``segments: [{"text": ..., "label": true/false}]``.

Each segment is tokenized on its own, without special tokens (put BOS/EOS in
the text where you want them, as in Axolotl); segments with ``label: false``
are masked, the others (``label`` missing or true) trained. The column is
``segments`` unless ``field`` names another.
"""

from __future__ import annotations

from plait.errors import BadRowError

from plait_formats.common import IGNORE, column

TYPES = ("input_output",)


def tokenize(cfg, dataset_cfg, tokenizer, batch) -> dict:
    rows = column(batch, dataset_cfg.field or "segments")
    out = {"input_ids": [], "labels": []}
    for index, segments in enumerate(rows):
        if not segments:
            raise BadRowError(index, "no segments")
        ids, labels = [], []
        for number, segment in enumerate(segments):
            if not isinstance(segment, dict) or not isinstance(segment.get("text"), str):
                raise BadRowError(index, f"segment {number} needs a 'text' string, got {segment!r}")
            piece = tokenizer(segment["text"], add_special_tokens=False)["input_ids"]
            trained = segment.get("label")
            ids += piece
            labels += list(piece) if trained is None or trained else [IGNORE] * len(piece)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out

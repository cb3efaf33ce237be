"""What prepared data is made of: the columns of a tokenized row and the
statistics of one dataset entry. Shared by :mod:`plait.data.prepare` and
:mod:`plait.data.streaming` (it imports neither)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DatasetStats:
    """What happened to the rows of one dataset entry.

    ``rows_in`` counts source rows; the other counts are output rows, which can
    outnumber them when a format splits long texts (``completion``).
    ``tokens`` and ``trained_tokens`` count the kept rows only.
    """

    name: str
    split: str = "train"
    rows_in: int = 0
    kept: int = 0
    dropped_too_long: int = 0
    #: shorter than ``min_sample_len``
    dropped_too_short: int = 0
    dropped_bad: int = 0
    dropped_no_trained: int = 0
    #: the same tokens as an earlier row (``dataset_exact_deduplication``)
    dropped_duplicate: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    bad_examples: list[str] = field(default_factory=list)

    def merged(self, other: "DatasetStats", examples: int) -> "DatasetStats":
        """These counts and ``other``'s added up (two parts of one entry), keeping
        at most ``examples`` bad-row examples; the name is this one's."""
        from dataclasses import fields, replace

        counts = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)
                  if isinstance(getattr(self, f.name), int)}
        return replace(self, **counts, bad_examples=(self.bad_examples + other.bad_examples)[:examples])

    @property
    def dropped(self) -> int:
        return (self.dropped_too_long + self.dropped_too_short + self.dropped_bad + self.dropped_no_trained
                + self.dropped_duplicate)



def row_features():
    """The ``datasets`` features of prepared rows (token ids, labels, status columns)."""
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    return datasets.Features({"input_ids": ids, "labels": ids, "attention_mask": datasets.List(datasets.Value("int8")),
                              "length": datasets.Value("int32"), "extras": datasets.Value("string"),
                              "_status": datasets.Value("string"),
                              "_trained": datasets.Value("int32"), "_bad": datasets.Value("string")})

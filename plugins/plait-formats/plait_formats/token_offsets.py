"""Token ids of many texts with each token's characters, as flat arrays.

The Rust tokenizer can report each token's character span itself, but that is
a fifth of its time, and Python then reads the spans as one tuple per token
(as long again). For a byte-level BPE tokenizer (GPT-2's kind: Llama 3, Qwen,
the test kit's) without a normalizer, the tokens of ASCII text cover its
characters one after another, each as many as its vocabulary string is long
(one character per byte): the spans follow from the ids by a running sum.

Whether they do is a property of the tokenizer's whole pipeline (a normalizer,
a prefix space, trimmed offsets or an added token that swallows spaces break
it for nearly every text), so it is checked once per tokenizer and process,
on the first batch: every ASCII row's spans read from the ids must equal the
tokenizer's own. Afterwards each row read that way must still come out
exactly as long as its text; a row that does not, and any row that is not
ASCII, is tokenized again with the tokenizer's own spans.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate, chain
from operator import attrgetter

import numpy as np


@dataclass
class TokenBatch:
    """Tokens of a batch of texts: ``ids`` per row, and flat over all rows
    the ids again and each token's ``starts`` / ``ends`` (one past its last
    character) in its own row's text; ``lengths``: tokens per row."""

    ids: list[list[int]]
    flat_ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    lengths: list[int]

    @classmethod
    def from_lists(cls, ids: list[list[int]], offsets: list[list[tuple[int, int]]]) -> TokenBatch:
        """From per-row ids and ``(start, end)`` pairs, as tokenizers give them."""
        lengths = [len(row) for row in ids]
        total = sum(lengths)
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=total)
        # the pairs flattened to plain ints: numpy reads those several times faster than tuples
        pairs = np.fromiter(chain.from_iterable(chain.from_iterable(offsets)), dtype=np.int64, count=2 * total)
        pairs = pairs.reshape(total, 2)
        return cls([list(row) for row in ids], flat, pairs[:, 0].copy(), pairs[:, 1].copy(), lengths)

    @classmethod
    def concat(cls, parts: list[TokenBatch]) -> TokenBatch:
        return cls([row for part in parts for row in part.ids], np.concatenate([p.flat_ids for p in parts]),
                   np.concatenate([p.starts for p in parts]), np.concatenate([p.ends for p in parts]),
                   [n for part in parts for n in part.lengths])

    def rows(self, order: list[int]) -> TokenBatch:
        """The rows ``order`` of this batch, in that order."""
        cuts = np.cumsum([0] + self.lengths)
        take = np.concatenate([np.arange(cuts[r], cuts[r + 1]) for r in order]) if order else np.zeros(0, int)
        return TokenBatch([self.ids[r] for r in order], self.flat_ids[take], self.starts[take], self.ends[take],
                          [self.lengths[r] for r in order])

    def offsets(self) -> list[list[tuple[int, int]]]:
        """Every row's ``(start, end)`` pairs, as tokenizers give them."""
        pairs = list(zip(self.starts.tolist(), self.ends.tolist()))
        cuts = list(accumulate(self.lengths, initial=0))
        return [pairs[cuts[r]:cuts[r + 1]] for r in range(len(self.lengths))]

    def row_offsets(self, row: int) -> list[tuple[int, int]]:
        """Row ``row``'s ``(start, end)`` pairs."""
        first = sum(self.lengths[:row])
        last = first + self.lengths[row]
        return list(zip(self.starts[first:last].tolist(), self.ends[first:last].tolist()))


class SpanReader:
    """Tokenizes for one tokenizer, reading spans from the ids once the first
    batch has shown that this is exact for it (see the module's docstring)."""

    def __init__(self, backend):
        self.backend = backend
        # characters each token covers when it is one character per byte; checked before it is used
        self.size = backend.get_vocab_size(with_added_tokens=True)
        top = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1  # ids may leave gaps
        self.widths = np.array([len(backend.id_to_token(i) or "") for i in range(top)], dtype=np.int64)
        self.trusted: bool | None = None  # None: no ASCII row checked yet

    def encode(self, texts: list[str]) -> TokenBatch:
        if self.trusted is False or not hasattr(self.backend, "encode_batch_fast"):
            return self.with_spans(texts)
        if self.trusted is None:
            tokens = self.with_spans(texts)
            self.trusted = self.agrees(texts, tokens)
            return tokens
        ascii_rows = [r for r, text in enumerate(texts) if text.isascii()]
        fast = self.from_ids(self.backend.encode_batch_fast([texts[r] for r in ascii_rows], add_special_tokens=False))
        # a row's last token ends where its text does, when the ids place its tokens right
        last = np.cumsum(fast.lengths) - 1
        covered = np.where(np.array(fast.lengths) > 0, fast.ends[np.maximum(last, 0)] if len(fast.ends) else 0, 0)
        ok = [r for r, width in zip(ascii_rows, covered.tolist()) if width == len(texts[r])]
        if len(ok) == len(texts):
            return fast
        # rows the ids cannot place (not ASCII, or not covering their text): the tokenizer's own spans
        placed = set(ok)
        fast = fast.rows([k for k, r in enumerate(ascii_rows) if r in placed])
        others = [r for r in range(len(texts)) if r not in placed]
        slow = self.with_spans([texts[r] for r in others])
        merged = TokenBatch.concat([fast, slow])
        position = {r: k for k, r in enumerate(ok + others)}
        return merged.rows([position[r] for r in range(len(texts))])

    def with_spans(self, texts: list[str]) -> TokenBatch:
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        return TokenBatch.from_lists([e.ids for e in encodings], [e.offsets for e in encodings])

    def from_ids(self, encodings) -> TokenBatch:
        """Spans by a running sum of the tokens' widths, restarting at each row."""
        ids = list(map(_ids_of, encodings))  # a C-level getter: faster than a comprehension's attribute loads
        lengths = [len(row) for row in ids]
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=sum(lengths))
        # an id the table lacks gets no width, so its row cannot cover its text and is tokenized again
        widths = self.widths[np.minimum(flat, len(self.widths) - 1)] if len(self.widths) else np.zeros_like(flat)
        widths[flat >= len(self.widths)] = 0
        ends = np.cumsum(widths)
        row_start = np.concatenate([[0], ends])[np.cumsum([0] + lengths[:-1])] if lengths else np.zeros(0, int)
        ends -= np.repeat(row_start, lengths)
        return TokenBatch(ids, flat, ends - widths, ends, lengths)

    def agrees(self, texts: list[str], tokens: TokenBatch) -> bool | None:
        """Whether spans read from the ids equal ``tokens``' (the tokenizer's
        own) on every ASCII row; ``None`` when there is none to compare."""
        ascii_rows = [r for r, text in enumerate(texts) if text.isascii() and tokens.lengths[r]]
        if not ascii_rows:
            return None
        own = tokens.rows(ascii_rows)
        read = self.from_ids([_Ids(row) for row in own.ids])
        return bool(np.array_equal(read.starts, own.starts) and np.array_equal(read.ends, own.ends))


@dataclass
class _Ids:
    """An encoding's ids alone, as :meth:`SpanReader.from_ids` reads them."""

    ids: list[int]


_READERS: dict[int, SpanReader] = {}
_ids_of = attrgetter("ids")


def encode_with_spans(tokenizer, texts: list[str]) -> TokenBatch:
    """Token ids and character spans of ``texts``, without special tokens.

    The Rust tokenizer is called directly when it carries no truncation or
    padding of its own (then transformers' wrapper only converts its output);
    otherwise through the wrapper, with the tokenizer's own spans."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return TokenBatch.from_lists(encoded["input_ids"], encoded["offset_mapping"])
    reader = _READERS.get(id(backend))
    # the reader holds the backend, so its id stays its own; tokens added since make it start over
    if reader is None or reader.backend is not backend or reader.size != backend.get_vocab_size(True):
        if len(_READERS) >= 16:
            _READERS.clear()
        reader = _READERS[id(backend)] = SpanReader(backend)
    return reader.encode(texts)

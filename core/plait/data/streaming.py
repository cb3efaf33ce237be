"""``pretraining_dataset:``: raw text streamed, tokenized only as far as the run reads.

A pretraining corpus is often far larger than one run consumes, so it is
opened with ``datasets``' streaming mode and read document by document until
the run's token budget is covered::

    budget = max_steps * micro_batch_size * gradient_accumulation_steps * world_size * sequence_len

(the world size counts every process, an upper bound on the data-parallel
ranks: tensor- or context-parallel ranks share rows, so at worst a little more
is read than used). Each document is tokenized with the tokenizer's special
tokens and ends with EOS, then laid out as rows:

* ``sample_packing: false``: the token stream is concatenated and cut into
  rows of exactly ``sequence_len`` tokens (attention runs across documents, as
  in the usual concatenate-and-chunk pretraining)::

      doc A (5) | doc B (7) | doc C (6)  --sequence_len 8-->  [A A A A A B B B] [B B B B C C C C] [C C]

  the short tail row is dropped;
* ``sample_packing: true``: each document is a row (a longer one is split into
  ``sequence_len`` pieces) and the packer fills bins with them, so attention
  never crosses from one document into the next.

Every token is trained. Rows are then shuffled with ``seed`` like any training
set (``shuffle_merged_datasets``). They go through the same cache as ``datasets:``
(the key holds the stream's settings and the budget), so a resumed or
repeated run reads nothing again.
"""

from __future__ import annotations

import math
import os

from plait.errors import DataError

#: documents tokenized per tokenizer call
BATCH = 512
#: read this much beyond the budget: packing leaves some slots empty
PACKING_SLACK = 1.05


def token_budget(cfg) -> int:
    """Tokens the run consumes at most (see the module docstring)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return cfg.max_steps * cfg.micro_batch_size * cfg.gradient_accumulation_steps * world * cfg.sequence_len


def open_stream(entry, key: str = "pretraining_dataset"):
    """An iterable over the entry's rows, read lazily (local files and hub
    names); ``key`` is the config list the entry is in, for the message."""
    import datasets

    from plait.data.sources import builder_for, local_data_files, resolve_path

    local = resolve_path(entry.path)
    try:
        if local is not None:
            files = local_data_files(entry, local)
            builder = builder_for(entry, files[0])
            stream = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
        else:
            split = getattr(entry, "train_on_split", None) or entry.split
            stream = datasets.load_dataset(entry.path, name=entry.name, split=split, data_files=entry.data_files,
                                           revision=entry.revision, streaming=True,
                                           **({"trust_remote_code": True} if entry.trust_remote_code else {}))
    except DataError:
        raise
    except Exception as exc:  # the datasets library's own errors: say which entry, in one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{key} {entry.path!r} could not be opened for streaming: {reason}") from exc
    skip = getattr(entry, "skip", 0)
    return stream.skip(skip) if skip else stream


#: rows read from a streamed ``datasets:`` entry at a time (``streaming: true``)
STREAM_CHUNK = 256


def streamed_chunks(entry, size: int = STREAM_CHUNK):
    """The rows of a ``datasets:`` entry read as a stream, ``size`` at a time (lists of dicts)."""
    chunk = []
    for row in open_stream(entry, key="datasets"):
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def streaming_enough(cfg, rows: int, tokens: int) -> bool:
    """Whether the kept rows of a streamed ``datasets:`` entry cover the run:
    its token budget (with the packing slack) when packing, else one row per
    slot of every step."""
    if cfg.sample_packing:
        return tokens >= math.ceil(token_budget(cfg) * PACKING_SLACK)
    return rows >= token_budget(cfg) // cfg.sequence_len  # the budget is rows of sequence_len slots


def documents(entry, stream):
    """The text of each row, checked: a missing or non-text column names the row."""
    for number, row in enumerate(stream, start=entry.skip + 1):
        text = row.get(entry.text_column)
        if not isinstance(text, str):
            # a streamed JSON file's columns are the union over rows: name the ones this row fills
            found = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"
            raise DataError(f"pretraining_dataset {entry.path!r}, row {number}: no text in column "
                            f"{entry.text_column!r} (columns: {found}); set text_column")
        yield text


def tokenized(tokenizer, texts):
    """Token ids of each document, with the tokenizer's special tokens and a final EOS."""
    eos = tokenizer.eos_token_id
    batch = []

    def flush():
        for ids in tokenizer(batch)["input_ids"]:
            yield ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == BATCH:
            yield from flush()
    if batch:
        yield from flush()


def rows_from_documents(token_lists, sequence_len: int, *, packed: bool, budget: int):
    """Rows of token ids from documents until ``budget`` tokens are laid out;
    returns ``(rows, documents_read)``."""
    rows, documents_read, total, buffer = [], 0, 0, []
    target = math.ceil(budget * PACKING_SLACK) if packed else budget
    for ids in token_lists:
        documents_read += 1
        if packed:
            for start in range(0, len(ids), sequence_len):
                piece = ids[start:start + sequence_len]
                if len(piece) > 1:  # a one-token piece trains nothing
                    rows.append(piece)
                    total += len(piece)
        else:
            buffer.extend(ids)
            while len(buffer) >= sequence_len and total < target:
                rows.append(buffer[:sequence_len])
                del buffer[:sequence_len]
                total += sequence_len
        if total >= target:
            break
    return rows, documents_read


def stream_pretraining(cfg, tokenizer):
    """``(rows, stats)``: the run's training rows from ``pretraining_dataset``
    and one :class:`~plait.data.rows.DatasetStats` per entry read; entries
    are read one after another until the budget is met."""
    import datasets

    from plait.data.rows import DatasetStats, row_features

    budget = token_budget(cfg)
    all_rows, stats = [], []
    for index, entry in enumerate(cfg.pretraining_dataset):
        left = budget - sum(len(r) for r in all_rows)
        if left <= 0:
            break
        texts = documents(entry, open_stream(entry))
        rows, read = rows_from_documents(tokenized(tokenizer, texts), cfg.sequence_len,
                                         packed=cfg.sample_packing, budget=left)
        tokens = sum(len(r) for r in rows)
        stats.append(DatasetStats(name=f"pretraining_dataset.{index} {entry.path}", rows_in=read, kept=len(rows),
                                 tokens=tokens, trained_tokens=sum(len(r) - 1 for r in rows)))
        all_rows.extend(rows)
    if not all_rows:
        raise DataError(f"pretraining_dataset gave no row of at least 2 tokens (sequence_len {cfg.sequence_len}); "
                        f"check text_column and the files")
    columns = {"input_ids": all_rows, "labels": all_rows, "attention_mask": [[1] * len(r) for r in all_rows],
               "length": [len(r) for r in all_rows]}
    features = row_features()
    train = datasets.Dataset.from_dict(columns, features=datasets.Features(
        {name: features[name] for name in columns}))
    return train, stats

"""Turn a run's ``datasets:`` into tokenized train and eval sets.

For each entry: load it (:mod:`plait.data.sources`), call the ``tokenize`` hook
in a batched ``Dataset.map``, then sort every output row into one status:

``ok``          kept
``truncated``   longer than ``sequence_len`` and cut to it (``excess_length_strategy: truncate``)
``too_long``    longer than ``sequence_len`` and dropped (``excess_length_strategy: drop``)
``too_short``   shorter than ``min_sample_len`` (before any truncation), dropped
``no_trained``  no token is trained (every label after the first is -100), dropped
``bad``         the hook rejected it and ``skip_bad_rows`` is set, dropped (malformed JSON
                lines left out while loading count here too)

With ``dataset_exact_deduplication`` a row whose tokens (``input_ids``,
``labels``, ``extras``) equal an earlier row's is dropped, as Axolotl does:
the training entries are deduplicated together in entry order (the first
copy is kept and the dropped ones are counted against their own entry),
before the ``val_set_size`` split, so the train and eval parts never share a
row; ``test_datasets`` are deduplicated among themselves.

The entries are concatenated (shuffled with ``seed`` when
``shuffle_merged_datasets``, except for one entry under
``curriculum_sampling``, which keeps the file's order as in Axolotl); the eval set is ``test_datasets`` when given,
else ``val_set_size`` rows (a fraction below 1, a count from 1) split off with
``seed``. The result is cached (:mod:`plait.data.cache`) and reused while the
data, tokenizer and settings stay the same.

"Trained tokens" counts labels other than -100 from the second position on:
the first position has no preceding token to predict it from.

A format may return ``extras`` beside ``input_ids`` and ``labels``: one
JSON-serialisable dict per row (a vision format keeps the rendered text and its
image references there, never pixels). It is stored as a JSON string column and
handed back to ``collate`` with the row (:func:`plait.data.batching.materialize`).
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from plait.data.cache import cache_key, cache_root, write_atomically
from plait.data.rows import DatasetStats, row_features
from plait.data.sources import Source, load_source, resolve_path
from plait.errors import BadRowError, ConfigError, DataError, PlaitError
from plait.logs import verbose

log = logging.getLogger("plait.data")

IGNORE = -100
KEEP = ("ok", "truncated")
#: batch functions alive in this process, for workers forked from it (see TokenizeBatch)
_LIVE: "weakref.WeakValueDictionary[str, TokenizeBatch]" = weakref.WeakValueDictionary()
#: rows skipped by skip_bad_rows that the stats quote, per dataset
BAD_EXAMPLES = 3


@dataclass
class PreparedData:
    """Tokenized rows (columns ``input_ids``, ``labels``, ``attention_mask``,
    ``length``; ``extras`` when a format gave some) ready for packing or collation."""

    train: object  # datasets.Dataset
    eval: object | None
    stats: list[DatasetStats]
    cache_path: Path
    from_cache: bool


# ------------------------------------------------------------- the batch step


class TokenizeBatch:
    """The function ``Dataset.map`` calls on each batch of one entry.

    A class rather than a closure so that ``num_proc`` workers can unpickle
    it. The run's config class and plugin manager cannot be pickled: a worker
    forked after this object was made finds them in :data:`_LIVE`; any other
    worker rebuilds them from the config's values and ``plugins:``.
    """

    def __init__(self, cfg, pm, tokenizer, entry, source: Source, label: str):
        self.cfg, self.pm, self.tokenizer, self.entry = cfg, pm, tokenizer, entry
        self.source, self.label = source, label
        self.token = uuid.uuid4().hex
        _LIVE[self.token] = self

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("cfg", "pm")}
        state["raw_cfg"] = self.cfg.model_dump()
        return state

    def __setstate__(self, state):
        raw = state.pop("raw_cfg")
        self.__dict__.update(state)
        live = _LIVE.get(self.token)
        if live is not None:
            self.cfg, self.pm = live.cfg, live.pm
            return
        from plait.config import build_config
        from plait.plugins import build_plugin_manager

        self.pm = build_plugin_manager(raw.get("plugins") or [], disable=raw.get("disable_plugins") or [])
        self.cfg = build_config(self.pm, raw)

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        try:
            out, bad = self._call_hook(batch, indices), []
        except BadRowError as exc:
            if not self.cfg.skip_bad_rows:
                raise self._data_error(exc, indices) from None
            out, bad = self._tokenize_row_by_row(batch, indices)
        return self._sort_rows(out, bad)

    def _call_hook(self, batch: dict, indices: list[int]) -> dict:
        try:
            out = self.pm.hook.tokenize(cfg=self.cfg, dataset_cfg=self.entry, tokenizer=self.tokenizer, batch=batch)
        except PlaitError:
            raise
        except Exception as exc:  # a format's bug or data it did not expect: say where (--debug: traceback)
            if not indices:
                raise
            (path, first, line), (_, last, _) = self.source.where(indices[0]), self.source.where(indices[-1])
            lines = f" (from line {line})" if line is not None and line != first else ""
            raise DataError(f"tokenizing rows {first} to {last}{lines} (dataset {self.label}, type "
                            f"{self.entry.type}) failed: {type(exc).__name__}: {exc}", path=path) from exc
        if out is None:
            if self.entry.type is None:
                raise ConfigError(f"config key '{self.label}.type' is not set and the rows have no input_ids "
                                  f"(columns: {sorted(batch)}); set a type such as alpaca or chat_template")
            raise ConfigError(f"config key '{self.label}.type': no plugin tokenizes {self.entry.type!r}")
        if not isinstance(out, dict) or "input_ids" not in out or "labels" not in out \
                or len(out["input_ids"]) != len(out["labels"]):
            raise ConfigError(f"the tokenize hook for type {self.entry.type!r} returned {_describe(out)}; it must "
                              f"return lists 'input_ids' and 'labels' of the same length")
        return out

    def _tokenize_row_by_row(self, batch: dict, indices: list[int]) -> tuple[dict, list[str]]:
        """After a bad row, tokenize one row at a time so only bad rows are lost."""
        out, bad = {"input_ids": [], "labels": [], "extras": []}, []
        for position, index in enumerate(indices):
            row = {key: values[position:position + 1] for key, values in batch.items()}
            try:
                one = self._call_hook(row, [index])
            except BadRowError as exc:
                bad.append(str(self._data_error(exc, [index])))
                continue
            out["input_ids"] += one["input_ids"]
            out["labels"] += one["labels"]
            out["extras"] += one.get("extras") or [None] * len(one["input_ids"])
        return out, bad

    def _data_error(self, exc: BadRowError, indices: list[int]) -> DataError:
        index = indices[exc.index] if 0 <= exc.index < len(indices) else indices[0]
        return self.source.error(index, f"{exc.message} (dataset {self.label}, type {self.entry.type})")

    def _sort_rows(self, out: dict, bad: list[str]) -> dict:
        limit, truncate = self.cfg.sequence_len, self.cfg.excess_length_strategy == "truncate"
        shortest = self.cfg.min_sample_len or 0
        rows = {"input_ids": [], "labels": [], "attention_mask": [], "length": [], "extras": [], "_status": [],
                "_trained": [], "_bad": []}
        extras = out.get("extras") or [None] * len(out["input_ids"])
        if len(extras) != len(out["input_ids"]):
            raise ConfigError(f"the tokenize hook for type {self.entry.type!r} returned {len(extras)} extras for "
                              f"{len(out['input_ids'])} rows; give one dict per row")

        def add(ids, labels, status, trained=0, bad_message="", extra=None):
            rows["extras"].append(json.dumps(extra) if extra else "")
            rows["input_ids"].append(ids)
            rows["labels"].append(labels)
            rows["attention_mask"].append([1] * len(ids))
            rows["length"].append(len(ids))
            rows["_status"].append(status)
            rows["_trained"].append(trained)
            rows["_bad"].append(bad_message)

        for ids, labels, extra in zip(out["input_ids"], out["labels"], extras):
            ids, labels = list(ids), list(labels)
            if len(ids) != len(labels):
                raise ConfigError(f"the tokenize hook for type {self.entry.type!r} returned a row with "
                                  f"{len(ids)} input_ids and {len(labels)} labels; they must be equal")
            status = "ok"
            if len(ids) < shortest:
                add([], [], "too_short")
                continue
            if len(ids) > limit:
                # a row of segments (extras' seq_lens) cut at the end would lose one whole: drop it
                if not truncate or (extra or {}).get("seq_lens"):
                    add([], [], "too_long")
                    continue
                ids, labels, status = ids[:limit], labels[:limit], "truncated"
            trained = sum(1 for label in labels[1:] if label != IGNORE)
            if trained == 0:
                add([], [], "no_trained")
                continue
            add(ids, labels, status, trained, extra=extra)
        for message in bad:
            add([], [], "bad", bad_message=message)
        return rows


def _describe(out) -> str:
    return f"keys {sorted(out)}" if isinstance(out, dict) else f"a {type(out).__name__}"


# ------------------------------------------------------------------- entries


def prepare_entry(cfg, pm, tokenizer, entry, label: str, *, fingerprint: str, split: str = "train"):
    """Tokenize and filter one dataset entry. Returns ``(dataset, stats)``."""
    if cfg.streaming and split == "train":
        return _prepare_streamed(cfg, pm, tokenizer, entry, label, fingerprint=fingerprint, split=split)
    source = load_source(entry, skip_bad_rows=cfg.skip_bad_rows)
    return _tokenize_source(cfg, pm, tokenizer, entry, source, label, fingerprint=fingerprint, split=split)


def _prepare_streamed(cfg, pm, tokenizer, entry, label: str, *, fingerprint: str, split: str):
    """``streaming: true``: the entry is read as a stream, a chunk at a time, and
    tokenized only until its kept rows cover the run (:func:`streaming_enough`);
    rows past that are never read. Row numbers in messages count from the
    stream's start."""
    import datasets

    from plait.data.sources import Source
    from plait.data.streaming import streamed_chunks, streaming_enough

    where = f"{entry.path} (streamed)"
    parts, stats, read, enough = [], None, 0, False
    for number, chunk in enumerate(streamed_chunks(entry)):
        source = Source(datasets.Dataset.from_list(chunk), where, [(where, read + len(chunk))], row_offset=read)
        kept, one = _tokenize_source(cfg, pm, tokenizer, entry, source, f"{label}.{number}",
                                     fingerprint=fingerprint, split=split)
        parts.append(kept)
        stats = one if stats is None else stats.merged(one, BAD_EXAMPLES)
        read += len(chunk)
        enough = streaming_enough(cfg, stats.kept, stats.tokens)
        if enough:
            break
    if not parts:
        raise DataError("the stream has no rows", path=entry.path)
    stats.name = f"{label} {entry.path}"
    log.info("%s: read %d rows of the stream%s", entry.path, read,
             ", enough for the run's steps" if enough else "; it ended before the run's steps were covered, so "
                                                            "they are trained again, epoch after epoch")
    return (datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]), stats


def _tokenize_source(cfg, pm, tokenizer, entry, source, label: str, *, fingerprint: str, split: str):
    raw = source.dataset
    workers = min(cfg.dataset_processes or 1, max(1, len(raw)))
    with _progress.tokenizing_bar():
        mapped = raw.map(
            TokenizeBatch(cfg, pm, tokenizer, entry, source, label),
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            features=row_features(),
            num_proc=workers if workers > 1 else None,
            load_from_cache_file=False,  # our own cache decides; the hook's code is not in datasets' fingerprint
            new_fingerprint=f"{fingerprint[:24]}-{label}",
            desc=f"tokenizing {label} ({entry.path})",
        )
    columns = mapped.select_columns(["_status", "length", "_trained", "_bad"]).to_dict()
    counts = Counter(columns["_status"])
    # lines that could not be read as rows (skip_bad_rows) are rows in, and bad
    stats = DatasetStats(name=f"{label} {entry.path}", split=split, rows_in=len(raw) + len(source.skipped),
                         kept=counts["ok"] + counts["truncated"], dropped_too_long=counts["too_long"],
                         dropped_too_short=counts["too_short"],
                         dropped_bad=counts["bad"] + len(source.skipped), dropped_no_trained=counts["no_trained"],
                         truncated=counts["truncated"], bad_examples=source.skipped[:BAD_EXAMPLES])
    for status, length, trained, bad in zip(columns["_status"], columns["length"], columns["_trained"],
                                            columns["_bad"]):
        if status in KEEP:
            stats.tokens += length
            stats.trained_tokens += trained
        elif bad and len(stats.bad_examples) < BAD_EXAMPLES:
            stats.bad_examples.append(bad)
    kept = mapped.filter(lambda statuses: [s in KEEP for s in statuses], input_columns=["_status"], batched=True,
                         load_from_cache_file=False, desc=f"filtering {label}")
    unused = ["_status", "_trained", "_bad"]
    if not any(kept["extras"]):
        unused.append("extras")  # a text format: no column to carry
    return kept.remove_columns(unused), stats


# ---------------------------------------------------------------------- run


def prepare_datasets(cfg, pm, tokenizer, *, show_progress: bool = True) -> PreparedData:
    """Tokenize, filter, mix, split and cache the run's datasets.

    Reuses the cache entry when one exists for the same data, tokenizer and
    settings. In a ``torch.distributed`` run only rank 0 tokenizes; the other
    ranks wait on a barrier and load what it wrote.
    """
    if not cfg.datasets and not cfg.pretraining_dataset:
        raise ConfigError("config key 'datasets' is empty; list at least one dataset (path and type)")
    entries = [*cfg.datasets, *cfg.test_datasets, *cfg.pretraining_dataset]
    key = cache_key(cfg, pm, tokenizer, {e.path: resolve_path(e.path) for e in entries})
    path = cache_root(cfg) / key[:16]
    dist = _distributed()

    if _complete(path):
        return _load(path, show_progress)
    if dist is not None and dist.get_rank() != 0:
        dist.barrier()  # rank 0 is tokenizing
        if not _complete(path):
            raise DataError(f"rank 0 did not finish preparing the data in {path}; see its error above")
        return _load(path, show_progress)
    try:
        with _progress(show_progress):
            prepared = _build(cfg, pm, tokenizer, key, path)
    finally:
        if dist is not None:
            dist.barrier()
    return prepared


def _build(cfg, pm, tokenizer, key: str, path: Path) -> PreparedData:
    import datasets

    stats, train_parts, eval_parts = [], [], []
    if cfg.pretraining_dataset:
        from plait.data.streaming import stream_pretraining

        streamed, stream_stats = stream_pretraining(cfg, tokenizer)
        train_parts.append(streamed)
        stats.extend(stream_stats)
    for list_key, parts, split in (("datasets", train_parts, "train"), ("test_datasets", eval_parts, "eval")):
        entry_stats = []
        for index, entry in enumerate(getattr(cfg, list_key)):
            dataset, one = prepare_entry(cfg, pm, tokenizer, entry, f"{list_key}.{index}", fingerprint=key,
                                         split=split)
            parts.append(dataset)
            entry_stats.append(one)
        if cfg.dataset_exact_deduplication and parts:
            from plait.data.dedup import deduplicate

            parts[:] = deduplicate(parts, entry_stats)
        stats.extend(entry_stats)
    train_parts, eval_parts = _same_columns(train_parts, eval_parts)
    if cfg.shuffle_before_merging_datasets:
        train_parts = [part.shuffle(seed=cfg.seed).flatten_indices() for part in train_parts]
    train = datasets.concatenate_datasets(train_parts) if len(train_parts) > 1 else train_parts[0]
    if len(train) == 0:
        raise DataError("no training rows are left after filtering: " + _summary(stats))
    # Axolotl's curriculum_sampling keeps one dataset in its order; several are still mixed when asked
    in_order = cfg.curriculum_sampling and len(train_parts) == 1
    if cfg.shuffle_merged_datasets and not in_order:
        train = train.shuffle(seed=cfg.seed).flatten_indices()
    if cfg.dataset_shard_num is not None:  # Axolotl's place for it: merged and shuffled, before the eval split
        train = train.shard(num_shards=cfg.dataset_shard_num, index=cfg.dataset_shard_idx, contiguous=True)
        if len(train) == 0:
            raise DataError(f"dataset_shard_idx {cfg.dataset_shard_idx} of dataset_shard_num "
                            f"{cfg.dataset_shard_num} holds no training rows")
    eval_set = None
    if eval_parts:
        eval_set = datasets.concatenate_datasets(eval_parts) if len(eval_parts) > 1 else eval_parts[0]
    elif cfg.val_set_size > 0:
        train, eval_set = _split(cfg, train)

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        train.save_to_disk(str(tmp / "train"))
        if eval_set is not None:
            eval_set.save_to_disk(str(tmp / "eval"))
        meta = {"key": key, "stats": [asdict(s) for s in stats]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    write_atomically(path, write)
    log.debug("prepared data written to %s", path)
    # reload from the cache so every rank trains on the same memory-mapped files
    prepared = _load(path, show_progress=False)
    prepared.from_cache = False
    return prepared


def _same_columns(*groups):
    """When some entries carry ``extras`` and others not, give the others an
    empty one, so the parts concatenate."""
    parts = [part for group in groups for part in group]
    if not any("extras" in part.column_names for part in parts):
        return groups
    return tuple([part if "extras" in part.column_names else part.add_column("extras", [""] * len(part))
                  for part in group] for group in groups)


def _split(cfg, train):
    size = cfg.val_set_size
    size = size if size < 1 else int(size)
    if isinstance(size, int) and size >= len(train):
        raise ConfigError(f"config key 'val_set_size': {cfg.val_set_size} is not accepted; there are only "
                          f"{len(train)} training rows (give a fraction below 1 or a smaller count)")
    if cfg.curriculum_sampling:
        # the same seeded choice of eval rows as below, but the training rows keep their order
        numbered = train.add_column("_row", list(range(len(train))))
        parts = numbered.train_test_split(test_size=size, seed=cfg.seed, shuffle=True)
        held_out = set(parts["test"]["_row"])
        rest = [index for index in range(len(train)) if index not in held_out]
        return train.select(rest).flatten_indices(), parts["test"].remove_columns("_row").flatten_indices()
    parts = train.train_test_split(test_size=size, seed=cfg.seed, shuffle=True)
    return parts["train"].flatten_indices(), parts["test"].flatten_indices()


def _complete(path: Path) -> bool:
    return (path / "meta.json").exists() and (path / "train").exists()


def _load(path: Path, show_progress: bool) -> PreparedData:
    import datasets

    meta = json.loads((path / "meta.json").read_text())
    stats = [DatasetStats(**s) for s in meta["stats"]]
    train = datasets.load_from_disk(str(path / "train"))
    eval_set = datasets.load_from_disk(str(path / "eval")) if (path / "eval").exists() else None
    if show_progress:
        print(f"reusing prepared data at {path}", file=sys.stderr)
    log.debug("reusing prepared data at %s", path)
    return PreparedData(train, eval_set, stats, path, from_cache=True)


def _summary(stats: list[DatasetStats]) -> str:
    return "; ".join(f"{s.name}: {s.rows_in} rows in, {s.dropped_too_long} too long, {s.dropped_too_short} too "
                     f"short, {s.dropped_bad} bad, {s.dropped_no_trained} with nothing to train, "
                     f"{s.dropped_duplicate} duplicates" for s in stats)


def _distributed():
    """``torch.distributed`` when a process group is running, else ``None``.

    Looked up in ``sys.modules`` so a single-process run never imports torch
    here: a group cannot be initialized without the module being imported.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


class _progress:
    """The data stage's progress bars, for a block.

    One bar per stage: the tokenizing bar of each entry is shown when
    ``show`` asks for bars; ``datasets``' other bars (reading files,
    filtering, flattening, saving) only with ``--verbose`` as well.
    """

    #: whether the block running now shows its tokenizing bar
    show_tokenizing = False

    def __init__(self, show: bool):
        self.show = show
        self.was_enabled = True

    def __enter__(self):
        import datasets

        self.was_enabled = not datasets.are_progress_bars_disabled()
        _progress.show_tokenizing = self.show
        if not (self.show and verbose()):
            datasets.disable_progress_bars()

    def __exit__(self, *exc):
        import datasets

        _progress.show_tokenizing = False
        if self.was_enabled:
            datasets.enable_progress_bars()
        else:
            datasets.disable_progress_bars()

    @staticmethod
    @contextmanager
    def tokenizing_bar():
        """Show ``datasets``' bar for the block when the stage shows bars."""
        import datasets

        hidden = datasets.are_progress_bars_disabled()
        if _progress.show_tokenizing and hidden:
            datasets.enable_progress_bars()
        try:
            yield
        finally:
            if hidden:
                datasets.disable_progress_bars()

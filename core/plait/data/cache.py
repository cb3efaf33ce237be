"""The prepared-data cache: its key, its location, atomic writes.

The key is a SHA-256 over everything that changes the tokenized rows:

* the bytes of every local data file (a saved ``datasets`` directory: all its
  files), or a hub dataset's name, config, revision and split;
* the tokenizer: vocabulary with added tokens, its serialized pipeline
  (normalizer, merges, post-processor), chat template and special tokens;
* each dataset entry's settings (type, field mappings, template options);
* the run keys the pipeline reads (``sequence_len``, ``train_on_inputs``,
  ``excess_length_strategy``, ``val_set_size``, ``seed``, ...);
* the plugins that answer ``tokenize`` and ``load_tokenizer``, with their
  versions (a new format version re-tokenizes; an unrelated plugin does not);
* :data:`PIPELINE_VERSION`, bumped when this pipeline changes its output.

Location: ``dataset_prepared_path`` when set, else ``prepared/`` beside the
run's ``output_dir`` (``./outputs`` -> ``./prepared``), so runs with different
output directories share one cache. Each key is a directory ``<key[:16]>``
holding ``train/``, ``eval/`` (when there is an eval set) and ``meta.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

#: bump when prepare changes the rows it writes for the same inputs
PIPELINE_VERSION = 1

#: run keys the prepared rows depend on
RUN_KEYS = ("sequence_len", "train_on_inputs", "excess_length_strategy", "skip_bad_rows", "val_set_size", "seed",
            "shuffle_merged_datasets", "chat_template", "chat_template_jinja", "min_sample_len",
            "dataset_exact_deduplication", "curriculum_sampling",
            # plait-vision's keys: the processor and image sizes decide how many tokens an image becomes
            # (read with getattr, so they are None without that plugin)
            "processor_type", "image_size", "image_resize_algorithm")


def cache_root(cfg) -> Path:
    """Where prepared datasets live for this run."""
    if cfg.dataset_prepared_path:
        return Path(cfg.dataset_prepared_path).expanduser()
    return Path(os.path.abspath(cfg.output_dir)).parent / "prepared"


def hash_path(path: Path, digest) -> None:
    """Feed the bytes of ``path`` (a file, or every file under a directory in
    sorted order, with its relative name) into ``digest``."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides how text becomes ids."""
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(tokenizer.chat_template or "").encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(json.dumps([getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None),
                              tokenizer.padding_side]).encode())
    return digest.hexdigest()


def data_fingerprint(entry, resolved: Path | None) -> str:
    """A hash of one entry's data: file bytes when local, names when on the hub."""
    digest = hashlib.sha256()
    if resolved is None:
        digest.update(json.dumps(["hub", entry.path, entry.name, entry.revision, entry.split,
                                  entry.data_files]).encode())
    else:
        hash_path(resolved, digest)
    return digest.hexdigest()


def cache_key(cfg, pm, tokenizer, resolved_paths: dict[str, Path | None]) -> str:
    """The key of this run's prepared data; ``resolved_paths`` maps each
    entry's ``path`` to the local path it resolved to (``None``: hub)."""
    parts = {
        "pipeline": PIPELINE_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "run": {key: getattr(cfg, key, None) for key in RUN_KEYS},
        "plugins": _data_plugins(pm),
    }
    # only when set: the keys of every other run's existing caches stay as they were
    if getattr(cfg, "dataset_shard_num", None) is not None:
        parts["shard"] = [cfg.dataset_shard_num, cfg.dataset_shard_idx]
    if getattr(cfg, "shuffle_before_merging_datasets", False):
        parts["shuffle_before_merging"] = True
    for streamed, key in (("pretraining_dataset", "pretraining_budget"), ("streaming", "streaming_budget")):
        if getattr(cfg, streamed, None):
            from plait.data.streaming import token_budget

            # a stream is read up to the run's budget: more steps or ranks read further
            parts[key] = [token_budget(cfg), cfg.sample_packing]
    for list_key in ("datasets", "test_datasets", "pretraining_dataset"):
        parts[list_key] = [
            {"settings": entry.model_dump(mode="json"),
             "data": data_fingerprint(entry, resolved_paths.get(entry.path)),
             **_format_inputs(cfg, pm, entry)}
            for entry in getattr(cfg, list_key, None) or []
        ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _format_inputs(cfg, pm, entry) -> dict:
    """``{"format": ...}``: the config values the entry's format says shape its
    rows (``DatasetFormat.cache_inputs``); nothing for a format that names none,
    so the keys of its existing caches stay as they were."""
    from plait.errors import ConfigError
    from plait.registries import find_format

    try:
        fmt = find_format(pm, getattr(entry, "type", None))
    except ConfigError:  # refused at validation; a stream's type may be no registered format
        return {}
    if fmt is None or fmt.cache_inputs is None:
        return {}
    return {"format": fmt.cache_inputs(cfg)}


def _data_plugins(pm) -> list[str]:
    """``name=version`` of the plugins whose code shapes the tokenized rows."""
    hooks = (pm.hook.tokenize, pm.hook.dataset_formats, pm.hook.load_tokenizer)
    names = {impl.plugin_name for hook in hooks for impl in hook.get_hookimpls()}
    return sorted(f"{name}={getattr(pm.info.get(name), 'version', None)}" for name in names)


def write_atomically(final: Path, write) -> None:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``final``, so a
    reader never sees half a cache entry. When another process finished the
    same entry first, its copy is kept and ours discarded."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

"""The checks of the machine and the filesystem that a config implies, before any model loads.

The schema checks values; :func:`preflight` checks what they point at: the
data files exist and their types are known, ``resume_from_checkpoint`` is a
complete checkpoint, ``output_dir`` and the prepared-data directory are
writable directories with room for a checkpoint, flash-attn is installed when
``flash_attention`` asks for it. ``plait config validate`` and ``plait train``
run the same function, so validate passes only what train would accept.

It returns every problem at once (a :class:`Preflight`), each naming its
config key, for a caller that reports them together; :meth:`Preflight.raise_for_problems`
turns them into one :class:`~plait.errors.ConfigError`. Notes are facts worth
saying that stop nothing (a dataset that will come from the hub).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from plait.errors import ConfigError

#: virtual filesystems: writing a run there fails or does harm
VIRTUAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


@dataclass
class Problem:
    """One thing the run cannot start with: the config key and the message
    (the bad value and what is accepted)."""

    key: str
    message: str
    #: a fact of this machine (a package it lacks), not of the config: a note for `plait config validate`
    machine: bool = False

    def __str__(self) -> str:
        return self.message


@dataclass
class Preflight:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problem(self, key: str, message: str, *, machine: bool = False) -> None:
        self.problems.append(Problem(key, message, machine))

    def raise_for_problems(self) -> None:
        if self.problems:
            raise ConfigError("\n".join(str(p) for p in self.problems))


def preflight(cfg, *, check_data: bool = True, verify_checkpoint: bool = True) -> Preflight:
    """Every problem the machine and the filesystem give ``cfg``; nothing is
    created or changed.

    ``check_data``: check the dataset entries (off when a caller brings its
    own rows). ``verify_checkpoint``: hash ``resume_from_checkpoint``'s files
    against its manifest (``plait train`` does that when it resumes, so it
    skips it here and reads them once).
    """
    report = Preflight()
    if check_data:
        check_datasets(cfg, report)
    check_resume(cfg, report, verify_checkpoint)
    check_attention(cfg, report)
    check_output_dirs(cfg, report)
    return report


# ------------------------------------------------------------------ data


def check_datasets(cfg, report: Preflight) -> None:
    from plait.data.sources import DS_TYPES

    if not cfg.datasets and not getattr(cfg, "pretraining_dataset", None):
        report.problem("datasets", "config key 'datasets' is empty: there is nothing to train on; accepted: a list "
                                   "of entries such as {path: data.jsonl, type: alpaca} (or pretraining_dataset)")
    entries = [(key, i, e) for key in ("datasets", "test_datasets", "pretraining_dataset")
               for i, e in enumerate(getattr(cfg, key, None) or [])]
    for list_key, index, entry in entries:
        where = f"{list_key}.{index}"
        check_data_path(entry, where, report)
        ds_type = getattr(entry, "ds_type", None)
        if ds_type is not None and ds_type not in DS_TYPES:
            report.problem(f"{where}.ds_type", f"config key '{where}.ds_type': {ds_type!r} is not a known file type; "
                                               f"accepted: {', '.join(DS_TYPES)}")
        shards, shards_idx = getattr(entry, "shards", None), getattr(entry, "shards_idx", None)
        if shards is not None and shards < 1:
            report.problem(f"{where}.shards", f"config key '{where}.shards': {shards} is not accepted; accepted: "
                                              f"an integer >= 1")
        elif shards_idx is not None:
            if not shards:
                report.problem(f"{where}.shards_idx", f"config key '{where}.shards_idx': {shards_idx} is set but "
                                                      f"'{where}.shards' is not; set shards too")
            elif not 0 <= shards_idx < shards:
                report.problem(f"{where}.shards_idx", f"config key '{where}.shards_idx': {shards_idx} is not "
                                                      f"accepted; accepted: 0 to {shards - 1} (shards: {shards})")


def check_data_path(entry, where: str, report: Preflight) -> None:
    from plait.data.sources import _looks_local, resolve_path

    path = resolve_path(entry.path)
    if path is None:
        if _looks_local(entry.path):
            report.problem(f"{where}.path", f"config key '{where}.path': {entry.path!r} not found (relative paths "
                                            f"are read from the working directory, {os.getcwd()})")
        else:
            report.notes.append(f"{where}.path: {entry.path!r} is not a local file or directory; it will be "
                                f"loaded from the Hugging Face hub")
        return
    data_files = getattr(entry, "data_files", None)
    if path.is_dir() and data_files:
        for name in [data_files] if isinstance(data_files, str) else data_files:
            if not (path / name).exists():
                report.problem(f"{where}.data_files", f"config key '{where}.data_files': {name!r} not found in "
                                                      f"{path}")


# ------------------------------------------------------------------ resume


def check_resume(cfg, report: Preflight, verify_checkpoint: bool) -> None:
    from plait.train.checkpoint import pickle_problem
    from plait.train.manifest import MANIFEST, verify

    value = cfg.resume_from_checkpoint
    if not value:
        return
    path = Path(value)
    key = "resume_from_checkpoint"
    if not path.is_dir():
        report.problem(key, f"config key {key!r}: {value!r} is not a complete Plait checkpoint (no such "
                            f"directory); accepted: a checkpoint-<step> directory from a previous run")
        return
    pickles = pickle_problem(path)
    if pickles:
        report.problem(key, f"config key {key!r}: {pickles}")
        return
    damage = verify(path) if verify_checkpoint else ([] if (path / MANIFEST).is_file() else ["no manifest.json"])
    if damage:
        report.problem(key, f"config key {key!r}: {value!r} is not a complete Plait checkpoint: {'; '.join(damage)}")


# ------------------------------------------------------------------ attention


def check_attention(cfg, report: Preflight) -> None:
    if cfg.flash_attention and importlib.util.find_spec("flash_attn") is None:
        report.problem("flash_attention", "config key 'flash_attention': true needs the flash-attn package, which "
                                          "is not installed (attn_implementation: flash_attention_2); install it, "
                                          "or use attn_implementation: sdpa (or flex_attention) instead",
                       machine=True)


# ------------------------------------------------------------------ output


def check_output_dirs(cfg, report: Preflight) -> None:
    from plait.data.cache import cache_root

    # prepared rows go to dataset_prepared_path, or to prepared/ beside output_dir when it is not set
    prepared_key = "dataset_prepared_path" if cfg.dataset_prepared_path else \
        "dataset_prepared_path (not set: prepared/ beside output_dir)"
    for key, path in (("output_dir", Path(cfg.output_dir)), (prepared_key, cache_root(cfg))):
        problem = writable_dir_problem(path)
        if problem:
            report.problem(key.split(" ")[0], f"config key {key!r}: {str(path)!r} {problem}; accepted: a "
                                              f"directory Plait can create or write to")
    if not any(p.key == "output_dir" for p in report.problems):
        check_room_for_base_model(cfg, report)


def writable_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be (or become) a directory Plait writes to; ``None`` when it can."""
    absolute = Path(os.path.abspath(path.expanduser()))
    resolved = absolute.resolve()
    for root in VIRTUAL_ROOTS:
        if resolved == root or root in resolved.parents:
            return f"is under {root}, a virtual filesystem"
    if absolute.exists() and not absolute.is_dir():
        return "is a file, not a directory"
    existing = absolute
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot be created: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        verb = "is" if existing == absolute else f"cannot be created: {existing} is"
        return f"{verb} not writable (permissions, or a read-only filesystem)"
    return None


def check_room_for_base_model(cfg, report: Preflight) -> None:
    """A full fine-tune of a local model: is there room for one checkpoint?
    (LoRA checkpoints are small; the loop checks every run precisely once the
    trainable parameters are known.)"""
    from plait.train.checkpoint import free_bytes, human_bytes

    if cfg.adapter is not None:
        return
    counted = safetensors_size(Path(cfg.base_model))
    if counted is None:
        return
    weight_bytes, values = counted
    needed = 2 * weight_bytes + 8 * values  # model/ and trainable weights, Adam's two float32 moments
    free = free_bytes(Path(cfg.output_dir))
    if free is not None and free < needed:
        report.problem("output_dir", f"config key 'output_dir': {cfg.output_dir!r} has {human_bytes(free)} free; "
                                     f"a checkpoint of a full fine-tune of {cfg.base_model} needs about "
                                     f"{human_bytes(needed)}; free some space or choose a larger disk")


def safetensors_size(model_dir: Path) -> tuple[int, int] | None:
    """``(bytes, values)`` of a local model's safetensors weights, read from
    the files' headers; ``None`` when it has none (a hub name, a .bin model)."""
    if not model_dir.is_dir():
        return None
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total_bytes, values = 0, 0
    for file in files:
        try:
            with open(file, "rb") as handle:
                header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        except (OSError, ValueError):
            return None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            values += count
            total_bytes += info["data_offsets"][1] - info["data_offsets"][0]
    return total_bytes, values

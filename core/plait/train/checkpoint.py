"""Atomic, verified, pickle-free checkpoints that resume a run bit for bit.

A checkpoint is a directory ``output_dir/checkpoint-<step>/``::

    checkpoint-40/
      model/                          the model as save_model writes it (HF / peft format, usable as is)
      trainable.safetensors           every trainable parameter, by name (what resume loads)
      optimizer.safetensors + .json   optimizer state (full, unsharded, keyed by parameter name);
                                      absent with save_only_model: true
      scheduler.safetensors + .json   learning-rate schedule state
      grad_scaler.safetensors + .json fp16 loss scale (fp16 runs only)
      rng-<rank>.safetensors + .json  python, numpy and torch (CPU and CUDA) generator states, per rank
      trainer_state.json              step, epoch, step within the epoch plan
      batch_plan.json                 the epoch's batch plan identity (packed bins or row order)
      manifest.json                   size and sha256 of every file above, written last

``save_only_model: true`` (Axolotl's and transformers' key) leaves the
optimizer state out: it is the bulk of a checkpoint (two float32 moments per
trained value for AdamW). Such a checkpoint still resumes, from its weights,
schedule position, RNG states and data position, but the optimizer starts
fresh (zero moments): the run says so at resume, and it is not the same run
as an uninterrupted one.

Nothing in a checkpoint is a pickle (:mod:`plait.train.state_io`): loading one
parses tensors and JSON and runs no code. A checkpoint holding a pickle
(``optimizer.pt`` of an older Plait, or a file planted there) is refused.

Resume verifies the manifest (:mod:`plait.train.manifest`). With
``auto_resume_from_checkpoints`` a checkpoint that fails (a truncated or
deleted file, an empty ``trainer_state.json``, a stray ``checkpoint-99/``) is
skipped with the reason, and the newest one that verifies is used; an explicit
``resume_from_checkpoint`` that fails is an error saying what is damaged.

The checkpoint records the identity of the current epoch's batch plan (a
sha256 of every data-parallel rank's micro-batches -- packed bins with
``sample_packing``, the shuffled, length-grouped or in-order rows without --,
the epoch, the step within it and the settings that shape the plan) rather
than the plan itself: resume recomputes the plan from the same deterministic
inputs and refuses (:class:`TrainingError`) when it differs, naming the changed
settings (``group_by_length``, ``curriculum_sampling``, ``seed``, ...), since
skipping ``step_in_epoch`` windows of a different plan would not continue the
same epoch. A checkpoint of an older Plait holds ``packing_plan.json`` (packed
runs only), read the same way.

It is written under ``.checkpoint-<step>.tmp`` and renamed into place once
complete: ``os.rename`` of a directory is atomic on one filesystem, so a kill
in the middle of a save leaves the previous checkpoint as the latest one and a
``.tmp`` directory that the next run removes. A write that fails (a full disk)
removes the ``.tmp`` directory and stops the run with the path and the free
space; the checkpoints before it stay as they were.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

from plait.errors import ConfigError, TrainingError
from plait.train.manifest import MANIFEST, verify, write_manifest
from plait.train.state_io import load_state, save_state

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: files a checkpoint never holds since it stopped using pickles; each one is refused, never loaded
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()


def _state_options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rng_state() -> dict:
    """Every random generator the run draws from (dropout, shuffles in plugins)."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_step(path: Path) -> int:
    """The step of a ``checkpoint-<step>`` directory."""
    return int(CHECKPOINT_RE.match(Path(path).name).group(1))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-<step>`` directories in ``output_dir``, oldest first
    (complete or not: :func:`verify` tells)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints whose save finished (they hold a manifest), oldest first."""
    return [p for p in list_checkpoints(output_dir) if (p / MANIFEST).is_file()]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def remove_partial_saves(output_dir: str | Path) -> list[Path]:
    """Delete ``.tmp`` directories a killed save left behind; the ones removed."""
    output_dir = Path(output_dir)
    removed = []
    if output_dir.is_dir():
        for path in sorted(output_dir.glob(".checkpoint-*.tmp")) + sorted(output_dir.glob(".final-save.tmp")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def pickles_in(path: Path) -> list[str]:
    """Files of the checkpoint at ``path`` that are pickles (by their suffix)."""
    return sorted(p.relative_to(path).as_posix() for p in Path(path).rglob("*")
                  if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def pickle_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` is refused for holding pickles; ``None`` when it holds none."""
    found = pickles_in(path)
    if not found:
        return None
    return (f"checkpoint {path} holds {', '.join(found[:5])}: pickle files, which can run code when loaded; Plait "
            f"writes checkpoints without pickles (safetensors + JSON) and refuses to load one that has them. Resume "
            f"from a checkpoint written by this version of Plait, or move this one away to start over")


def refuse_pickles(path: Path) -> None:
    """A checkpoint holding a pickle is never loaded: unpickling can run any code."""
    problem = pickle_problem(path)
    if problem:
        raise ConfigError(problem)


def free_bytes(path: Path) -> int | None:
    """Free space on the filesystem holding ``path`` (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def human_bytes(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def estimate_checkpoint_bytes(model, only_model: bool = False) -> int:
    """About what one checkpoint of ``model`` takes: the trainable weights twice
    (``trainable.safetensors`` and ``model/``, or every weight for a full
    fine-tune), and two float32 optimizer moments per trainable value (Adam)
    unless ``only_model`` (``save_only_model``)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    frozen = any(not p.requires_grad for p in model.parameters())
    saved_model = trainable_bytes if frozen else sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer_bytes = 0 if only_model else 8 * sum(p.numel() for p in trainable)
    return trainable_bytes + saved_model + optimizer_bytes


def check_room(run) -> None:
    """Refuse to start a run whose first checkpoint (or final save) could not fit on the disk."""
    needed = estimate_checkpoint_bytes(run.model, only_model=bool(run.cfg.save_only_model))
    free = free_bytes(run.output_dir)
    if free is not None and free < needed:
        raise TrainingError(
            f"output_dir {run.output_dir} has {human_bytes(free)} free; one checkpoint of this run needs about "
            f"{human_bytes(needed)} (its trainable weights, their optimizer state and the saved model); free some "
            f"space or set output_dir to a larger disk")


def write_failed(target: Path, exc: OSError, output_dir: Path, what: str = "") -> TrainingError:
    """The message for a save that could not be written, naming the path and the free space."""
    kept = latest_checkpoint(output_dir)
    reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
    last = (f"the last complete checkpoint, {kept}, is intact: free some space and rerun with "
            f"auto_resume_from_checkpoints: true to continue from it" if kept is not None
            else "no earlier checkpoint exists (set save_steps or saves_per_epoch to keep one)")
    return TrainingError(f"could not write {what}{target}: {reason} ({human_bytes(free_bytes(output_dir))} free on "
                         f"{output_dir}); its partial files were removed; {last}")


def _write_model_state(run, tmp: Path) -> None:
    """Trainable weights and (unless ``save_only_model``) optimizer state,
    gathered to full tensors (rank 0 writes)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from plait.train.lisa import checkpoint_view

    options = _state_options(cpu_offload=True, ignore_frozen_params=True)
    with checkpoint_view(run):  # LISA: the layers frozen this period are trained weights too
        weights = get_model_state_dict(run.model, options=options)
        optimizer = None if run.cfg.save_only_model else get_optimizer_state_dict(run.model, run.optimizer,
                                                                                  options=options)
    if run.is_main:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
        if optimizer is not None:
            save_state(optimizer, tmp, "optimizer")
        save_state(run.scheduler.state_dict(), tmp, "scheduler")
        if run.grad_scaler is not None:  # fp16: the loss scale is part of the state
            save_state(run.grad_scaler.state_dict(), tmp, "grad_scaler")


def save_checkpoint(run) -> Path:
    """Write ``checkpoint-<run.step>`` atomically, then prune to ``save_total_limit``.

    A failed write (``OSError``: a full disk, a quota) removes the partial
    ``.tmp`` directory and raises :class:`TrainingError` naming it and the free space.
    """
    output_dir = Path(run.output_dir)
    final = output_dir / f"checkpoint-{run.step}"
    tmp = output_dir / f".checkpoint-{run.step}.tmp"
    try:
        if run.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        save_state(rng_state(), tmp, f"rng-{run.rank}")
        _write_model_state(run, tmp)
        # every rank: save_model gathers sharded weights collectively
        run.pm.hook.save_model(cfg=run.cfg, model=run.model, tokenizer=run.tokenizer, path=str(tmp / "model"))
        if run.is_main:
            state = {**run.position(), "optimizer_state": not run.cfg.save_only_model}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            (tmp / PLAN_FILE).write_text(json.dumps(plan_identity(run), indent=2))
        barrier()
        if run.is_main:
            write_manifest(tmp)  # last: its presence marks a finished save
            if final.exists():  # a rerun reaching the same step: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(final, exc, output_dir) from exc
    if run.is_main:
        keep = None
        if run.cfg.load_best_model_at_end:  # the checkpoint it will load stays, as transformers keeps it
            from plait.train.best import best_checkpoint

            best = best_checkpoint(output_dir)
            keep = best[0] if best is not None else None
        prune(output_dir, run.cfg.save_total_limit, keep=keep)
    barrier()
    return final


def prune(output_dir: Path, limit: int | None, keep: Path | None = None) -> None:
    """Keep the newest ``limit`` complete checkpoints, and ``keep`` (a stray
    directory never counts as one, so it cannot push a good checkpoint out)."""
    if not limit:
        return
    for old in complete_checkpoints(output_dir)[:-limit]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def resume_path(cfg, say=_say) -> Path | None:
    """The checkpoint to resume from, verified against its manifest.

    ``resume_from_checkpoint`` must verify (an error says what is damaged and
    names the newest checkpoint beside it that does). With
    ``auto_resume_from_checkpoints`` the newest checkpoint in ``output_dir``
    that verifies is used; each newer one that does not is skipped, and
    ``say`` is told which and why. A checkpoint holding a pickle is refused
    either way (:func:`refuse_pickles`).
    """
    if cfg.resume_from_checkpoint:
        path = Path(cfg.resume_from_checkpoint)
        if not path.is_dir() or not any(path.iterdir()):
            raise ConfigError(
                f"config key 'resume_from_checkpoint': {str(path)!r} is not a complete Plait checkpoint "
                f"({'no such directory' if not path.is_dir() else 'an empty directory'}); accepted: a "
                f"checkpoint-<step> directory from a previous run")
        refuse_pickles(path)
        problems = verify(path)
        if problems:
            good = next((p for p in reversed(complete_checkpoints(path.parent)) if p != path and not verify(p)), None)
            hint = f"; {good} verifies: resume from it instead" if good else ""
            raise ConfigError(f"config key 'resume_from_checkpoint': {str(path)!r} is not a complete Plait "
                              f"checkpoint: {'; '.join(problems)}{hint}")
        return path
    if not cfg.auto_resume_from_checkpoints:
        return None
    for path in reversed(list_checkpoints(cfg.output_dir)):
        refuse_pickles(path)
        problems = verify(path)
        if not problems:
            return path
        say(f"warning: skipping {path}: {'; '.join(problems)}")
    return None


def load_weights(run, path: Path) -> None:
    """Put a checkpoint's trained weights into ``run.model`` (every rank: sharded
    weights take their shard); nothing else of the run changes."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    from plait.train.lisa import checkpoint_view

    weights = load_file(str(path / "trainable.safetensors"))
    with checkpoint_view(run):
        result = set_model_state_dict(run.model, weights, options=_state_options(strict=False))
    if result.unexpected_keys:
        raise ConfigError(f"checkpoint {path} holds weights this model does not have (was it saved with other "
                          f"adapter/model keys?): {sorted(result.unexpected_keys)[:5]}")


def load_checkpoint(run, path: Path) -> dict:
    """Restore weights, optimizer (when the checkpoint has it), scheduler and
    this rank's RNGs; return the position (``step``, ``epoch``,
    ``step_in_epoch``) and ``optimizer_state``: whether the optimizer was restored."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    from plait.train.lisa import checkpoint_view

    refuse_pickles(path)  # again: resume_path may have been skipped by a caller
    load_weights(run, path)
    position = json.loads((path / "trainer_state.json").read_text())
    # a verified checkpoint without optimizer files was saved so on purpose (save_only_model): the manifest lists
    # every file a save wrote, so a lost optimizer file fails verification instead of landing here
    position["optimizer_state"] = (path / "optimizer.json").exists()
    if position["optimizer_state"]:
        saved_optimizer = load_state(path, "optimizer")
        lisa = run.lisa is not None
        # LISA: a layer no period has chosen yet has no optimizer state (nor had it in the run this continues)
        with checkpoint_view(run):
            set_optimizer_state_dict(run.model, run.optimizer, saved_optimizer,
                                     options=_state_options(strict=not lisa))
        if lisa:
            from plait.train.lisa import forget_unsaved_state

            forget_unsaved_state(run.model, run.optimizer, saved_optimizer)
    run.scheduler.load_state_dict(load_state(path, "scheduler"))
    if run.grad_scaler is not None and (path / "grad_scaler.json").exists():
        run.grad_scaler.load_state_dict(load_state(path, "grad_scaler"))
    if (path / f"rng-{run.rank}.json").exists():
        set_rng_state(load_state(path, f"rng-{run.rank}"))
    check_batch_plan(run, path, position)
    return position


#: the file holding the epoch plan's identity; older checkpoints: LEGACY_PLAN_FILE, packed runs only
PLAN_FILE = "batch_plan.json"
LEGACY_PLAN_FILE = "packing_plan.json"

#: the settings that shape an epoch's batch plan (plait.data.batching.plan_batches), named when it changed
ORDER_KEYS = ("sample_packing", "sequence_len", "micro_batch_size", "sample_packing_bin_size", "seed",
              "curriculum_sampling", "group_by_length", "gradient_accumulation_steps", "dataloader_drop_last",
              "sample_packing_sequentially")


def plan_identity(run, epoch: int | None = None, step_in_epoch: int | None = None) -> dict:
    """What identifies an epoch's batch plan: a hash of every data-parallel
    rank's micro-batches (the same on every rank, so rank 0's file serves all)
    and the settings that shape them."""
    epoch = run.epoch if epoch is None else epoch
    return {"epoch": epoch, "step_in_epoch": run.step_in_epoch if step_in_epoch is None else step_in_epoch,
            "plan_sha256": plan_digest(run, epoch), "rows": len(run.train_lengths), "data_parallel_ranks": run.dp_size,
            "settings": {key: getattr(run.cfg, key, None) for key in ORDER_KEYS}}


def plan_digest(run, epoch: int) -> str:
    """sha256 of every data-parallel rank's batch plan for ``epoch``. Planning
    all ranks is the costly part, and the plan is fixed for an epoch, so a
    run (``run.packing_plan_digest``) computes it once per epoch, not at every save."""
    import hashlib

    from plait.data.batching import plan_batches

    key = (epoch, run.dp_size, len(run.train_lengths))
    cached = getattr(run, "packing_plan_digest", None)  # a bare namespace (tests) has no cache: plan again
    if cached is not None and cached[0] == key:
        return cached[1]
    plans = [plan_batches(run.cfg, run.train_lengths, epoch, rank, run.dp_size) for rank in range(run.dp_size)]
    digest = hashlib.sha256(json.dumps(plans, separators=(",", ":")).encode()).hexdigest()
    run.packing_plan_digest = (key, digest)
    return digest


def check_batch_plan(run, path: Path, position: dict) -> None:
    """Refuse to resume mid-epoch when the epoch's batch plan would differ from the checkpoint's."""
    stored_file = next((path / name for name in (PLAN_FILE, LEGACY_PLAN_FILE) if (path / name).is_file()), None)
    if stored_file is None:
        # an older Plait's checkpoint: only packed runs recorded their plan
        if run.cfg.sample_packing and position.get("step_in_epoch"):
            raise TrainingError(f"checkpoint {path} was saved without sample_packing; resuming with "
                                f"sample_packing: true would not continue the same epoch (set sample_packing: false)")
        return
    if not position.get("step_in_epoch"):
        return  # saved at an epoch boundary: the next epoch is planned afresh either way
    stored = json.loads(stored_file.read_text())
    was_packed = stored["settings"].get("sample_packing", stored_file.name == LEGACY_PLAN_FILE)
    if bool(was_packed) != bool(run.cfg.sample_packing):
        raise TrainingError(f"checkpoint {path} was saved with sample_packing: {str(bool(was_packed)).lower()}; "
                            f"resuming with sample_packing: {str(bool(run.cfg.sample_packing)).lower()} would not "
                            f"continue the same epoch (set sample_packing: {str(bool(was_packed)).lower()})")
    now = plan_identity(run, position["epoch"], position["step_in_epoch"])
    if now["plan_sha256"] == stored["plan_sha256"]:
        return
    # a key an older checkpoint did not record is not named (its value then is unknown)
    changed = [f"{key}: {stored['settings'][key]!r} -> {now['settings'].get(key)!r}"
               for key in ORDER_KEYS if key in stored["settings"] and stored["settings"][key] != now["settings"].get(key)]
    if stored.get("rows") != now["rows"]:
        changed.append(f"training rows: {stored.get('rows')} -> {now['rows']}")
    if stored.get("data_parallel_ranks", now["data_parallel_ranks"]) != now["data_parallel_ranks"]:
        changed.append(f"data-parallel ranks: {stored['data_parallel_ranks']} -> {now['data_parallel_ranks']}")
    plan = "sample packing plan" if run.cfg.sample_packing else "order of the training rows"
    raise TrainingError(
        f"checkpoint {path}: the {plan} of epoch {position['epoch']} differs from the one the run was "
        f"trained with, so resuming at step {position['step_in_epoch']} of that epoch would not continue the same "
        f"epoch; changed: {'; '.join(changed) or 'the training data (row lengths)'}; restore them or start a new "
        f"output_dir")

"""Atomic checkpoints that resume a run bit for bit.

A checkpoint is a directory ``output_dir/checkpoint-<step>/``::

    checkpoint-40/
      model/                  the model as save_model writes it (HF / peft format, usable as is)
      trainable.safetensors   every trainable parameter, by name (what resume loads)
      optimizer.pt            optimizer state (full, unsharded, keyed by parameter name)
      scheduler.pt            learning-rate schedule state
      grad_scaler.pt          fp16 loss scale (fp16 runs only)
      rng-<rank>.pt           python, numpy and torch (CPU and CUDA) generator states, per rank
      trainer_state.json      step, epoch, step within the epoch plan
      packing_plan.json       sample_packing runs only: the epoch plan's identity

With ``sample_packing`` the checkpoint records the identity of the current
epoch's packing plan (a sha256 of every data-parallel rank's bins, the epoch,
the step within it and the packing settings) rather than the plan itself: resume recomputes the plan
from the same deterministic inputs and refuses (:class:`TrainingError`) when
it differs, naming the changed settings, since skipping ``step_in_epoch``
windows of a different plan would not continue the same epoch.

It is written under ``.checkpoint-<step>.tmp`` and renamed into place once
complete: ``os.rename`` of a directory is atomic on one filesystem, so a kill
in the middle of a save leaves the previous checkpoint as the latest one and a
``.tmp`` directory that the next run removes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

from plait.errors import ConfigError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def _state_options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


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


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def remove_partial_saves(output_dir: str | Path) -> None:
    """Delete ``.tmp`` directories a killed save left behind."""
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        for path in output_dir.glob(".checkpoint-*.tmp"):
            shutil.rmtree(path, ignore_errors=True)


def _write_model_state(run, tmp: Path) -> None:
    """Trainable weights and optimizer state, gathered to full tensors (rank 0 writes)."""
    import torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _state_options(cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(run.model, options=options)
    optimizer = get_optimizer_state_dict(run.model, run.optimizer, options=options)
    if run.is_main:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(run.scheduler.state_dict(), tmp / "scheduler.pt")
        if "grad_scaler" in run.extras:  # fp16: the loss scale is part of the state
            torch.save(run.extras["grad_scaler"].state_dict(), tmp / "grad_scaler.pt")


def save_checkpoint(run) -> Path:
    """Write ``checkpoint-<run.step>`` atomically, then prune to ``save_total_limit``."""
    import torch

    output_dir = Path(run.output_dir)
    final = output_dir / f"checkpoint-{run.step}"
    tmp = output_dir / f".checkpoint-{run.step}.tmp"
    if run.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save(rng_state(), tmp / f"rng-{run.rank}.pt")
    _write_model_state(run, tmp)
    # every rank: save_model gathers sharded weights collectively
    run.pm.hook.save_model(cfg=run.cfg, model=run.model, tokenizer=run.tokenizer, path=str(tmp / "model"))
    if run.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps(run.position(), indent=2))
        if run.cfg.sample_packing:
            (tmp / "packing_plan.json").write_text(json.dumps(packing_identity(run), indent=2))
    _barrier()
    if run.is_main:
        if final.exists():  # a rerun reaching the same step: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        prune(output_dir, run.cfg.save_total_limit)
    _barrier()
    return final


def prune(output_dir: Path, limit: int | None) -> None:
    """Keep the newest ``limit`` checkpoints."""
    if not limit:
        return
    for old in list_checkpoints(output_dir)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


def resume_path(cfg) -> Path | None:
    """The checkpoint to resume from: ``resume_from_checkpoint``, or with
    ``auto_resume_from_checkpoints`` the newest one in ``output_dir``."""
    if cfg.resume_from_checkpoint:
        path = Path(cfg.resume_from_checkpoint)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(
                f"config key 'resume_from_checkpoint': {str(path)!r} is not a complete Plait checkpoint "
                f"(no trainer_state.json); accepted: a checkpoint-<step> directory from a previous run"
            )
        return path
    if cfg.auto_resume_from_checkpoints:
        return latest_checkpoint(cfg.output_dir)
    return None


def load_checkpoint(run, path: Path) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNGs; return the
    position (``step``, ``epoch``, ``step_in_epoch``)."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    weights = load_file(str(path / "trainable.safetensors"))
    result = set_model_state_dict(run.model, weights, options=_state_options(strict=False))
    if result.unexpected_keys:
        raise ConfigError(f"checkpoint {path} holds weights this model does not have (was it saved with other "
                          f"adapter/model keys?): {sorted(result.unexpected_keys)[:5]}")
    optimizer = torch.load(path / "optimizer.pt", weights_only=False)
    set_optimizer_state_dict(run.model, run.optimizer, optimizer, options=_state_options())
    run.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if "grad_scaler" in run.extras and (path / "grad_scaler.pt").exists():
        run.extras["grad_scaler"].load_state_dict(torch.load(path / "grad_scaler.pt", weights_only=False))
    rng_file = path / f"rng-{run.rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    position = json.loads((path / "trainer_state.json").read_text())
    check_packing_plan(run, path, position)
    return position


PACKING_KEYS = ("sample_packing", "sequence_len", "micro_batch_size", "sample_packing_bin_size", "seed")


def packing_identity(run, epoch: int | None = None, step_in_epoch: int | None = None) -> dict:
    """What identifies an epoch's packing plan: a hash of every data-parallel
    rank's bins (the same on every rank, so rank 0's file serves all) and the
    settings that shape them."""
    epoch = run.epoch if epoch is None else epoch
    return {"epoch": epoch, "step_in_epoch": run.step_in_epoch if step_in_epoch is None else step_in_epoch,
            "plan_sha256": plan_digest(run, epoch), "rows": len(run.train_lengths), "data_parallel_ranks": run.dp_size,
            "settings": {key: getattr(run.cfg, key, None) for key in PACKING_KEYS}}


def plan_digest(run, epoch: int) -> str:
    """sha256 of every data-parallel rank's packing plan for ``epoch``. Planning
    all ranks is the costly part, and the plan is fixed for an epoch, so a
    run (``run.extras``) computes it once per epoch, not at every save."""
    import hashlib

    from plait.data.batching import plan_batches

    extras = getattr(run, "extras", None)
    key = (epoch, run.dp_size, len(run.train_lengths))
    if extras is not None and extras.get("packing_plan_digest", (None,))[0] == key:
        return extras["packing_plan_digest"][1]
    plans = [plan_batches(run.cfg, run.train_lengths, epoch, rank, run.dp_size) for rank in range(run.dp_size)]
    digest = hashlib.sha256(json.dumps(plans, separators=(",", ":")).encode()).hexdigest()
    if extras is not None:
        extras["packing_plan_digest"] = (key, digest)
    return digest


def check_packing_plan(run, path: Path, position: dict) -> None:
    """Refuse to resume a packed run whose epoch plan would differ from the checkpoint's."""
    from plait.errors import TrainingError

    stored_file = path / "packing_plan.json"
    if not stored_file.is_file():
        if run.cfg.sample_packing and position.get("step_in_epoch"):
            raise TrainingError(f"checkpoint {path} was saved without sample_packing; resuming with "
                                f"sample_packing: true would not continue the same epoch (set sample_packing: false)")
        return
    if not position.get("step_in_epoch"):
        return  # saved at an epoch boundary: the next epoch is planned afresh either way
    stored = json.loads(stored_file.read_text())
    if not run.cfg.sample_packing:
        raise TrainingError(f"checkpoint {path} was saved with sample_packing: true; resuming with "
                            f"sample_packing: false would not continue the same epoch")
    now = packing_identity(run, position["epoch"], position["step_in_epoch"])
    if now["plan_sha256"] == stored["plan_sha256"]:
        return
    changed = [f"{key}: {stored['settings'].get(key)!r} -> {now['settings'].get(key)!r}"
               for key in PACKING_KEYS if stored["settings"].get(key) != now["settings"].get(key)]
    if stored.get("rows") != now["rows"]:
        changed.append(f"training rows: {stored.get('rows')} -> {now['rows']}")
    if stored.get("data_parallel_ranks", now["data_parallel_ranks"]) != now["data_parallel_ranks"]:
        changed.append(f"data-parallel ranks: {stored['data_parallel_ranks']} -> {now['data_parallel_ranks']}")
    raise TrainingError(
        f"checkpoint {path}: the sample packing plan of epoch {position['epoch']} differs from the one the run was "
        f"trained with, so resuming at step {position['step_in_epoch']} of that epoch would not continue the same "
        f"epoch; changed: {'; '.join(changed) or 'the training data (row lengths)'}; restore them or start a new "
        f"output_dir")

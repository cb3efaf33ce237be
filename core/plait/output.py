"""What a run leaves in ``output_dir`` besides checkpoints.

::

    output_dir/
      config.resolved.yaml   every key, its value and (in a comment) where it came from
      environment.json       versions of python/torch/transformers/peft/..., devices, plugins
      metrics.jsonl          one JSON line per logged step and per evaluation
      loss.png               train and eval loss curves
      adapter_model.safetensors + adapter_config.json   (LoRA)  or  model.safetensors (full)
      tokenizer files, chat template included

Only the main rank calls these.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import sys
from pathlib import Path


def write_resolved_config(cfg, output_dir: Path) -> Path:
    """The validated config as YAML, each key preceded by ``# source: ...``.

    The file is itself a valid config (comments aside) to rerun the same thing.
    """
    import yaml

    from plait.config import explain

    lines = []
    for key, value, source in explain(cfg):
        lines.append(f"# source: {source}")
        lines.append(yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False).rstrip())
    path = output_dir / "config.resolved.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(pm=None, world_size: int = 1) -> dict:
    """Versions and devices, so a result can be traced to what produced it."""
    import torch

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {d: _version(d) for d in ("plait", "torch", "transformers", "peft", "datasets", "accelerate",
                                              "bitsandbytes", "liger-kernel", "triton", "flash-attn")},
        "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"],
        "cpu_count": __import__("os").cpu_count(),
        "world_size": world_size,
    }
    if pm is not None:
        env["plugins"] = [{"name": p.name, "distribution": p.distribution, "version": p.version, "source": p.source}
                          for p in pm.list_plugins()]
    return env


def write_environment(output_dir: Path, pm=None, world_size: int = 1) -> Path:
    path = output_dir / "environment.json"
    path.write_text(json.dumps(environment(pm, world_size), indent=2))
    return path


class MetricsLog:
    """``metrics.jsonl``: appended line by line so a killed run keeps its history.

    On resume, lines past the resumed step are dropped (the resumed run logs
    them again), so the file reads as one uninterrupted run. ``name``: another
    file of step-stamped records (``eval_predictions.jsonl``).
    """

    def __init__(self, output_dir: Path, resume_step: int | None = None, name: str = "metrics.jsonl"):
        self.path = Path(output_dir) / name
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        return read_records(self.path)


def read_records(path: Path) -> list[dict]:
    """The records of a step-stamped JSON-lines file (``metrics.jsonl``); none when it is absent."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict], path: Path) -> Path | None:
    """Train loss per step and eval loss per evaluation, as a PNG (matplotlib Agg).

    matplotlib is optional (``pip install 'plait[plot]'``): without it the plot
    is skipped with a note, and the numbers are in ``metrics.jsonl`` anyway.
    """
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    try:
        import matplotlib
    except ImportError:
        logging.getLogger("plait.output").info(
            "%s skipped: matplotlib is not installed (pip install 'plait[plot]'); the losses are in "
            "metrics.jsonl", path.name)
        return None

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


FINAL_TMP = ".final-save.tmp"


def save_final(run) -> str:
    """Save the trained model and tokenizer into ``output_dir`` through ``save_model``.

    Every rank calls it (sharded weights are gathered collectively). The files
    are written under ``output_dir/.final-save.tmp`` and moved into
    ``output_dir`` once all are there, so a save that fails (a full disk)
    leaves no half-written model beside the checkpoints: the partial files are
    removed and the error names the path, the free space and the last
    checkpoint, which the failed save never touched.
    """
    import os
    import shutil

    from plait.plugins import call_required
    from plait.train.checkpoint import barrier, write_failed

    output_dir = Path(run.output_dir)
    tmp = output_dir / FINAL_TMP
    try:
        if run.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        call_required(run.pm, "save_model", cfg=run.cfg, model=run.model, tokenizer=run.tokenizer, path=str(tmp))
        barrier()
        if run.is_main:
            for entry in sorted(tmp.iterdir()):
                target = output_dir / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(entry, target)
            tmp.rmdir()
    except OSError as exc:
        if run.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(output_dir, exc, output_dir, what="the final model to ") from exc
    return str(output_dir)


def write_report(run) -> Path:
    """``report.json``: the run's outcome in a few numbers."""
    records = run.metrics_log.read()
    train = [r for r in records if "loss" in r]
    report = {
        "steps": run.step,
        "total_steps": run.total_steps,
        "epochs": run.epoch + run.step_in_epoch / max(run.steps_per_epoch, 1),
        "first_loss": train[0]["loss"] if train else None,
        "final_loss": train[-1]["loss"] if train else None,
        "trained_tokens": sum(r.get("tokens", 0) for r in train),
        # eval_loss, eval_ppl where the objective has one, and the objective's own (eval_rewards/margins, ...)
        **{k: v for k, v in run.last_eval.items() if k in ("eval_loss", "eval_ppl") or "/" in k},
    }
    path = Path(run.output_dir) / "report.json"
    path.write_text(json.dumps(report, indent=2))
    return path

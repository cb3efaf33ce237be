"""``load_best_model_at_end``: which checkpoint had the best evaluation, kept
from ``save_total_limit``'s pruning and loaded before the final save.

The best is the lowest ``eval_loss`` (``metric_for_best_model``) among the
complete checkpoints in ``output_dir`` whose step was evaluated, read from
``metrics.jsonl`` on disk, so a resumed run and every rank find the same one;
of equal losses the earliest, as transformers keeps the first best.
"""

from __future__ import annotations

from pathlib import Path


def evaluated_checkpoints(output_dir: Path) -> dict[Path, float]:
    """Each complete checkpoint whose step has an ``eval_loss`` in ``metrics.jsonl``,
    with it, oldest first."""
    from plait.output import read_records
    from plait.train.checkpoint import checkpoint_step, complete_checkpoints

    records = read_records(Path(output_dir) / "metrics.jsonl")
    losses = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r and "step" in r}
    return {path: losses[checkpoint_step(path)] for path in complete_checkpoints(output_dir)
            if checkpoint_step(path) in losses}


def best_checkpoint(output_dir: Path) -> tuple[Path, float] | None:
    """``(checkpoint, eval_loss)`` of the best evaluated checkpoint, or ``None``."""
    scored = evaluated_checkpoints(output_dir)
    if not scored:
        return None
    path = min(scored, key=scored.get)  # oldest first: of equal losses, the earliest
    return path, scored[path]


def check_schedule(cfg, eval_every, save_every) -> None:
    """Before the first step: every checkpoint must come with an evaluation
    (transformers' rule), else the best one could be any of the unevaluated."""
    from plait.errors import ConfigError

    if cfg.save_strategy == "best" or not (eval_every and save_every) or save_every % eval_every == 0:
        return
    raise ConfigError(f"config key 'load_best_model_at_end': true needs an evaluation at every checkpoint; this run "
                      f"saves every {save_every} steps and evaluates every {eval_every}; make the save interval a "
                      f"multiple of the eval interval (save_steps / saves_per_epoch against eval_steps / "
                      f"evals_per_epoch), or use save_strategy: best")

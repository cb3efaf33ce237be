"""``auto_find_batch_size: true``: a run that runs out of GPU memory starts again
with a smaller micro-batch.

As in the Hugging Face Trainer (Axolotl passes the key on to it), the run is
started afresh each time. Unlike it, the rows each optimizer step trains stay
the same: the micro-batch goes down to its largest proper divisor (8 -> 4,
6 -> 3, 5 -> 1) and ``gradient_accumulation_steps`` goes up by the same
factor, so the learning-rate schedule and the trained rows do not change.
Below one row a micro-batch there is nothing left to try, and the error stands.

One process only: under a multi-process launch one rank's out-of-memory error
would leave the others waiting in a collective.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("plait.train")


def smaller_micro_batch(size: int) -> int | None:
    """The largest proper divisor of ``size``; ``None`` at 1."""
    return next((d for d in range(size // 2, 0, -1) if size % d == 0), None)


def train_finding_batch_size(cfg, pm, *, data=None):
    """``train(cfg, pm)``, started again with a smaller micro-batch after each
    out-of-memory error while ``auto_find_batch_size`` is on."""
    import torch

    from plait.train.loop import train

    while True:
        try:
            return train(cfg, pm, data=data)
        except torch.OutOfMemoryError as exc:
            smaller = smaller_micro_batch(cfg.micro_batch_size) if cfg.auto_find_batch_size else None
            if smaller is None:
                raise
            reason = " ".join(str(exc).split())[:200]
        # out of the except block: the failed attempt's frames (its model and optimizer) are released
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        factor = cfg.micro_batch_size // smaller
        log.warning("auto_find_batch_size: out of memory with micro_batch_size %d (%s); starting again with %d and "
                    "gradient_accumulation_steps %d, the same rows a step", cfg.micro_batch_size, reason, smaller,
                    cfg.gradient_accumulation_steps * factor)
        cfg.set_by_plugin("gradient_accumulation_steps", cfg.gradient_accumulation_steps * factor,
                          "auto_find_batch_size")
        cfg.set_by_plugin("micro_batch_size", smaller, "auto_find_batch_size")

"""The progress bar: step, loss, learning rate, tokens/s and the ETA (tqdm)."""

from __future__ import annotations

import sys


class Progress:
    """A tqdm bar on the main rank; a no-op elsewhere."""

    def __init__(self, run):
        self.bar = None
        if run.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

    def update(self, metrics: dict) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix_str(
            f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} {metrics['tokens_per_s']:.0f} tok/s", refresh=False
        )
        self.bar.update(1)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

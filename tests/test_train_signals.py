"""SIGUSR1/SIGTERM (what a scheduler sends before preempting) save a checkpoint and stop, in process.

The end-to-end test, a real SIGTERM to a ``plait train`` subprocess whose
rerun is bit-identical to an uninterrupted run, is in ``test_train_resume.py``
(it shares that module's reference run).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from plait import hookimpl
from plait.testing import build_run_config

# reuse the checkpoint tests' run (pytest's importlib mode does not put tests/ on sys.path)
sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint_safety import KEYS, rows  # noqa: E402

class SignalAtStep:
    """Sends this process ``signum`` during step ``step`` (from an event hook, as a scheduler would from outside)."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step

    @hookimpl
    def on_step_end(self, run, metrics):
        if metrics["step"] == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.slow
def test_sigusr1_saves_at_the_step_boundary_and_stops(tmp_path):
    from plait.testing import make_tiny_model
    from plait.train.loop import train
    from plait.train.signals import TrainingStopped

    model = make_tiny_model(tmp_path / "model")
    keys = {**KEYS, "base_model": str(model), "output_dir": str(tmp_path / "run"), "save_steps": None}
    cfg, pm = build_run_config(keys, plugins=[SignalAtStep(signal.SIGUSR1, 2)])
    previous = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(TrainingStopped, match=r"received SIGUSR1: stopped after step 2 of 3 and saved") as caught:
        train(cfg, pm, data=rows())
    assert caught.value.exit_code == 128 + signal.SIGUSR1
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]
    assert signal.getsignal(signal.SIGUSR1) is previous  # the run's handler is gone with the run

    # save_on_signals: [] leaves the signal alone: the run's own handler does not catch it
    caught_here = []
    signal.signal(signal.SIGUSR1, lambda *_: caught_here.append(True))
    try:
        cfg, pm = build_run_config({**keys, "output_dir": str(tmp_path / "off"), "save_on_signals": []},
                                   plugins=[SignalAtStep(signal.SIGUSR1, 2)])
        assert train(cfg, pm, data=rows()).step == 3
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert caught_here == [True] and not list((tmp_path / "off").glob("checkpoint-*"))

"""SIGTERM (what a scheduler sends before preempting) saves a checkpoint and stops; the rerun resumes.

The end-to-end test sends a real SIGTERM to a ``plait train`` subprocess (the
setup of ``test_train_resume.py``: its uninterrupted reference run is the
comparison) and reruns it: the final weights are bit-identical.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from plait import hookimpl
from plait.testing import build_run_config

# reuse the resume tests' setup (pytest's importlib mode does not put tests/ on sys.path)
sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint_safety import KEYS, rows  # noqa: E402
from test_train_resume import MAX_STEPS, assert_same_as_reference, plait_train, setup  # noqa: E402,F401

# each step sleeps a little so the signal lands mid-run on a fast machine too
SLOW_STEPS = """
import sys, time
import plait.train.loop as loop
step = loop.train_step
def slow_step(*args, **kwargs):
    time.sleep(0.3)
    return step(*args, **kwargs)
loop.train_step = slow_step
from plait.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes_bit_identical(setup):
    root, config = setup
    cfg = config("terminated", auto_resume_from_checkpoints=True)
    out = root / "terminated"
    process = plait_train(cfg, wait=False, prelude=SLOW_STEPS)
    deadline = time.time() + 240
    metrics = out / "metrics.jsonl"
    # after step 3 (not a save step: save_steps is 2), so the checkpoint is the signal's own
    while process.poll() is None and time.time() < deadline and \
            not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped = [line for line in err.splitlines() if "received SIGTERM" in line]
    assert stopped, err[-3000:]
    step = int(stopped[0].split("stopped after step ")[1].split()[0])
    assert 3 <= step < MAX_STEPS
    assert f"of {MAX_STEPS} and saved {out / f'checkpoint-{step}'}" in stopped[0]
    assert "auto_resume_from_checkpoints: true" in stopped[0]
    assert (out / f"checkpoint-{step}" / "manifest.json").is_file()
    assert not (out / "model.safetensors").exists()

    resumed = plait_train(cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / f'checkpoint-{step}'} at step {step}" in resumed.stderr
    assert_same_as_reference(root, "terminated")


class SignalAtStep:
    """Sends this process ``signum`` during step ``step`` (from an event hook, as a scheduler would from outside)."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step

    @hookimpl
    def on_step_end(self, run, metrics):
        if metrics["step"] == self.step:
            os.kill(os.getpid(), self.signum)


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

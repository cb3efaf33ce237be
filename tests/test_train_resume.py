"""Kill a real ``plait train`` process and resume it: the result is bit-identical.

Every run here is ``python -m plait.cli train`` in a subprocess on an alpaca
jsonl file, a tiny Llama with attention dropout (so the torch RNG matters) and
several epochs (so the data order across an epoch boundary matters).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from plait.testing import make_tiny_model, write_config, write_jsonl

pytestmark = pytest.mark.slow

MAX_STEPS = 10  # 16 rows / micro_batch_size 4 = 4 steps per epoch: the run crosses two epoch boundaries


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from plait.quickstart import make_split

    root = tmp_path_factory.mktemp("resume")
    model = make_tiny_model(root / "model", attention_dropout=0.1)
    train_rows, _ = make_split(16, 4)
    data = write_jsonl(root / "train.jsonl", train_rows)

    def config(name: str, **extra) -> Path:
        return write_config(root / f"{name}.yml", base_model=str(model),
                            datasets=[{"path": str(data), "type": "alpaca"}], dataset_prepared_path=str(root / "prepared"), sequence_len=256, micro_batch_size=4,
                            max_steps=MAX_STEPS, learning_rate=1e-3, warmup_steps=2, save_steps=2,
                            output_dir=str(root / name), **extra)

    reference = config("reference")
    result = plait_train(reference)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, config


def plait_train(config: Path, *extra, wait: bool = True, prelude: str | None = None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if prelude is None:
        cmd = [sys.executable, "-m", "plait.cli", "train", str(config), *extra]
    else:
        cmd = [sys.executable, "-c", prelude, "train", str(config), *extra]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def final_weights(output_dir: Path) -> tuple[bytes, dict]:
    from safetensors.torch import load_file

    path = output_dir / "model.safetensors"
    return path.read_bytes(), load_file(str(path))


def assert_same_as_reference(root: Path, name: str) -> None:
    ref_bytes, ref = final_weights(root / "reference")
    got_bytes, got = final_weights(root / name)
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), f"{key} differs after resume"
    assert ref_bytes == got_bytes
    # the metrics read as one uninterrupted run, with the same losses
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}  # noqa: E731
                       for line in p.read_text().splitlines()]
    assert strip(root / name / "metrics.jsonl") == strip(root / "reference" / "metrics.jsonl")


def sigkill_once_written(process, path: Path) -> None:
    """SIGKILL the ``plait train`` subprocess as soon as ``path`` exists."""
    deadline = time.time() + 240
    while not path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def test_sigkill_then_resume_is_bit_identical(setup):
    root, config = setup
    cfg = config("killed", auto_resume_from_checkpoints=True)
    sigkill_once_written(plait_train(cfg, wait=False), root / "killed" / "checkpoint-2")
    assert not (root / "killed" / "model.safetensors").exists()
    checkpoints = sorted(p.name for p in (root / "killed").glob("checkpoint-*"))
    assert checkpoints

    resumed = plait_train(cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {root / 'killed' / checkpoints[-1]}" in resumed.stderr.replace(str(root.resolve()), str(root))
    assert_same_as_reference(root, "killed")


KILL_DURING_SAVE = """
import os, signal, sys
import plait.train.checkpoint as checkpoint
write = checkpoint._write_model_state
def write_then_die(run, tmp):
    write(run, tmp)
    if run.step == 6:  # mid-epoch; weights and optimizer written, the rest not: the save is half done
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint._write_model_state = write_then_die
from plait.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_save_keeps_the_last_complete_checkpoint(setup):
    root, config = setup
    cfg = config("killed_saving", save_total_limit=1)
    died = plait_train(cfg, prelude=KILL_DURING_SAVE)
    assert died.returncode == -signal.SIGKILL
    out = root / "killed_saving"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # save_total_limit: 1
    assert (out / ".checkpoint-6.tmp").is_dir()  # the half-written save, never renamed into place
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    # end of epoch 0, with the optimizer state saved beside it (save_only_model is off)
    assert state == {"step": 4, "epoch": 0, "step_in_epoch": 4, "total_steps": MAX_STEPS, "optimizer_state": True}

    resumed = plait_train(cfg, f"resume_from_checkpoint={out / 'checkpoint-4'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (out / ".checkpoint-6.tmp").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10"]
    assert_same_as_reference(root, "killed_saving")


def test_resume_from_a_missing_checkpoint_is_a_config_error(setup):
    from plait.testing import run_cli

    root, config = setup
    result = run_cli(["train", str(config("bad_resume")), f"resume_from_checkpoint={root / 'nowhere'}"])
    assert result.exit_code == 2
    assert "resume_from_checkpoint" in result.stderr and "is not a complete Plait checkpoint" in result.stderr


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

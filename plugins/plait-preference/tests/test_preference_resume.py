"""SIGKILL a DPO run and resume it: bit-identical to the uninterrupted run.

Full fine-tuning, so the resumed run must rebuild the frozen reference from
the *starting* weights, not from the checkpoint (or, with
``precompute_ref_log_probs``, read the values its first run stored); a tiny Llama with attention
dropout (the torch RNG matters) over two epochs (the data order matters).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from plait.testing import make_tiny_model, run_cli, write_config
from plait_preference.testing import pair_rows

pytestmark = pytest.mark.slow


def plait_train(config, wait=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "plait.cli", "train", str(config)]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("precompute", [False, True], ids=["frozen-copy", "precomputed"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, precompute):
    from safetensors.torch import load_file

    model = make_tiny_model(tmp_path / "model", attention_dropout=0.1)
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(pair_rows(6, seed=7)))  # 6 pairs / (2 x 2 accumulated) per step: epochs turn over

    def config(name, **extra):
        return write_config(tmp_path / f"{name}.yml", base_model=str(model), rl="dpo", sequence_len=128,
                            datasets=[{"path": str(data), "type": "chat_template.default"}],
                            dataset_prepared_path=str(tmp_path / "prep"), micro_batch_size=2,
                            gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-3, warmup_steps=1,
                            save_steps=2, output_dir=str(tmp_path / name), precompute_ref_log_probs=precompute,
                            **extra)

    # a subprocess too (not run_cli): both runs with one CPU thread, so the float sums add up alike
    reference = plait_train(config("reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed_cfg = config("killed", auto_resume_from_checkpoints=True)
    process = plait_train(killed_cfg, wait=False)
    deadline = time.time() + 240
    while not (tmp_path / "killed" / "checkpoint-2").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    resumed = plait_train(killed_cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    ref, got = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("reference", "killed"))
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), f"{key} differs after resume"
    strip = lambda name: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}  # noqa: E731
                          for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert strip("killed") == strip("reference")
    assert any("rewards/margins" in record for record in strip("reference"))
    if precompute:
        assert "read from" in resumed.stderr  # the stored reference, not the resumed weights, scored
        # without the stored values a resumed full fine-tune cannot score as the reference: it says so
        (stored,) = (tmp_path / "prep").rglob("ref_log_probs/*.safetensors")
        stored.unlink()
        # in this process: a refusal needs no new interpreter
        checkpoint = tmp_path / "killed" / "checkpoint-2"
        again = run_cli(["train", str(config("killed", resume_from_checkpoint=str(checkpoint)))])
        assert again.exit_code != 0
        assert "reference log-probs of this run" in again.stderr and stored.name in again.stderr

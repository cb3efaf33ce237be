"""precompute_ref_log_probs: true against the frozen-copy reference, in one
process and under FSDP2 on two.

Full fine-tuning of a tiny Llama, 3 DPO steps and an eval: the per-step loss,
rewards and eval metrics equal the frozen-copy run's within 1e-5 relative
(the reference sums come from batches of other shapes, so float sums may
differ in the last bits), no copy of the model is made, and the stored file
sits beside the prepared dataset. Two processes with FSDP2 (one ``torchrun``
launch training both references and a resumed run) log the one-process
runs' values within the same tolerance.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from plait.hookspecs import hookimpl
from plait_preference.testing import pair_rows

pytestmark = pytest.mark.slow
TOL = dict(rel=1e-5, abs=1e-6)


class SeeObjective:
    def __init__(self):
        self.reference = None

    @hookimpl
    def on_train_start(self, run):
        self.reference = run.objective.reference


def dpo_config(root, tiny_model, data, name, **extra):
    from plait.testing import write_config

    keys = dict(base_model=str(tiny_model), rl="dpo", sequence_len=256,
                datasets=[{"path": str(data), "type": "chat_template.default", "field_messages": "conversations"}],
                dataset_prepared_path=str(root / "prep"), micro_batch_size=4, max_steps=3, val_set_size=2,
                eval_steps=3, learning_rate=1e-3, lr_scheduler="constant", warmup_steps=0, logging_steps=1,
                output_dir=str(root / name))
    return write_config(root / f"{name}.yml", **{**keys, **extra})


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def run_dpo(root, tiny_model, data, name, plugins=(), **extra):
    from plait.testing import run_cli

    result = run_cli(["train", str(dpo_config(root, tiny_model, data, name, **extra))], plugins=list(plugins))
    assert result.exit_code == 0, result.stderr[-3000:]
    return records(root / name), result.stderr


def assert_same_records(expected, got):
    """Every step's and evaluation's loss, rewards and log-probs agree within TOL."""
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(expected, got), start=1):
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith(("loss", "rewards/", "logps/", "eval_")) and isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], **TOL), f"record {step} {key}"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model):
    """DPO with a frozen copy and with precomputed reference log-probs, one process."""
    root = tmp_path_factory.mktemp("one_process")
    data = root / "pairs.json"
    # 14 pairs, 2 of them for eval: one eval batch of 2, so under two processes one rank has none to score
    data.write_text(json.dumps(pair_rows(14, seed=4)))
    frozen, _ = run_dpo(root, tiny_model, data, "frozen")
    seen = SeeObjective()
    precomputed, log = run_dpo(root, tiny_model, data, "precomputed", plugins=[seen], precompute_ref_log_probs=True)
    return SimpleNamespace(root=root, data=data, frozen=frozen, precomputed=precomputed, log=log,
                           reference=seen.reference)


def test_precomputed_reference_equals_the_frozen_copy(one_process):
    frozen, ours = one_process.frozen, one_process.precomputed
    assert one_process.reference == "precomputed"  # not a frozen nn.Module copy, not the adapter switched off
    stored = list((one_process.root / "prep").rglob("ref_log_probs/*.safetensors"))
    assert len(stored) == 1 and "stored in" in one_process.log
    steps = [r for r in frozen if "loss" in r]
    assert len(steps) == 3 and steps[1]["loss"] != steps[0]["loss"]
    assert_same_records(frozen, ours)
    assert any("eval_rewards/margins" in r for r in ours)


@pytest.mark.distributed
def test_fsdp2_on_two_processes_logs_the_losses_of_one(one_process, tiny_model, tmp_path):
    """Full fine-tuning under FSDP2 over two gloo processes, each with 2 of the
    4 pairs of one process's micro-batch: with the frozen copy (sharded like
    the policy) and with precomputed reference log-probs (each rank scores
    its share), every step's and the evaluation's loss, rewards and log-probs
    equal the one-process runs' within TOL; a run resumed from the
    precomputed run's checkpoint reads the same stored values."""
    from safetensors.torch import load_file

    data, two = one_process.data, dict(micro_batch_size=2, fsdp_version=2)
    frozen = dpo_config(tmp_path, tiny_model, data, "frozen", **two)
    precomputed = dpo_config(tmp_path, tiny_model, data, "precomputed", precompute_ref_log_probs=True,
                             save_steps=2, **two)
    resumed = dpo_config(tmp_path, tiny_model, data, "resumed", precompute_ref_log_probs=True, **two)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(Path(__file__).with_name("train_in_one_group.py")), str(frozen), str(precomputed),
                             f"{resumed} resume_from_checkpoint={tmp_path / 'precomputed' / 'checkpoint-2'}"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    assert "parallel: mesh dp_replicate 1 x dp_shard 2 x cp 1 x tp 1 over 2 processes" in result.stderr

    for name, expected in (("frozen", one_process.frozen), ("precomputed", one_process.precomputed)):
        got = records(tmp_path / name)
        assert got[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference at step 1
        assert got[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
        assert_same_records(expected, got)

    # the reference is sharded as the policy is, each rank holding half of it, and frozen
    layout = json.loads((tmp_path / "frozen" / "reference.rank0.json").read_text())
    assert layout["type"] == "DTensor" and layout["full_shape"] == [64, 64] and layout["local_shape"] == [32, 64]
    assert layout["local_elements"] == layout["policy_local_elements"] and not layout["requires_grad"]
    assert json.loads((tmp_path / "precomputed" / "reference.rank0.json").read_text())["reference"] == "precomputed"

    # both ranks' shares of the scoring, put together, are the one-process values
    ours = load_file(str(next((tmp_path / "prep").rglob("ref_log_probs/*.safetensors"))))
    theirs = load_file(str(next((one_process.root / "prep").rglob("ref_log_probs/*.safetensors"))))
    for key in theirs:
        assert ours[key].tolist() == pytest.approx(theirs[key].tolist(), **TOL), key
    # resumed at step 2: the stored values are read, step 3 and the evaluation are the uninterrupted run's
    assert "resumed from" in result.stderr and "reference log-probs read from" in result.stderr
    def timeless(name):  # all but the speed, from step 3 on
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records(tmp_path / name) if r["step"] == 3]

    assert timeless("resumed") == timeless("precomputed")


def test_precompute_refused_without_a_reference(tmp_path, tiny_model):
    from plait.testing import build_run_config

    from plait.config.problems import ConfigProblems
    from plait.errors import ConfigError

    with pytest.raises((ConfigError, ConfigProblems), match="precompute_ref_log_probs.*orpo has no reference"):
        build_run_config({"base_model": str(tiny_model), "rl": "orpo", "precompute_ref_log_probs": True,
                          "datasets": [{"path": "x.json", "type": "chat_template.default"}]})

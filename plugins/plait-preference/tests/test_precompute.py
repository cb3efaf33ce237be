"""precompute_ref_log_probs: true against the frozen-copy reference, in one
process and under FSDP2 on two.

Full fine-tuning of a tiny Llama, 3 DPO steps and an eval: the per-step loss,
rewards and eval metrics equal the frozen-copy run's within 1e-5 relative
(the reference sums come from batches of other shapes, so float sums may
differ in the last bits), no copy of the model is made, and the stored file
sits beside the prepared dataset. Two processes (one ``torchrun`` launch:
FSDP2 with both references and both resumed, tensor parallel with the
precompute pass and with LoRA's adapter-off base) log the one-process runs'
values within the same tolerance.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from plait.hookspecs import hookimpl
from plait.testing import launch
from plait_preference.testing import kto_rows, pair_rows

pytestmark = pytest.mark.slow
TOL = dict(rel=1e-5, abs=1e-6)
LORA = dict(adapter="lora", lora_target_linear=True, lora_r=8, lora_alpha=16)


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


def assert_same_records(expected, got, skip=()):
    """Every step's and evaluation's loss, rewards and log-probs agree within TOL."""
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(expected, got), start=1):
        assert a.keys() == b.keys()
        for key in a:
            if key.removeprefix("eval_") in skip:
                continue
            if key.startswith(("loss", "kl", "rewards/", "logps/", "eval_")) and isinstance(a[key], float):
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


@pytest.fixture(scope="module")
def one_process_lora(one_process, tiny_model):
    """DPO with LoRA (the reference is the base with the adapter off), one process."""
    steps, _ = run_dpo(one_process.root, tiny_model, one_process.data, "lora", **LORA)
    return steps


def kto_rows_for_groups_of_2_and_4(n: int, seed: int) -> list[dict]:
    """KTO rows (3 of 4 desirable) whose KL sequences are the same whether
    they are drawn in groups of 2 or of 4 rows.

    A row's KL sequence is its prompt with the previous completion of its
    group (``micro_batch_size`` rows in file order, the first taking the
    last's): in a group of 4 with completions A B C D the rows get D A B C, in
    two groups of 2 they get B A D C; with D = B both give B A B C."""
    rows = kto_rows(n, seed=seed)
    for start in range(0, n - 3, 4):
        rows[start + 3]["messages"][1] = dict(rows[start + 1]["messages"][1])
    for i, row in enumerate(rows):
        row["label"] = i % 4 != 0  # mostly desirable: the completions grow likelier, so the KL estimate above 0
    return rows


@pytest.fixture(scope="module")
def one_process_kto(one_process, tiny_model):
    """KTO (a frozen copy as the reference), one process, micro_batch_size 4: its data file and step records."""
    data = one_process.root / "kto.json"
    data.write_text(json.dumps(kto_rows_for_groups_of_2_and_4(14, seed=4)))
    steps, _ = run_dpo(one_process.root, tiny_model, data, "kto", **kto_keys(data))
    # the KL estimate is above 0 from step 2 on (and in the evaluation), so the losses depend on it: two
    # processes match only when each micro-batch's estimate is over both ranks' rows, as here over all 4
    kl = [r["kl"] for r in steps if "kl" in r]
    assert kl[0] == 0.0 and min(kl[1:]) > 0.1 and [r["eval_kl"] for r in steps if "eval_kl" in r][0] > 0.1
    return SimpleNamespace(data=data, steps=steps)


def kto_keys(data):
    return dict(rl="kto", datasets=[{"path": str(data), "type": "chat_template.default", "field_messages": "messages"}])


@pytest.mark.distributed
def test_two_processes_log_the_losses_of_one(one_process, one_process_lora, one_process_kto, tiny_model, tmp_path):
    """One ``torchrun`` launch of two gloo processes trains eight runs.

    FSDP2, full fine-tuning, each rank with 2 of the 4 pairs of one process's
    micro-batch: with the frozen copy (sharded like the policy) and with
    precomputed reference log-probs (each rank scores its share), every
    step's and the evaluation's loss, rewards and log-probs equal the
    one-process runs' within TOL; runs resumed from either run's step-2
    checkpoint (the frozen copy rebuilt from the starting weights, the stored
    values read back) log step 3 and the evaluation as the uninterrupted runs.
    KTO with precomputed reference log-probs (two segments a row, the
    completion and the KL sequence) logs the one-process frozen-copy run's
    values (all but the per-micro-batch margin, a difference of two means),
    the KL estimate included: each micro-batch's is the mean over both
    ranks' KL sequences, as one process's over the 4 rows (each rank's own
    estimate gave other losses from step 2 on).

    Tensor parallel (``tensor_parallel_size: 2``, both ranks on the same 4
    pairs, every linear split): full fine-tuning with precomputed reference
    log-probs, and LoRA with the base (adapter off) as the reference, each
    equal to its one-process run within TOL.

    HSDP (``dp_replicate_size: 2``: each rank a whole replica of the policy
    and of the frozen reference, gradients all-reduced between them) logs
    the one-process frozen-copy run's values as FSDP2 does."""
    from safetensors.torch import load_file

    data, fsdp, tp = one_process.data, dict(micro_batch_size=2, fsdp_version=2), dict(tensor_parallel_size=2)
    frozen = dpo_config(tmp_path, tiny_model, data, "frozen", save_steps=2, **fsdp)
    precomputed = dpo_config(tmp_path, tiny_model, data, "precomputed", precompute_ref_log_probs=True,
                             save_steps=2, **fsdp)
    resumed = dpo_config(tmp_path, tiny_model, data, "resumed", precompute_ref_log_probs=True, **fsdp)
    frozen_resumed = dpo_config(tmp_path, tiny_model, data, "frozen_resumed", **fsdp)
    # its own data cache, so it scores the rows itself rather than read the FSDP2 run's file
    precomputed_tp = dpo_config(tmp_path, tiny_model, data, "precomputed_tp", precompute_ref_log_probs=True,
                                dataset_prepared_path=str(tmp_path / "prep_tp"), **tp)
    lora_tp = dpo_config(tmp_path, tiny_model, data, "lora_tp", **LORA, **tp)
    hsdp = dpo_config(tmp_path, tiny_model, data, "hsdp", dp_replicate_size=2, **fsdp)
    kto = dpo_config(tmp_path, tiny_model, one_process_kto.data, "kto", precompute_ref_log_probs=True,
                     dataset_prepared_path=str(tmp_path / "prep_kto"), **kto_keys(one_process_kto.data), **fsdp)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # alone ~40 s; on CI's two loaded cores it once ran past 300 s (slow or hung: launch's message will say)
    result = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     str(Path(__file__).with_name("train_in_one_group.py")), str(frozen), str(precomputed),
                     f"{resumed} resume_from_checkpoint={tmp_path / 'precomputed' / 'checkpoint-2'}",
                     f"{frozen_resumed} resume_from_checkpoint={tmp_path / 'frozen' / 'checkpoint-2'}",
                     str(precomputed_tp), str(lora_tp), str(kto), str(hsdp)], env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    assert "parallel: mesh dp_replicate 1 x dp_shard 2 x cp 1 x tp 1 over 2 processes" in result.stderr
    assert "parallel: mesh dp_replicate 1 x dp_shard 1 x cp 1 x tp 2 over 2 processes" in result.stderr
    assert "parallel: mesh dp_replicate 2 x dp_shard 1 x cp 1 x tp 1 over 2 processes" in result.stderr

    for name, expected in (("frozen", one_process.frozen), ("precomputed", one_process.precomputed),
                           ("precomputed_tp", one_process.precomputed), ("lora_tp", one_process_lora),
                           ("hsdp", one_process.frozen)):
        got = records(tmp_path / name)
        assert got[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference at step 1
        assert got[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
        assert_same_records(expected, got)
    kto_records = records(tmp_path / "kto")
    kto_steps = [r for r in kto_records if "loss" in r]
    assert kto_steps[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0) for every row at step 1
    assert kto_steps[1]["loss"] != kto_steps[0]["loss"] and min(r["kl"] for r in kto_steps[1:]) > 0.1
    assert_same_records(one_process_kto.steps, kto_records, skip=("rewards/margins",))  # "kl" and "eval_kl" too

    def layout(name):
        return json.loads((tmp_path / name / "reference.rank0.json").read_text())

    # the reference is sharded as the policy is, each rank holding half of it, and frozen
    sharded = layout("frozen")
    assert sharded["type"] == "DTensor" and sharded["full_shape"] == [64, 64] and sharded["local_shape"] == [32, 64]
    assert sharded["local_elements"] == sharded["policy_local_elements"] and not sharded["requires_grad"]
    assert layout("precomputed")["reference"] == "precomputed"
    # under TP each rank holds half of q_proj's rows (column-wise split), the LoRA base too
    assert layout("precomputed_tp") == {"reference": "precomputed", "policy_local_shape": [32, 64]}
    assert layout("lora_tp") == {"reference": "adapter_off", "policy_local_shape": [32, 64]}

    # the ranks' shares of the scoring, put together (FSDP2), or each rank's whole scoring (TP),
    # are the one-process values
    theirs = load_file(str(next((one_process.root / "prep").rglob("ref_log_probs/*.safetensors"))))
    for prep in ("prep", "prep_tp"):
        ours = load_file(str(next((tmp_path / prep).rglob("ref_log_probs/*.safetensors"))))
        for key in theirs:
            assert ours[key].tolist() == pytest.approx(theirs[key].tolist(), **TOL), (prep, key)
    # resumed at step 2: the stored values are read, or the frozen copy holds the starting weights again;
    # step 3 and the evaluation are the uninterrupted run's
    assert result.stderr.count("resumed from") == 2 and "reference log-probs read from" in result.stderr

    def timeless(name):  # all but the speed, from step 3 on
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records(tmp_path / name) if r["step"] == 3]

    assert timeless("resumed") == timeless("precomputed")
    assert timeless("frozen_resumed") == timeless("frozen")


def test_precompute_refused_without_a_reference(tmp_path, tiny_model):
    from plait.testing import build_run_config

    from plait.config.problems import ConfigProblems
    from plait.errors import ConfigError

    with pytest.raises((ConfigError, ConfigProblems), match="precompute_ref_log_probs.*orpo has no reference"):
        build_run_config({"base_model": str(tiny_model), "rl": "orpo", "precompute_ref_log_probs": True,
                          "datasets": [{"path": "x.json", "type": "chat_template.default"}]})

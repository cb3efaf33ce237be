"""Tensor and context parallel through the real ``plait train`` loop.

Two gloo processes with ``tensor_parallel_size: 2`` (both ranks read the same
batch, each holds half of every split linear) and with
``context_parallel_size: 2`` (each rank holds half of every sequence, through
the ``shard_batch`` hook) must log the same losses as one process on the same
data: the loop computes the loss outside the model with the head weight's
local tensor, divides by the global trained-token count and counts the
tensor-parallel ranks' tokens once.

Tolerance: 1e-5 relative on each step's loss and on the eval loss (float32;
the layouts only reorder reductions).
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from plait.testing import launch, make_tiny_model, run_cli, write_config, write_jsonl

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(output_dir):
    return [r["loss"] for r in records(output_dir) if "loss" in r]


def eval_losses(output_dir):
    return [r["eval_loss"] for r in records(output_dir) if "eval_loss" in r]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from plait.quickstart import make_split

    root = tmp_path_factory.mktemp("train_parallel")
    model = make_tiny_model(root / "model")
    rows, _ = make_split(16, 4)
    data = write_jsonl(root / "train.jsonl", rows)

    def config(name, **keys):
        settings = dict(base_model=str(model), datasets=[{"path": str(data), "type": "alpaca"}],
                        dataset_prepared_path=str(root / "prepared"), sequence_len=256, val_set_size=4,
                        micro_batch_size=4, gradient_accumulation_steps=2, max_steps=2, eval_steps=2,
                        learning_rate=1e-3, bf16=False, output_dir=str(root / name))
        return write_config(root / f"{name}.yml", **{**settings, **keys})

    single = run_cli(["train", str(config("single"))])
    assert single.exit_code == 0, single.stderr[-3000:]
    return root, config


def torchrun_train(config_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2"}
    result = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     "-m", "plait.cli", "train", str(config_path)], env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.parametrize("name,keys", [("tp", {"tensor_parallel_size": 2}),
                                       ("cp", {"context_parallel_size": 2})])
def test_two_processes_log_the_losses_of_one(setup, name, keys):
    root, config = setup
    torchrun_train(config(name, **keys))
    expected = losses(root / "single")
    assert len(expected) == 2 and len(losses(root / name)) == 2
    assert losses(root / name) == pytest.approx(expected, rel=1e-5)
    assert eval_losses(root / name) == pytest.approx(eval_losses(root / "single"), rel=1e-5)
    # each trained token is counted once, whichever rank holds it
    assert [r["tokens"] for r in records(root / name) if "loss" in r] == \
        [r["tokens"] for r in records(root / "single") if "loss" in r]


def test_qlora_under_fsdp2_logs_the_losses_of_one(setup):
    """QLoRA (4-bit base, LoRA on every linear) sharded by FSDP2 over two processes:
    plait-bnb stores the packed 4-bit data in the compute dtype so a layer's
    parameters are one dtype, and the losses equal one process's (1e-5)."""
    pytest.importorskip("bitsandbytes")
    root, config = setup
    qlora = {"adapter": "qlora", "load_in_4bit": True, "lora_target_linear": True, "lora_r": 8, "lora_alpha": 16}
    single = run_cli(["train", str(config("qlora_single", **qlora))])
    assert single.exit_code == 0, single.stderr[-3000:]
    # FSDP is data parallel: two ranks of 2 rows see the 4 rows of one process's micro-batch
    result = torchrun_train(config("qlora_fsdp", **qlora, micro_batch_size=2))
    assert "parallel: mesh dp_replicate 1 x dp_shard 2 x cp 1 x tp 1 over 2 processes" in result.stderr
    expected = losses(root / "qlora_single")
    assert len(expected) == 2 and losses(root / "qlora_fsdp") == pytest.approx(expected, rel=1e-5)
    # the saved adapter is a plain peft one, written once
    assert (root / "qlora_fsdp" / "adapter_model.safetensors").is_file()


def test_8bit_lora_under_fsdp2_logs_the_losses_of_one(setup):
    """LoRA on an LLM.int8 base under FSDP2: the int8 weights stay whole on
    each rank (FSDP2's ignored_params), the LoRA and float weights are
    sharded, and the losses equal one process's (1e-5)."""
    pytest.importorskip("bitsandbytes")
    root, config = setup
    lora8 = {"adapter": "lora", "load_in_8bit": True, "lora_target_linear": True, "lora_r": 8, "lora_alpha": 16}
    single = run_cli(["train", str(config("int8_single", **lora8))])
    assert single.exit_code == 0, single.stderr[-3000:]
    result = torchrun_train(config("int8_fsdp", **lora8, micro_batch_size=2, fsdp_version=2))
    assert "parallel: mesh dp_replicate 1 x dp_shard 2 x cp 1 x tp 1 over 2 processes" in result.stderr
    expected = losses(root / "int8_single")
    assert len(expected) == 2 and losses(root / "int8_fsdp") == pytest.approx(expected, rel=1e-5)
    assert (root / "int8_fsdp" / "adapter_model.safetensors").is_file()

"""Two gloo processes (DDP fallback) train the same model as one process,
launched by torchrun and by ``accelerate launch``.

With 2 ranks x micro_batch_size 2 each optimizer step sees the same four rows
as one process with micro_batch_size 4 (the plan deals shuffled rows round
robin), and the loss is divided by the global trained-token count, so after
DDP's gradient averaging the weights match within float tolerance.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from plait.testing import launch, make_tiny_model, run_cli, write_config, write_jsonl

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


#: the two launchers a user runs Plait under; accelerate's --multi_gpu is its
#: torchrun path, which starts CPU processes as well when there is no GPU
LAUNCHERS = {
    # --standalone: a local rendezvous on a free port
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_match_one_process(tmp_path, launcher):
    if launcher == "accelerate":
        pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    from plait.quickstart import make_split

    model = make_tiny_model(tmp_path / "model")
    rows, _ = make_split(16, 4)
    data = write_jsonl(tmp_path / "train.jsonl", rows)

    def config(name, micro_batch_size):
        return write_config(tmp_path / f"{name}.yml", base_model=str(model),
                            datasets=[{"path": str(data), "type": "alpaca"}],
                            dataset_prepared_path=str(tmp_path / "prepared"), sequence_len=256,
                            micro_batch_size=micro_batch_size, gradient_accumulation_steps=2, max_steps=3,
                            learning_rate=1e-3, output_dir=str(tmp_path / name))

    single = run_cli(["train", str(config("single", 4))])
    assert single.exit_code == 0, single.stderr[-3000:]
    env = {**os.environ, "PLAIT_DISABLE_PLUGINS": "parallel", "OMP_NUM_THREADS": "1"}
    result = launch([sys.executable, *LAUNCHERS[launcher], "-m", "plait.cli", "train", str(config("ddp", 2))],
                    env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    one = load_file(str(tmp_path / "single" / "model.safetensors"))
    two = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-5, worst
    assert not torch.equal(one["lm_head.weight"], load_file(str(model / "model.safetensors"))["lm_head.weight"])


def test_two_process_packed_run_resumed_mid_epoch_ends_like_an_uninterrupted_one(tmp_path):
    """Two gloo processes, sample_packing, a checkpoint mid-epoch: resuming it on
    both ranks (each checks rank 0's record of the epoch plan) ends with the
    weights of the run that was never interrupted. The uninterrupted run also
    finds dynamic_checkpoint's trigger file at step 3: rank 0 sees it, and both
    ranks save (each its own random state) through the step's all-reduce."""
    from safetensors.torch import load_file

    from plait.quickstart import make_split

    model = make_tiny_model(tmp_path / "model")
    rows, _ = make_split(48, 4)
    data = write_jsonl(tmp_path / "train.jsonl", rows)

    def config(name, max_steps):
        return write_config(tmp_path / f"{name}.yml", base_model=str(model),
                            datasets=[{"path": str(data), "type": "alpaca"}], sample_packing=True,
                            dataset_prepared_path=str(tmp_path / "prepared"), sequence_len=128,
                            micro_batch_size=1, max_steps=max_steps, save_steps=2, learning_rate=1e-3,
                            warmup_steps=0, lr_scheduler="constant", output_dir=str(tmp_path / name),
                            dynamic_checkpoint={"enabled": True, "check_interval": 3})

    env = {**os.environ, "PLAIT_DISABLE_PLUGINS": "parallel", "OMP_NUM_THREADS": "1"}

    def torchrun(*args):
        result = launch([sys.executable, *LAUNCHERS["torchrun"], "-m", "plait.cli", "train", *map(str, args)],
                        env=env, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    (tmp_path / "whole").mkdir()
    trigger = tmp_path / "whole" / ".axolotl_save_checkpoint"
    trigger.touch()
    torchrun(config("whole", 4))
    assert sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*")) == [
        "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert not trigger.exists()
    assert {p.name for p in (tmp_path / "whole" / "checkpoint-3").glob("rng-*.json")} == {"rng-0.json", "rng-1.json"}
    # the resumed run starts from the uninterrupted run's own checkpoint-2 (save_steps: 2), written mid-epoch
    # (a run stopped there would write the same one, at one more launch of two processes)
    state = json.loads((tmp_path / "whole" / "checkpoint-2" / "trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"]) == (0, 2), state
    resumed = torchrun(config("resumed", 4), f"resume_from_checkpoint={tmp_path / 'whole' / 'checkpoint-2'}")
    assert "resumed from" in resumed.stderr
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    again = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert max((whole[k] - again[k]).abs().max().item() for k in whole) < 1e-6

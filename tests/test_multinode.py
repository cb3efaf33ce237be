"""The documented two-node launch, run on one machine.

Each "node" is a separate launcher process with one worker (gloo on the
CPU), the way a second machine would start it: two ``torchrun --nnodes 2
--node_rank N`` launches meeting at a c10d rendezvous on localhost, and two
``accelerate launch`` runs of one multi-machine config file with
``--machine_rank 0/1`` and ``main_process_ip 127.0.0.1``. The model is
sharded by FSDP2 (plait-parallel). Two ranks of micro-batch 2 see the four
rows one process of micro-batch 4 sees in each step, and the loss is divided
by the global trained-token count, so each step's loss equals the single
process's within 1e-5 (float32; sharding only reorders reductions).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from plait.testing import make_tiny_model, run_cli, write_config, write_jsonl

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAUNCH_TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _losses(output_dir) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, filter(None, lines)) if "loss" in r]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("plait_parallel")
    from plait.quickstart import make_split

    root = tmp_path_factory.mktemp("multinode")
    model = make_tiny_model(root / "model")
    rows, _ = make_split(16, 4)
    data = write_jsonl(root / "train.jsonl", rows)

    def config(name: str, **keys):
        settings = dict(base_model=str(model), datasets=[{"path": str(data), "type": "alpaca"}],
                        dataset_prepared_path=str(root / "prepared"), sequence_len=256, micro_batch_size=4,
                        gradient_accumulation_steps=1, max_steps=2, learning_rate=1e-3, bf16=False,
                        output_dir=str(root / name))
        return write_config(root / f"{name}.yml", **{**settings, **keys})

    single = run_cli(["train", str(config("single"))])
    assert single.exit_code == 0, single.stderr[-3000:]
    return root, config


def _two_nodes(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start both "nodes" at once (each waits for the other at the rendezvous)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for cmd in commands]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for result in results:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return results


def test_two_torchrun_nodes_with_c10d_rendezvous_log_the_losses_of_one(run):
    root, config = run
    cfg = config("torchrun", micro_batch_size=2, fsdp=True, fsdp_version=2)
    endpoint = f"127.0.0.1:{_free_port()}"
    results = _two_nodes([
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
         "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "docs-test",
         "-m", "plait.cli", "train", str(cfg)]
        for rank in (0, 1)])
    assert any("dp_shard 2" in r.stderr and "over 2 processes" in r.stderr for r in results)
    expected = _losses(root / "single")
    assert len(expected) == 2
    assert _losses(root / "torchrun") == pytest.approx(expected, rel=1e-5)


def test_two_accelerate_machines_log_the_losses_of_one(run):
    pytest.importorskip("accelerate")
    root, config = run
    cfg = config("accelerate", micro_batch_size=2, fsdp=True, fsdp_version=2)
    # the multi-machine config a user writes once and copies to every node
    machines = root / "two-machines.yaml"
    machines.write_text("\n".join([
        "compute_environment: LOCAL_MACHINE",
        "distributed_type: MULTI_GPU",  # accelerate's torchrun path; CPU processes when there is no GPU
        "num_machines: 2",
        "num_processes: 2",  # in all, over both machines
        "main_process_ip: 127.0.0.1",
        f"main_process_port: {_free_port()}",
        "mixed_precision: 'no'",
        "dynamo_config: {}",
        "use_cpu: false",
        "",
    ]))
    _two_nodes([
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(machines),
         "--machine_rank", str(rank), "-m", "plait.cli", "train", str(cfg)]
        for rank in (0, 1)])
    assert _losses(root / "accelerate") == pytest.approx(_losses(root / "single"), rel=1e-5)

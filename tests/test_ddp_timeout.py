"""ddp_timeout (Axolotl's key): a collective gives up after that many seconds.

Two gloo processes join through core's init_distributed; rank 1 stays busy
(as a rank preparing data would) and rank 0's barrier fails after the
configured 3 s instead of torch's 30-minute default.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from plait.testing import build_run_config, free_port

WORKER = textwrap.dedent("""
    import json, sys, time
    import torch.distributed as dist
    from plait.train.distributed import init_distributed

    timeout, out = int(sys.argv[1]), sys.argv[2]
    init_distributed(timeout)
    if dist.get_rank() == 1:
        time.sleep(5 * timeout)  # busy: never reaches the barrier in time
        sys.exit(0)
    start = time.monotonic()
    try:
        dist.barrier()
        outcome = "passed"
    except RuntimeError as exc:
        outcome = str(exc)
    with open(f"{out}/rank0.json", "w") as f:
        json.dump({"waited": time.monotonic() - start, "outcome": outcome[:300]}, f)
    sys.exit(0)
""")


@pytest.mark.distributed
def test_a_collective_gives_up_after_ddp_timeout(tmp_path):
    assert build_run_config({"base_model": "m", "ddp_timeout": 3})[0].ddp_timeout == 3
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script), "3", str(tmp_path)], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(2)]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["outcome"] != "passed", outputs
    assert 2.5 <= result["waited"] < 10, result  # the configured 3 s, not torch's 30 minutes

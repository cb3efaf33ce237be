"""``plait.testing.launch``: a launcher that runs past its time is killed with its workers."""

from __future__ import annotations

import os
import sys
import time

import pytest

from plait.testing import launch

#: a launcher that starts a worker (as torchrun does), reports both pids, and waits on it forever
HANGING_LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("launcher", worker.pid, flush=True)
print("waiting at the rendezvous", file=sys.stderr, flush=True)
worker.wait()
"""


def test_a_finished_launch_returns_its_output():
    result = launch([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"])
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")


def test_a_launch_past_its_timeout_kills_its_workers_and_shows_where_it_stopped():
    with pytest.raises(AssertionError) as failure:
        launch([sys.executable, "-c", HANGING_LAUNCHER], timeout=5)
    message = str(failure.value)
    assert "ran past 5 s and was killed" in message and "waiting at the rendezvous" in message
    worker = int(message.split("launcher ")[1].split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)  # still there (or a zombie not yet reaped by init)
        except ProcessLookupError:
            return
        if _is_zombie(worker):
            return
        time.sleep(0.1)
    pytest.fail(f"the launcher's worker {worker} outlived the timeout")


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True

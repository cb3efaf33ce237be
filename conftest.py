"""Settings for the whole suite (tests/, plugins/*/tests, contrib/*/tests), serial or under pytest-xdist.

``make test`` runs the suite on two pytest-xdist workers, one test file per worker at a time
(``--dist loadfile``: a module's fixtures, such as a reference training run, are built once).
"""

from __future__ import annotations

import os
import sys

# One intra-op thread. The tensors here are tiny, so a second thread saves little, and beside a
# second worker (or another process) on two cores OpenMP's spinning threads burn the CPU the other
# one needs: tests/test_quickstart.py took 92 CPU s with two threads and 22 CPU s with one on a
# busy 2-core machine. The subprocesses a test starts inherit the variable.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:  # imported before this file (by a pytest plugin): its pool is already sized
        sys.modules["torch"].set_num_threads(1)

# Triton kernels run by its interpreter on a machine without CUDA. Triton decides between compiling and
# interpreting when it defines a kernel, its own library functions (tl.sum, ...) included, at its first
# import: set here, before any test module is collected, so that no collection order can give a worker
# compiled library functions that interpreted kernels then cannot call (plait-kernels' conftest sets it
# too, for its suite run alone). Without CUDA only the interpreter can run a kernel at all.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

# Files that each cost 10 to 80 CPU seconds (gloo launches, kill-and-resume runs, Triton kernels
# interpreted on the CPU), heaviest first as measured on 2 cores (about 690 CPU s for the whole suite,
# 400 of them in subprocesses). They are handed out first, so that no worker is left with a long file
# while the other has nothing to do. Only the order depends on this list: a file not named here still
# runs, after these, in its collected order (tests/test_suite_settings.py checks that each exists).
HEAVIEST_FIRST = [
    "plugins/plait-parallel/tests/test_train_cli.py",
    "tests/test_train_distributed.py",
    "plugins/plait-parallel/tests/test_distributed.py",
    "plugins/plait-kernels/tests/test_train_e2e.py",
    "tests/test_train_resume.py",
    "plugins/plait-preference/tests/test_preference_resume.py",
    "tests/test_multinode.py",
    "plugins/plait-preference/tests/test_precompute.py",
    "tests/test_train_resume_packed.py",
    "tests/test_architectures.py",
    "plugins/plait-kernels/tests/test_lora_mlp.py",
    "tests/test_quickstart.py",
    "plugins/plait-kernels/tests/test_model_patch.py",
    "plugins/plait-kernels/tests/test_lora_attention.py",
    "plugins/plait-models/tests/test_family_roundtrip.py",
    "tests/test_cli.py",
]


def pytest_collection_modifyitems(config, items):
    """Heaviest files first (a stable sort: the order within a file and of the rest is kept)."""
    rank = {path: i for i, path in enumerate(HEAVIEST_FIRST)}
    root = str(config.rootpath) + os.sep

    def file_rank(item):
        return rank.get(str(item.path).removeprefix(root), len(rank))

    items.sort(key=file_rank)

"""Run the Triton kernels on the CPU interpreter when there is no GPU.

Triton decides between compiling and interpreting when a ``@triton.jit``
function is defined, i.e. when ``plait_kernels.ops`` is imported, so the
variable is set here, at conftest import, before any test module imports the
kernels. Other test directories are unaffected on a GPU machine (the variable
is only set without CUDA) and do not run Triton code on a CPU one.
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device():
    """Where the kernels run: the GPU when there is one, else the CPU interpreter."""
    return "cuda" if ON_GPU else "cpu"



@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random-init Llama with its tokenizer (the LoRA fast-path tests)."""
    from plait.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")

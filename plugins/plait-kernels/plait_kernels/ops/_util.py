"""Small helpers shared by the kernels' launch code."""

from __future__ import annotations

import triton
import triton.language as tl


def block_size(n: int, minimum: int = 16) -> int:
    """The power of two covering ``n`` (Triton block shapes must be powers of two)."""
    return max(minimum, triton.next_power_of_2(n))


def num_warps(block: int) -> int:
    """Warps for a row kernel over ``block`` elements: enough threads that each
    holds a few dozen values, not hundreds (register spills)."""
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def num_programs(rows: int, device) -> int:
    """Programs for a persistent kernel that loops over ``rows``: a few per SM on
    a GPU, and few on the interpreter (each program is a Python loop there)."""
    import torch

    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))


@triton.jit
def tanh(x):
    """tanh from one exp of a non-positive number: no overflow, and no cancellation
    near 0 (``2*sigmoid(2x) - 1`` loses digits there). ``tl`` has no portable tanh
    that also runs in the interpreter."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)

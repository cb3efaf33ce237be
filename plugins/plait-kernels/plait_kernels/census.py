"""Count what a piece of PyTorch code launches, on the CPU: every aten op that
would be a device kernel (views and metadata ops are not), the bytes it reads
and writes, and the FLOPs of its matmuls; Triton kernels run by the
interpreter (``TRITON_INTERPRET=1``) count as one launch each, with the bytes
of their tensor arguments.

A traffic model, not a measurement: each op is taken to read every input
tensor once and write every output once (no cache reuse, an index gather
reads its whole source). It tells two versions of the same computation apart
without a GPU (``bench/moe_census.py``), which is what it is for.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from plait.launches import NO_KERNEL_OPS, triton_runs_replaced

#: aten ops that launch no kernel (views, metadata, allocations), and reads of a value on the host
#: (``.item()``): on a GPU a copy to the host, no kernel of the device's and no traffic worth comparing
#: (``bench/preference_host_cpu.py`` counts them, as the syncs they are)
_NO_KERNEL = NO_KERNEL_OPS | {"_local_scalar_dense", "item"}

#: matmul ops whose FLOPs are counted
_MATMULS = {"mm", "bmm", "addmm", "matmul", "_grouped_mm", "grouped_mm", "linear", "baddbmm"}


@dataclass
class Census:
    """What one counted call launched: ``launches`` per op name, ``bytes`` per
    op name, ``flops`` of the matmuls; ``big`` counts the launches that
    touched a tensor of exactly ``big_rows`` rows (the routed rows), per op
    name, and ``big_widths`` per ``(op name, columns)`` of such a tensor."""

    launches: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    flops: int = 0
    big: Counter = field(default_factory=Counter)
    big_widths: Counter = field(default_factory=Counter)
    big_rows: int = 0

    @property
    def total_launches(self) -> int:
        return sum(self.launches.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def record(self, name: str, tensors: list, flops: int = 0) -> None:
        # a tensor passed twice (an unused pointer argument standing in for another) is counted once
        tensors = list({(t.data_ptr(), t.numel(), t.dtype): t for t in tensors}.values())
        self.launches[name] += 1
        self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors)
        self.flops += flops
        widths = {t.shape[-1] for t in tensors if self.big_rows and t.dim() == 2 and t.shape[0] == self.big_rows}
        if widths:
            self.big[name] += 1
        for width in widths:
            self.big_widths[(name, width)] += 1


def _tensors(values) -> list:
    return [v for v in tree_flatten(values)[0] if isinstance(v, torch.Tensor)]


def _matmul_flops(name: str, args, out) -> int:
    tensors = _tensors(args)
    outs = _tensors(out)
    if not tensors or not outs:
        return 0
    if name in ("_grouped_mm", "grouped_mm"):
        a, b = tensors[0], tensors[1]
        # 2D x 3D: [M, K] @ [G, K, N] -> [M, N]; 2D x 2D over groups of rows: [K, M] @ [M, N] -> [G, K, N]
        k = a.shape[-1]
        return 2 * outs[0].numel() * k // (outs[0].shape[0] if outs[0].dim() == 3 else 1)
    a = tensors[-2] if name in ("addmm", "baddbmm") else tensors[0]
    return 2 * outs[0].numel() * a.shape[-1]


class _Counting(TorchDispatchMode):
    def __init__(self, census: Census):
        super().__init__()
        self.census = census
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__.rstrip("_") if func.overloadpacket.__name__ != "_" else "_"
        if self.paused or name in _NO_KERNEL or func.overloadpacket.__name__ in _NO_KERNEL:
            return out
        if name == "copy" and args and isinstance(args[0], torch.Tensor) and isinstance(args[1], torch.Tensor) \
                and args[0].data_ptr() == args[1].data_ptr():
            return out
        inputs = _tensors((args, kwargs))
        outputs = [t for t in _tensors(out) if all(t is not i for i in inputs)]
        flops = _matmul_flops(name, args, out) if name in _MATMULS else 0
        self.census.record(name, inputs + outputs, flops)
        return out


@contextlib.contextmanager
def counting(big_rows: int = 0):
    """Inside: every aten kernel and interpreted Triton launch is counted into
    the yielded :class:`Census` (``big_rows``: see there)."""
    census = Census(big_rows=big_rows)
    mode = _Counting(census)
    with triton_runs_replaced(functools.partial(_counted_launch, census, mode)), mode:
        yield census


def _counted_launch(census: Census, mode: _Counting, run, kernel, *args, grid, warmup, **kwargs):
    """An interpreted Triton launch counts as one kernel (the interpreter's own
    tensor copies are not counted: they stand for the kernel's reads)."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    census.record(f"triton:{kernel.fn.__name__}", tensors)
    mode.paused = True
    try:
        return run(kernel, *args, grid=grid, warmup=warmup, **kwargs)
    finally:
        mode.paused = False


@contextlib.contextmanager
def saved_for_backward(exclude=()):
    """Inside: the tensors autograd keeps for the backward are noted; the
    yielded dict's ``"bytes"`` is their total, each storage counted once, and
    storages of ``exclude`` (e.g. the model's parameters, kept anyway) left out."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    result = {"bytes": 0}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            result["bytes"] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield result

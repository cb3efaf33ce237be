"""What launches a kernel on a device, for the tools that measure a step on the CPU.

Three tools work out on the CPU what a training step would do on a GPU:
plait-kernels' ``census`` (launches, bytes and FLOPs of each op),
plait-preference's ``peak_memory`` (live bytes on fake tensors) and
``bench/preference_host_cpu.py`` (launch ops per step under torch's profiler).
They share two things, kept here so that they count alike:

* :data:`NO_KERNEL_OPS`, the aten ops that launch no kernel on a device;
* :func:`triton_runs_replaced`, which routes each Triton kernel launch through
  a function of the tool's (to count it, note it or skip it) and puts
  Triton's own launch back afterwards.

No import of torch or triton at module level: the tools import this module
before they decide whether Triton is there.
"""

from __future__ import annotations

import contextlib

#: aten ops that launch no kernel on a device, by the name of their overload
#: packet (``func.overloadpacket.__name__`` in a dispatch mode, ``aten::<name>``
#: in the profiler's events). A read of a value on the host
#: (``_local_scalar_dense``, ``item``) is not here: on a GPU it is a copy to
#: the host and a sync, which one tool counts and another leaves out (each says
#: why where it uses this set).
NO_KERNEL_OPS = frozenset({
    # views: a new tensor over the same storage
    "view", "_unsafe_view", "view_as", "reshape", "_reshape_alias", "as_strided", "alias", "t", "transpose",
    "permute", "movedim", "numpy_T", "expand", "expand_as", "slice", "select", "narrow", "diagonal", "unsqueeze",
    "squeeze", "flatten", "unflatten", "split", "split_with_sizes", "chunk", "unbind", "real", "imag",
    "view_as_real", "detach", "detach_", "lift_fresh", "resolve_conj", "resolve_neg",
    # metadata: sizes, strides, flags, autograd bookkeeping
    "size", "stride", "numel", "dim", "is_contiguous", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "is_same_size", "result_type", "_has_compatible_shallow_copy_type",
    "_nested_tensor_from_mask_left_aligned", "set_", "resize_", "requires_grad_", "retain_grad", "output_nr",
    "_version", "_fw_primal",
    # allocations: memory from the caching allocator, no kernel
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    # conversions that found nothing to do (one that converts shows its copy as an op of its own)
    "to", "contiguous",
})


@contextlib.contextmanager
def triton_runs_replaced(replacement, *, compiled: bool = False):
    """Inside: each launch of a Triton kernel run by the interpreter
    (``TRITON_INTERPRET=1``: ``triton.runtime.interpreter.InterpretedFunction.run``)
    calls ``replacement(run, kernel, *args, **kwargs)`` instead, where ``run``
    is Triton's own (``run(kernel, *args, **kwargs)`` launches it) and
    ``kernel`` the launched function (its ``fn`` is the Python function).

    ``compiled``: compiled launches (``JITFunction.run``) too, for kernels
    decorated before the interpreter was switched on.

    Triton's ``run`` is put back on leaving, however the body ends. Without
    Triton installed nothing is replaced: no Triton kernel can launch then.
    """
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield
        return
    runs = {cls: cls.run for cls in ((InterpretedFunction, JITFunction) if compiled else (InterpretedFunction,))}
    for cls, run in runs.items():
        cls.run = _calling(replacement, run)
    try:
        yield
    finally:
        for cls, run in runs.items():
            cls.run = run


def _calling(replacement, run):
    def replaced(kernel, *args, **kwargs):
        return replacement(run, kernel, *args, **kwargs)
    return replaced

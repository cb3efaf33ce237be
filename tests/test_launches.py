"""plait.launches: the ops that launch no kernel, and Triton's launch routed
through a tool's function and put back (the census, the peak counter and the
compile check rely on both)."""

import pytest
import torch

from plait.launches import NO_KERNEL_OPS, triton_runs_replaced

# Triton is imported inside the tests, never at collection: Triton picks compiled or interpreted
# for its own library functions (tl.sum, ...) when it is first imported, and plait-kernels'
# conftest sets TRITON_INTERPRET=1 while the suite is collected. Imported here first, a worker
# would get compiled library functions that every interpreted kernel then fails to call.


def _triton():
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return InterpretedFunction, JITFunction


def _add_one_kernel():
    import triton.language as tl

    def _add_one(x_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        keep = offsets < n
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=keep) + 1, mask=keep)

    return _add_one


def test_views_and_allocations_launch_nothing_and_a_matmul_does():
    ops_seen = {op.overloadpacket.__name__ for op in (torch.ops.aten.view.default, torch.ops.aten.t.default,
                                                      torch.ops.aten.empty_strided.default)}
    assert ops_seen <= NO_KERNEL_OPS
    assert not {"mm", "addmm", "_to_copy", "copy_", "add", "_local_scalar_dense"} & NO_KERNEL_OPS
    assert all(hasattr(torch.ops.aten, name) for name in NO_KERNEL_OPS), "a name that is no aten op counts nothing"


def test_an_interpreted_launch_goes_through_the_replacement_and_still_runs():
    InterpretedFunction, _ = _triton()
    kernel = InterpretedFunction(_add_one_kernel())
    seen = []

    def noting(run, launched, *args, **kwargs):
        seen.append((launched.fn.__name__, kwargs["grid"]))
        return run(launched, *args, **kwargs)

    x = torch.zeros(5)
    with triton_runs_replaced(noting):
        kernel[(1,)](x, 5, BLOCK=8)
    kernel[(1,)](x, 5, BLOCK=8)  # after: Triton's own run, not noted
    assert seen == [("_add_one", (1,))]
    assert torch.equal(x, torch.full((5,), 2.0))


def test_triton_run_is_put_back_when_the_body_raises():
    InterpretedFunction, JITFunction = _triton()
    interpreted, compiled = InterpretedFunction.run, JITFunction.run
    with pytest.raises(RuntimeError, match="body failed"):
        with triton_runs_replaced(lambda run, kernel, *args, **kwargs: None, compiled=True):
            assert InterpretedFunction.run is not interpreted and JITFunction.run is not compiled
            raise RuntimeError("body failed")
    assert InterpretedFunction.run is interpreted and JITFunction.run is compiled
    with triton_runs_replaced(lambda run, kernel, *args, **kwargs: None):
        assert JITFunction.run is compiled  # compiled launches only when asked

"""Every kernel launch the ops make compiles for sm_90 (H100/H200), checked on a CPU.

The interpreter tests check what the kernels compute; this checks that the
compiler accepts them (``plait_kernels.compile_check`` says why both are needed).
The ops run on small tensors in the dtypes a GPU run uses, covering each
compile-time branch: residual or not, both activations, softcap or not,
nested NF4 scales or not, copied bases or not, MoE combine products
rounded to bf16 or kept in float32.
"""

import pytest
import torch

from plait_kernels.compile_check import compile_launches, recording_launches

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile every kernel")


def _run_every_op():
    from plait_kernels.ops.cross_entropy import fused_linear_cross_entropy
    from plait_kernels.ops.gated_rms_norm import gated_rms_norm
    from plait_kernels.ops.glu import geglu, glu_backward, glu_forward, swiglu
    from plait_kernels.ops.moe_combine import moe_combine
    from plait_kernels.ops.rms_norm import rms_norm
    from plait_kernels.ops.rope import apply_rope
    from plait_kernels.ops.stack import copy_rows_, empty_gate_up, fill_gate_up_, gate_up_weight

    gen = torch.Generator().manual_seed(0)

    def leaf(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()

    for residual in (None, leaf(4, 64)):
        out = rms_norm(leaf(4, 64), leaf(64), offset=1.0, residual=residual)
        sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    # both orders; the gate-first one with and without a gate, with a bf16 and a float32 weight
    for gate, weight, group, before in ((leaf(4, 64), leaf(64), None, True), (leaf(4, 64), leaf(64), 16, False),
                                        (None, leaf(64, dtype=torch.float32), 16, False)):
        gated_rms_norm(leaf(4, 64), gate, weight, 1e-5, group, before).float().sum().backward()
    q, k = leaf(1, 4, 8, 16), leaf(1, 2, 8, 16)
    cos, sin = torch.randn(1, 8, 16).to(torch.bfloat16), torch.randn(1, 8, 16).to(torch.bfloat16)
    sum(t.float().sum() for t in apply_rope(q, k, cos, sin)).backward()
    for act in (swiglu, geglu):
        act(leaf(4, 32), leaf(4, 32)).float().sum().backward()
    gate, up, d_h = (torch.randn(4, 32).to(torch.bfloat16) for _ in range(3))
    glu_forward(gate, up, gelu=False)
    glu_backward(d_h, gate, up, False, out=(torch.empty_like(gate), torch.empty_like(up)), h_out=d_h)
    # a routed expert row's routing weight (bf16 as Qwen3-MoE's router gives it) in the forward and backward
    row_weights = torch.rand(4).to(torch.bfloat16)
    glu_forward(gate, up, gelu=False, row_scale=row_weights)
    glu_backward(d_h, gate, up, False, row_scale=row_weights)
    labels = torch.tensor([1, -100, 5, 7, -100, 2, 3, 9])
    for softcap in (None, 30.0):
        loss, _ = fused_linear_cross_entropy(leaf(8, 32), leaf(64, 32), labels, softcap=softcap)
        loss.backward()
    inverse = torch.tensor([3, 0, 5, 1, 2, 4])
    # float32 router weights (float32 products), bf16 ones (products rounded to bf16), a float32 model
    for rows_dtype, weights_dtype in ((torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                      (torch.float32, torch.float32)):
        moe_combine(leaf(6, 32, dtype=rows_dtype), leaf(6, dtype=weights_dtype), inverse, 2,
                    rows_dtype).float().sum().backward()
    x = torch.randn(6, 16).to(torch.bfloat16)
    copy_rows_(torch.empty(6, 20, dtype=torch.bfloat16)[:, :16], x)
    w, b = torch.randn(8, 16).to(torch.bfloat16), torch.randn(8, 4)
    gate_up_weight(w, w, b, b, 2.0, 2.0, torch.bfloat16)
    fill_gate_up_(empty_gate_up(8, 16, 4, 4, torch.bfloat16, "cpu"), b, b, 2.0, 2.0)
    bnb = pytest.importorskip("bitsandbytes.functional")
    from plait_kernels.ops.nf4 import dequantize_nf4_

    for nested in (True, False):
        packed, state = bnb.quantize_4bit(torch.randn(8, 128), blocksize=64, quant_type="nf4",
                                          compress_statistics=nested)
        dequantize_nf4_(torch.empty(8, 128, dtype=torch.bfloat16), packed, state)


def test_every_launch_compiles_for_sm90():
    with recording_launches() as launches:
        _run_every_op()
    kernels = {launch["kernel"] for launch in launches}
    # each kernel module took part, so a new kernel in one of them is covered
    assert {"_rms_norm_fwd", "_rms_norm_bwd", "_gated_rms_norm_fwd", "_gated_rms_norm_bwd", "_rope_kernel", "_glu_fwd", "_glu_bwd", "_ce_rows", "_copy_rows",
            "_moe_combine_fwd", "_moe_combine_bwd",
            "_gate_up_weight", "_dequantize_nf4"} <= kernels, kernels
    assert compile_launches(launches) == []


def test_a_kernel_the_compiler_rejects_is_reported(tmp_path, monkeypatch):
    """The check itself can fail: a helper that returns early in a constexpr
    branch, with another dtype than its last return, runs in the interpreter
    but does not compile (Triton types the unreachable return too)."""
    module = tmp_path / "bad_kernel_for_compile_check.py"
    module.write_text(
        "import triton\nimport triton.language as tl\n\n"
        "@triton.jit\ndef _pick(X, mask, AS_BYTES: tl.constexpr):\n"
        "    if AS_BYTES:\n        return tl.load(X, mask=mask, other=0)\n"
        "    return tl.load(X, mask=mask, other=0).to(tl.float32)\n\n"
        "@triton.jit\ndef bad(X, OUT, n, AS_BYTES: tl.constexpr, BLOCK: tl.constexpr):\n"
        "    offs = tl.arange(0, BLOCK)\n"
        "    tl.store(OUT + offs, _pick(X + offs, offs < n, AS_BYTES).to(tl.float32), mask=offs < n)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{__import__('os').environ.get('PYTHONPATH', '')}")
    import bad_kernel_for_compile_check as bad_module

    x, out = torch.arange(8, dtype=torch.uint8), torch.empty(8)
    with recording_launches() as launches:
        bad_module.bad[(1,)](x, out, 8, AS_BYTES=True, BLOCK=8)
    assert torch.equal(out, x.float())  # the interpreter ran it
    failures = compile_launches(launches)
    assert len(failures) == 1 and failures[0].startswith("bad(") and "return types" in failures[0], failures

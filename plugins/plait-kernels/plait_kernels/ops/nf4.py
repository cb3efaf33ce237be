"""bitsandbytes NF4 weights dequantized in one kernel, into any row-strided destination.

bitsandbytes stores a 4-bit weight as packed nibbles (two per byte, the high
nibble first, in the row-major order of the ``[out, in]`` weight) with one
scale per ``blocksize`` values: ``w[i] = code[nibble(i)] * absmax[i // blocksize]``.
With double quantization (``bnb_4bit_use_double_quant``) the scales are
themselves 8-bit: ``absmax[b] = code2[q[b]] * absmax2[b // blocksize2] + offset``.

``bitsandbytes.functional.dequantize_4bit`` spends three launches and its
Python on that (the scales, the offset add, the weights) and writes a new
contiguous tensor. QLoRA's fused paths dequantize every frozen base in
forward, in the checkpoint's recompute and in backward, so this kernel does
it in one launch and writes straight to where the matmul reads: for the LoRA
MLP that is a column block of the stacked gate/up weight, which saves a
temporary and a copy. The arithmetic is bitsandbytes' (float32 products in
the same order, one rounding to the output dtype), so the result is the same
bits; the GPU test compares them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_BLOCK = 1024
#: Triton reads this when a kernel is defined: on a CPU tensor the kernel only runs interpreted
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dequantize_nf4(PACKED, CODE, ABSMAX, CODE2, ABSMAX2, OFFSET, OUT, cols, stride_out, blocksize, blocksize2,
                    NESTED: tl.constexpr, BLOCK: tl.constexpr):
    # one program: BLOCK columns of one row of the [rows, cols] weight
    row = tl.program_id(0).to(tl.int64)
    cols_here = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols_here < cols
    flat = row * cols + cols_here  # index into the packed row-major weight
    byte = tl.load(PACKED + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
    block = flat // blocksize
    if NESTED:
        q = tl.load(ABSMAX + block, mask=mask, other=0).to(tl.int32)
        offset = tl.load(OFFSET)  # a device scalar: reading it on the host would sync
        scale = tl.load(CODE2 + q, mask=mask, other=0.0) * tl.load(ABSMAX2 + block // blocksize2, mask=mask,
                                                                    other=0.0) + offset
    else:
        scale = tl.load(ABSMAX + block, mask=mask, other=0.0)
    value = tl.load(CODE + nibble, mask=mask, other=0.0) * scale
    tl.store(OUT + row * stride_out + cols_here, value.to(OUT.dtype.element_ty), mask=mask)


def dequantizes(packed: torch.Tensor, quant_state) -> bool:
    """Whether :func:`dequantize_nf4_` handles this bitsandbytes weight here: NF4, with
    or without double quantization, on a GPU (or the CPU interpreter). FP4 and
    others go to bitsandbytes."""
    if not (packed.is_cuda or _INTERPRETED):
        return False
    if quant_state is None or getattr(quant_state, "quant_type", None) != "nf4":
        return False
    if len(getattr(quant_state, "shape", ())) != 2 or quant_state.code is None:
        return False
    nested = getattr(quant_state, "nested", False)
    return not nested or (quant_state.state2 is not None and quant_state.state2.code is not None)


def _weight_args(packed: torch.Tensor, quant_state) -> tuple:
    """``(data, code, absmax, code2, absmax2, offset, blocksize, blocksize2, nested)``
    for the kernel. QLoRA dequantizes every base three times a step, so they are
    built once and kept on the QuantState (it is unhashable: no dict can key on
    it), while the packed bytes and the scales stay where they were (a model
    moved to another device gets new ones). The cache holds tensors and ints,
    not ``packed`` itself."""
    key = (packed.data_ptr(), quant_state.absmax.data_ptr())
    entry = getattr(quant_state, "_plait_nf4_args", None)
    if entry is not None and entry[0] == key:
        return entry[1]
    data = packed.reshape(-1).view(torch.uint8)  # Params4bit may store the bytes as bf16 etc. (FSDP)
    if quant_state.nested:
        state2 = quant_state.state2
        args = (data, quant_state.code, quant_state.absmax, state2.code, state2.absmax, quant_state.offset,
                int(quant_state.blocksize), int(state2.blocksize), True)
    else:
        args = (data, quant_state.code, quant_state.absmax, None, None, None, int(quant_state.blocksize), 1, False)
    quant_state._plait_nf4_args = (key, args)
    return args


def dequantize_nf4_(out: torch.Tensor, packed: torch.Tensor, quant_state) -> torch.Tensor:
    """Write the weight that ``packed`` (bitsandbytes' 4-bit data, any storage
    dtype) and ``quant_state`` describe into ``out``: ``[out_features,
    in_features]``, unit column stride, rows possibly strided; returns ``out``."""
    rows, cols = quant_state.shape
    if tuple(out.shape) != (rows, cols) or (cols > 1 and out.stride(1) != 1):
        raise ValueError(f"dequantize_nf4_: a {rows}x{cols} weight into shape {tuple(out.shape)} "
                         f"strides {out.stride()}")
    data, code, absmax, code2, absmax2, offset, blocksize, blocksize2, nested = _weight_args(packed, quant_state)
    if rows and cols:
        _dequantize_nf4[(rows, triton.cdiv(cols, _BLOCK))](
            data, code, absmax, code2, absmax2, offset, out, cols, out.stride(0), blocksize, blocksize2,
            NESTED=nested, BLOCK=_BLOCK,
            enable_fp_fusion=False)  # code2[q] * absmax2 + offset rounds twice in bitsandbytes: no FMA
    return out

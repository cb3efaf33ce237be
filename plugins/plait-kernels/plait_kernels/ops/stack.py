"""Row-strided copies that build the fused LoRA MLP's widened operands.

The fused LoRA MLP (``plait_kernels.lora_mlp``) multiplies ``[x | x A.T]`` by
``[[W_g, s_g B_g, 0], [W_u, 0, s_u B_u]]``. Both are written into buffers a
few columns wider than their sources, so every destination row is strided,
and torch's generic copy takes its non-vectorized path for that. These
kernels move whole rows in wide, aligned blocks, and build the stacked weight
(both base weights, both scaled ``B`` blocks and the zero blocks) in one
launch instead of six. On the H200 at the 1B shape the copies went from
8.1 ms a step to 2.7 ms (profiles in ``bench/RESULTS.md``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _copy_rows(SRC, DST, cols, stride_src, stride_dst, BLOCK: tl.constexpr):
    # one program: BLOCK columns of one row, copied as they are (no dtype change)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    values = tl.load(SRC + row * stride_src + offs, mask=mask)
    tl.store(DST + row * stride_dst + offs, values, mask=mask)


@triton.jit
def _gate_up_weight(WG, WU, BG, BU, OUT, inter, hidden, r_g, r_u, stride_wg, stride_wu, stride_bg, stride_bu,
                    stride_out, s_g, s_u, COPY_BASE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr):
    # one program: one row of the stacked weight, the base part in BLOCK chunks
    # (unless the caller wrote it) and the r_g + r_u LoRA columns in one more block
    row = tl.program_id(0).to(tl.int64)
    out_row = OUT + row * stride_out
    is_gate = row < inter
    if COPY_BASE:
        if is_gate:
            w_row = WG + row * stride_wg
        else:
            w_row = WU + (row - inter) * stride_wu
        for start in range(0, hidden, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < hidden
            tl.store(out_row + offs, tl.load(w_row + offs, mask=mask).to(OUT.dtype.element_ty), mask=mask)
    # the LoRA columns: [s_g B_g | 0] on gate rows, [0 | s_u B_u] on up rows
    # (each row reads only its own B: the other one's columns are out of range)
    offs = tl.arange(0, BLOCK_R)
    g_end = tl.where(is_gate, r_g, 0)
    u_end = tl.where(is_gate, r_g, r_g + r_u)
    b_g = tl.load(BG + row * stride_bg + offs, mask=offs < g_end, other=0.0).to(tl.float32)
    b_u = tl.load(BU + (row - inter) * stride_bu + (offs - r_g), mask=(offs >= r_g) & (offs < u_end),
                  other=0.0).to(tl.float32)
    tl.store(out_row + hidden + offs, (b_g * s_g + b_u * s_u).to(OUT.dtype.element_ty), mask=offs < r_g + r_u)


def _unit_column_stride(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
            raise ValueError(f"expected a [rows, cols] tensor with unit column stride, got shape "
                             f"{tuple(t.shape)} strides {t.stride()}")


def copy_rows_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` for ``[rows, cols]`` tensors of one dtype whose rows may be
    strided (a block of columns of a wider buffer); returns ``dst``."""
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(f"copy_rows_: {tuple(src.shape)} {src.dtype} into {tuple(dst.shape)} {dst.dtype}")
    _unit_column_stride(dst, src)
    rows, cols = src.shape
    if rows and cols:
        _copy_rows[(rows, triton.cdiv(cols, _BLOCK))](src, dst, cols, src.stride(0), dst.stride(0), BLOCK=_BLOCK)
    return dst


def empty_gate_up(inter: int, hidden: int, r_g: int, r_u: int, dtype, device) -> torch.Tensor:
    """An uninitialised ``[2 * inter, hidden + r_g + r_u]`` stacked gate/up weight for
    :func:`fill_gate_up_`."""
    return torch.empty(2 * inter, hidden + r_g + r_u, dtype=dtype, device=device)


def fill_gate_up_(out: torch.Tensor, b_g: torch.Tensor, b_u: torch.Tensor, s_g: float, s_u: float,
                  w_g: torch.Tensor | None = None, w_u: torch.Tensor | None = None) -> torch.Tensor:
    """Write ``[[W_g, s_g B_g, 0], [W_u, 0, s_u B_u]]`` into ``out`` (from
    :func:`empty_gate_up`): ``W_*`` ``[inter, hidden]``, ``B_*`` ``[inter, r_*]``. The
    scaled ``B`` blocks are rounded to ``out``'s dtype once, from float32. Without
    ``w_g``/``w_u`` only the LoRA columns are written: the caller has put the
    bases in ``out[:inter, :hidden]`` and ``out[inter:, :hidden]`` itself (a 4-bit
    base dequantized in place). Returns ``out``."""
    inter, r_g, r_u = b_g.shape[0], b_g.shape[1], b_u.shape[1]
    hidden = out.shape[1] - r_g - r_u
    copy_base = w_g is not None
    if copy_base != (w_u is not None):
        raise ValueError("fill_gate_up_: give both base weights or neither")
    bases = (w_g, w_u) if copy_base else ()
    if (tuple(out.shape) != (2 * inter, hidden + r_g + r_u) or b_u.shape[0] != inter or
            any(tuple(w.shape) != (inter, hidden) for w in bases)):
        raise ValueError(f"fill_gate_up_: B_g {tuple(b_g.shape)}, B_u {tuple(b_u.shape)}"
                         + "".join(f", W {tuple(w.shape)}" for w in bases)
                         + f" do not stack into {tuple(out.shape)}")
    _unit_column_stride(out, b_g, b_u, *bases)
    w_g, w_u = bases if copy_base else (out, out)  # unread placeholders
    if inter:
        _gate_up_weight[(2 * inter,)](
            w_g, w_u, b_g, b_u, out, inter, hidden, r_g, r_u, w_g.stride(0), w_u.stride(0), b_g.stride(0),
            b_u.stride(0), out.stride(0), float(s_g), float(s_u), COPY_BASE=copy_base, BLOCK=_BLOCK,
            BLOCK_R=triton.next_power_of_2(max(r_g + r_u, 16)))
    return out


def gate_up_weight(w_g: torch.Tensor, w_u: torch.Tensor, b_g: torch.Tensor, b_u: torch.Tensor,
                   s_g: float, s_u: float, dtype: torch.dtype) -> torch.Tensor:
    """``[[W_g, s_g B_g, 0], [W_u, 0, s_u B_u]]`` as a new tensor in ``dtype``."""
    out = empty_gate_up(w_g.shape[0], w_g.shape[1], b_g.shape[1], b_u.shape[1], dtype, w_g.device)
    return fill_gate_up_(out, b_g, b_u, s_g, s_u, w_g, w_u)

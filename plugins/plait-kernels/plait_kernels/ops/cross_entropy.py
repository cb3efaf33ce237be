"""Fused linear + cross-entropy: summed loss and all gradients without the full logits.

The ``[tokens, vocab]`` logits of a 128k vocabulary are the largest tensor of a
fine-tuning step. Here only trained rows (labels not ``-100``) go through the
head, a chunk of rows at a time::

    logits_c = hidden_c @ W.T (+ b)                  # [chunk, vocab], freed after the chunk
    kernel:  loss_c = logsumexp(logits_c) - logits_c[label]
             logits_c <- softmax(logits_c) - onehot(label)     # in place: d loss / d logits
    grad_hidden[rows] = logits_c @ W
    grad_W           += logits_c.T @ hidden_c
    grad_b           += logits_c.sum(0)

The gradients are computed during the forward and stored; backward only scales
them by the incoming gradient (the loss is a scalar). A head tied to the input
embedding needs nothing special: autograd adds the head gradient returned here
to the embedding's own.

Optional logit softcapping (Gemma 2) uses ``cap * tanh(logits / cap)``; its
derivative ``1 - (capped / cap)^2`` is folded into the stored gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait_kernels.ops._util import block_size, num_warps, tanh

#: logits elements per chunk (2**27: 256 MiB in bf16), bounding the one big temporary
CHUNK_ELEMENTS = 2**27


@triton.jit
def _softcap(x, cap):
    return cap * tanh(x / cap)


@triton.jit
def _ce_rows(LOGITS, stride, LABELS, LOSS, V, cap, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    label = tl.load(LABELS + row)
    cols = tl.arange(0, BLOCK_V)

    # pass 1: online max and sum of exponentials (a numerically safe logsumexp)
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            # capping maps the -inf padding to -cap: put it back so padding adds nothing
            x = tl.where(mask, _softcap(x, cap), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    x_label = tl.load(base + label).to(tl.float32)
    if HAS_SOFTCAP:
        x_label = _softcap(x_label, cap)
    tl.store(LOSS + row, lse - x_label)

    # pass 2: overwrite the logits with d loss / d logits
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            y = _softcap(x, cap)
            grad = tl.exp(y - lse) - tl.where(offs == label, 1.0, 0.0)
            grad = grad * (1.0 - (y / cap) * (y / cap))
        else:
            grad = tl.exp(x - lse) - tl.where(offs == label, 1.0, 0.0)
        tl.store(base + offs, grad.to(LOGITS.dtype.element_ty), mask=mask)


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk so one chunk's logits hold about :data:`CHUNK_ELEMENTS` values."""
    return max(1, triton.next_power_of_2(CHUNK_ELEMENTS // vocab + 1) // 2)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias``; gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, softcap, chunk_rows, rows_all):
        # rows_all: the trained positions (labels != -100), found by the caller
        vocab = weight.shape[0]
        n = rows_all.numel()
        if n:
            # one host sync for both bounds: each sync leaves the device idle while the host catches up
            low, high = torch.stack(torch.aminmax(labels.index_select(0, rows_all))).tolist()
            if low < 0 or high >= vocab:
                bad = low if low < 0 else high
                raise ValueError(f"label {bad} is outside the vocabulary [0, {vocab}) and is not -100")
        chunk_rows = chunk_rows or default_chunk_rows(vocab)
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        grad_bias = torch.zeros_like(bias) if bias is not None and bias.requires_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        block_v = min(4096, block_size(vocab))
        # One compute dtype for the chunk matmuls: autocast's where it is on (fp16 training keeps float32
        # master weights and may hand float32 hidden states from the final norm), else the inputs'. The
        # in-place gradient updates below take no autocast, so every operand is cast explicitly.
        device_type = hidden.device.type
        compute = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                   else hidden.dtype)
        w = weight.to(compute)
        b = None if bias is None else bias.to(compute)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, n, chunk_rows):
                rows = rows_all[start:start + chunk_rows]
                h = hidden.index_select(0, rows).to(compute)
                logits = h @ w.t()
                if b is not None:
                    logits += b
                row_loss = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
                _ce_rows[(rows.numel(),)](logits, logits.stride(0), labels.index_select(0, rows), row_loss, vocab,
                                          float(softcap or 1.0), HAS_SOFTCAP=bool(softcap), BLOCK_V=block_v,
                                          num_warps=num_warps(block_v))
                loss += row_loss.sum()
                grad_logits = logits  # overwritten in place by the kernel
                if grad_hidden is not None:
                    grad_hidden.index_copy_(0, rows, (grad_logits @ w).to(grad_hidden.dtype))
                if grad_weight is not None:
                    if grad_weight.dtype == compute:
                        grad_weight.addmm_(grad_logits.t(), h)
                    else:  # float32 master weight: the chunk's product is made in the compute dtype
                        grad_weight += (grad_logits.t() @ h).to(grad_weight.dtype)
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0).to(grad_bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_loss.to(torch.float32)

        def scaled(g):
            # always scaled (the loop divides the loss by the step's tokens, so the scale is
            # rarely 1): testing for 1 would cost a host sync at the start of every backward
            return None if g is None else (g * scale).to(g.dtype)

        return scaled(grad_hidden), scaled(grad_weight), None, scaled(grad_bias), None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                               head_bias: torch.Tensor | None = None, softcap: float | None = None,
                               chunk_rows: int | None = None):
    """Summed cross-entropy of ``hidden @ head_weight.T (+ head_bias)`` against ``labels``.

    ``hidden`` ``[tokens, H]``, ``head_weight`` ``[V, H]``, ``labels`` ``[tokens]``
    (already shifted; ``-100`` marks untrained positions). Returns
    ``(loss_sum, n_trained_tokens)`` like core's loss step.
    """
    rows = (labels != -100).nonzero().squeeze(1)  # a host sync, and the count with it
    loss = FusedLinearCrossEntropy.apply(hidden, head_weight, labels, head_bias, softcap, chunk_rows, rows)
    return loss, rows.numel()

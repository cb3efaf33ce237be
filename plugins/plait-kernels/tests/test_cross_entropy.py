"""Fused linear + cross-entropy vs materialised logits + ``F.cross_entropy``."""

import pytest
import torch

from plait_kernels import reference
from plait_kernels.ops.cross_entropy import fused_linear_cross_entropy
from plait_kernels.testing import gpu_test, outputs_and_grads

# the loss is a sum over tokens of float32 log-sum-exps; gradients are one
# float32 matmul of (softmax - onehot) away from the reference
FP32 = dict(atol=1e-5, rtol=1e-5)


def _inputs(tokens, hidden, vocab, dtype, device, masked_every=3, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) / hidden**0.5 * 3
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    if masked_every:
        labels[::masked_every] = -100  # prompt tokens / packing boundaries
    b = torch.randn(vocab, generator=gen) if bias else None
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return to(h), to(w), labels.to(device), to(b)


def _compare(tokens, hidden, vocab, dtype, device, tol, bias=False, softcap=None, chunk_rows=None):
    h, w, labels, b = _inputs(tokens, hidden, vocab, dtype, device, bias=bias)
    inputs = [h, w] + ([b] if bias else [])

    def kernel(h, w, b=None):
        loss, n = fused_linear_cross_entropy(h, w, labels, head_bias=b, softcap=softcap, chunk_rows=chunk_rows)
        assert n == int((labels != -100).sum())
        return loss

    def ref(h, w, b=None):
        return reference.linear_cross_entropy(h.float(), w.float(), labels, None if b is None else b.float(),
                                              softcap=softcap)[0]

    out, grads = outputs_and_grads(kernel, inputs)
    ref_out, ref_grads = outputs_and_grads(ref, inputs)
    assert len(grads) == len(inputs)
    for got, want in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_fused_ce_matches_reference_fp32(bias, softcap, chunk_rows, device):
    # vocab 97 is not a multiple of the kernel's block: the masked tail is exercised
    _compare(23, 32, 97, torch.float32, device, FP32, bias=bias, softcap=softcap, chunk_rows=chunk_rows)


def test_tied_head_gradients_accumulate(device):
    """The head shares the embedding's weight: the embedding gradient must hold
    both the lookup's and the head's contributions."""
    torch.manual_seed(0)
    vocab, hidden, tokens = 61, 16, 19
    ids = torch.randint(0, vocab, (tokens,), device=device)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[:5] = -100
    grads = []
    for loss_fn in (fused_linear_cross_entropy, reference.linear_cross_entropy):
        emb = torch.nn.Embedding(vocab, hidden, device=device)
        torch.nn.init.normal_(emb.weight, generator=torch.Generator(device).manual_seed(1))
        hidden_states = torch.tanh(emb(ids)) * 2  # any function of the lookup
        loss, _ = loss_fn(hidden_states, emb.weight, labels)
        loss.backward()
        grads.append((loss.detach(), emb.weight.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], **FP32)
    torch.testing.assert_close(grads[0][1], grads[1][1], **FP32)
    # both paths contribute: rows only the head touches (never looked up) are non-zero
    unseen = torch.ones(vocab, dtype=torch.bool, device=device)
    unseen[ids] = False
    assert grads[0][1][unseen].abs().sum() > 0


def test_scaled_backward_and_frozen_head(device):
    h, w, labels, _ = _inputs(11, 8, 40, torch.float32, device)
    h.requires_grad_(True)
    loss, _ = fused_linear_cross_entropy(h, w, labels)  # w frozen (LoRA): no weight gradient made
    (loss * 0.25).backward()
    h_ref = h.detach().clone().requires_grad_(True)
    (reference.linear_cross_entropy(h_ref, w, labels)[0] * 0.25).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, **FP32)
    assert w.grad is None


def test_all_tokens_masked_gives_zero_loss_and_grads(device):
    h, w, labels, _ = _inputs(6, 8, 40, torch.float32, device)
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss, n = fused_linear_cross_entropy(h, w, torch.full_like(labels, -100))
    loss.backward()
    assert n == 0 and loss.item() == 0.0
    assert h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


def test_label_outside_vocabulary_is_an_error(device):
    h, w, labels, _ = _inputs(6, 8, 40, torch.float32, device)
    labels[2] = 40
    with pytest.raises(ValueError, match="label 40 is outside the vocabulary"):
        fused_linear_cross_entropy(h, w, labels)


@pytest.mark.parametrize("bias,softcap", [(False, None), (True, 30.0)])
@gpu_test
def test_fused_ce_gpu_bf16(bias, softcap):
    h, w, labels, b = _inputs(4096, 1024, 32000, torch.bfloat16, "cuda", bias=bias)
    inputs = [h, w] + ([b] if bias else [])
    out, grads = outputs_and_grads(
        lambda h, w, b=None: fused_linear_cross_entropy(h, w, labels, head_bias=b, softcap=softcap)[0], inputs)
    ref_out, ref_grads = outputs_and_grads(
        lambda h, w, b=None: reference.linear_cross_entropy(h.float(), w.float(), labels,
                                                            None if b is None else b.float(), softcap)[0], inputs)
    # bf16 logits and gradients: relative error of a few bf16 ulps on the sum and on each gradient
    torch.testing.assert_close(out[0].float(), ref_out[0].float(), atol=0, rtol=1e-2)
    for got, want in zip(grads, ref_grads):
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2 * scale, rtol=2e-2)


@gpu_test
def test_fused_ce_gpu_fp32_large_vocab():
    _compare(2048, 512, 128256, torch.float32, "cuda", dict(atol=1e-4, rtol=1e-4), chunk_rows=512)


def test_fused_ce_under_autocast_with_float32_master_weights(device):
    """fp16/bf16 training keeps float32 weights and may pass float32 hidden
    states (a final norm computed in float32): under autocast the chunk
    matmuls run in autocast's dtype and each gradient comes back in its
    input's dtype, as autograd through the plain head would give."""
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    h, w, labels, _ = _inputs(23, 32, 97, torch.float32, device)
    h.requires_grad_(True)
    w.requires_grad_(True)
    with torch.autocast(device, dtype=dtype):
        loss, _ = fused_linear_cross_entropy(h, w, labels)
    loss.backward()
    h_ref, w_ref = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    with torch.autocast(device, dtype=dtype):
        logits = h_ref @ w_ref.t()
    ref = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    ref.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    # the logits are rounded to the autocast dtype in both: 8 bits of mantissa for bfloat16
    tol = dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(h.grad, h_ref.grad, **tol)
    torch.testing.assert_close(w.grad, w_ref.grad, **tol)

"""The context-parallel attention against full causal attention, in one process.

Each simulated cp rank computes its query slice against the K/V slices of all
ranks with :func:`blockwise_attention` (exactly what ``plait_ring`` does after
its all-gather); the slices are put back in order and compared with SDPA over
the whole sequence with a causal, document-aware mask, in float64, forward
and gradients. Slicing one tensor for every rank makes autograd sum the
gradients of each slice, which is what the all-gather's backward does.
"""

import pytest
import torch
import torch.nn.functional as F

from plait_parallel.context_parallel import (
    blockwise_attention,
    document_ids,
    local_indices,
    padded_length,
    shard_sequence,
)

B, HQ, HKV, S, D = 2, 4, 2, 24, 8


def packed_positions():
    """Row 0: documents of 5, 11 and 8 tokens; row 1: one document of 24."""
    row0 = torch.cat([torch.arange(5), torch.arange(11), torch.arange(8)])
    return torch.stack([row0, torch.arange(S)])


def reference_attention(q, k, v, docs):
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    same_doc = docs[:, :, None] == docs[:, None, :]
    mask = (causal[None] & same_doc)[:, None]
    k = k.repeat_interleave(HQ // HKV, dim=1)
    v = v.repeat_interleave(HQ // HKV, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D ** -0.5)


@pytest.mark.parametrize("size,split,stride", [(2, "contiguous", None), (3, "contiguous", 1),
                                               (2, "zigzag", None), (3, "zigzag", 1)])
def test_blockwise_matches_full_attention(size, split, stride):
    torch.manual_seed(0)
    q = torch.randn(B, HQ, S, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, HKV, S, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, HKV, S, D, dtype=torch.float64, requires_grad=True)
    docs = document_ids(packed_positions())
    weight = torch.randn(B, HQ, S, D, dtype=torch.float64)

    expected = reference_attention(q, k, v, docs)
    expected_grads = torch.autograd.grad((expected * weight).sum(), (q, k, v))

    assert padded_length(S, size, split) == S
    indices = [local_indices(S, size, r, split) for r in range(size)]
    assert torch.equal(torch.cat(indices).sort().values, torch.arange(S))
    got = torch.empty(B, HQ, S, D, dtype=torch.float64)
    pieces = []
    for rank, idx in enumerate(indices):
        out = blockwise_attention(q[:, :, idx], [k[:, :, j] for j in indices], [v[:, :, j] for j in indices],
                                  idx, indices, docs[:, idx], [docs[:, j] for j in indices], D ** -0.5, stride)
        pieces.append((idx, out))
    total = sum((out * weight[:, :, idx]).sum() for idx, out in pieces)
    grads = torch.autograd.grad(total, (q, k, v))
    for idx, out in pieces:
        got[:, :, idx] = out.detach()

    torch.testing.assert_close(got, expected.detach(), atol=1e-12, rtol=1e-10)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)


def test_document_ids_restart_where_positions_do_not_increase():
    docs = document_ids(packed_positions())
    assert docs[0].tolist() == [1] * 5 + [2] * 11 + [3] * 8
    assert docs[1].tolist() == [1] * S


def test_zigzag_layout_balances_causal_work():
    assert local_indices(16, 2, 0, "zigzag").tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert local_indices(16, 2, 1, "zigzag").tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    # visible keys per rank under a causal mask: equal for zigzag
    work = [int((local_indices(16, 2, r, "zigzag") + 1).sum()) for r in range(2)]
    assert work[0] == work[1]


def test_shard_sequence_pads_shifts_then_slices():
    seq = 22  # not a multiple of 2 * cp: padded to 24
    input_ids = torch.arange(100, 100 + seq).repeat(2, 1)
    labels = input_ids.clone()
    labels[:, :3] = -100
    positions = torch.cat([torch.arange(10), torch.arange(12)]).repeat(2, 1)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": positions,
             "attention_mask": torch.ones_like(input_ids)}
    shards = [shard_sequence(batch, 2, r, "zigzag") for r in range(2)]
    total = padded_length(seq, 2, "zigzag")
    assert total == 24
    full = {key: torch.empty(2, total, dtype=torch.long) for key in ("input_ids", "position_ids", "shift_labels")}
    for rank, shard in enumerate(shards):
        assert "attention_mask" not in shard and shard["input_ids"].shape == (2, 12)
        for key in full:
            full[key][:, local_indices(total, 2, rank, "zigzag")] = shard[key]
    assert torch.equal(full["input_ids"][:, :seq], input_ids)
    assert torch.equal(full["input_ids"][:, seq:], torch.zeros(2, 2, dtype=torch.long))
    assert full["position_ids"][0, seq:].tolist() == [12, 13]  # the last document goes on
    assert torch.equal(full["shift_labels"][:, :seq - 1], labels[:, 1:])
    assert (full["shift_labels"][:, seq - 1:] == -100).all()

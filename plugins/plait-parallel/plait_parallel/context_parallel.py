"""Context parallelism: each rank of the ``cp`` mesh dimension holds a slice of
every sequence, and attention is computed against the keys and values of all
slices.

torch's own ``context_parallel`` has no CPU path for causal SDPA and flex
attention has no CPU backward, so the attention here is plain torch ops,
registered through transformers' public ``AttentionInterface`` as
``"plait_ring"``. It all-gathers K/V over the cp group (one collective, with
an autograd backward that sums each slice's gradient back to its owner), then
walks the gathered slices block by block, merging partial results with the
online log-sum-exp rule ring attention uses::

    lse = logaddexp(lse, lse_j)
    out = out * exp(lse_old - lse) + out_j * exp(lse_j - lse)

so only one block of scores ``[q_local, k_block]`` exists at a time, and
blocks a query cannot see (the causal future) are skipped.

Masking is by *global* token index (causal) and by *document*: a new document
starts wherever ``position_ids`` do not increase, so packed rows
(``sample_packing``) never attend across their boundaries. Right padding needs
no mask (pad tokens come after every real token and carry no label).

Layouts of a padded sequence of length S over C ranks::

    contiguous   rank r: [r*S/C, (r+1)*S/C)
    zigzag       chunks of S/(2C); rank r: chunk r and chunk 2C-1-r
                 (every rank gets the same amount of causal work)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATTENTION_NAME = "plait_ring"
#: finite "minus infinity": exp() of it is exactly 0, and its gradients stay finite
_MASKED = -1e30


@dataclass
class CPState:
    """What the attention function needs to know, stored on each attention module."""

    group: Any
    size: int
    rank: int
    split: str = "contiguous"
    heads_k_stride: int | None = None


# ---------------------------------------------------------------- layouts


def padded_length(seq_len: int, size: int, split: str) -> int:
    """Smallest length >= ``seq_len`` the layout can split evenly."""
    unit = size * (2 if split == "zigzag" else 1)
    return -(-seq_len // unit) * unit


def local_indices(seq_len: int, size: int, rank: int, split: str):
    """Global token indices rank ``rank`` holds (``seq_len`` already padded)."""
    import torch

    if split == "zigzag":
        chunk = seq_len // (2 * size)
        first = torch.arange(rank * chunk, (rank + 1) * chunk)
        second = torch.arange((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk)
        return torch.cat([first, second])
    if split != "contiguous":
        raise ValueError(f"unknown context-parallel split {split!r}")
    part = seq_len // size
    return torch.arange(rank * part, (rank + 1) * part)


def document_ids(position_ids):
    """``[b, S]`` document number of each token: a new one starts where positions do not increase."""
    import torch

    starts = torch.ones_like(position_ids, dtype=torch.long)
    starts[:, 1:] = (position_ids[:, 1:] <= position_ids[:, :-1]).long()
    return starts.cumsum(dim=1)


# --------------------------------------------------------- batch sharding

#: ``[b, S]`` columns that are sliced
_SEQUENCE_KEYS = ("input_ids", "labels", "position_ids", "shift_labels")
#: masks and boundaries describing the whole sequence; ``plait_ring`` rebuilds
#: them from ``position_ids``, so they are dropped (a 4-D packed mask, a flex
#: BlockMask, flash varlen boundaries)
_WHOLE_SEQUENCE_MASKS = ("attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                         "seq_lens")


def shard_batch_for_context_parallel(batch: dict, mesh, split: str) -> dict:
    """This rank's slice of ``batch`` along the sequence dimension.

    ``batch`` holds ``[b, S]`` tensors: ``input_ids``, ``labels`` and
    optionally ``position_ids`` (made ``0..S-1`` when absent; keep packed
    rows' restarting ids). ``attention_mask`` (2-D padding or 4-D packed) and
    packing boundaries are dropped: the attention rebuilds the mask from
    ``position_ids``, and right padding needs none (module docstring). The sequence is padded to a multiple the
    layout accepts (pad id 0, label -100, positions continuing).

    Labels are shifted **before** slicing, because the next token of a
    slice's last token lives on another rank: the result has
    ``shift_labels`` (already shifted; use these for the loss, do not shift
    again) and ``labels`` (the unshifted slice, for reference).
    ``split`` (``"zigzag"`` or ``"contiguous"``) must be the one the
    attention was set up with: :func:`plait_parallel.config.ring_split` of the config.
    The model must be called with the returned ``position_ids``.
    """
    size = mesh["cp"].size()
    if size == 1:
        return batch
    return shard_sequence(batch, size, mesh["cp"].get_local_rank(), split)


def shard_sequence(batch: dict, size: int, rank: int, split: str = "contiguous") -> dict:
    """:func:`shard_batch_for_context_parallel` for an explicit cp ``size`` and ``rank``."""
    import torch

    input_ids = batch["input_ids"]
    b, s = input_ids.shape
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(s, device=input_ids.device)
    position_ids = position_ids.expand(b, s)
    out = {k: v for k, v in batch.items() if k not in _SEQUENCE_KEYS and k not in _WHOLE_SEQUENCE_MASKS}
    columns = {"input_ids": input_ids, "position_ids": position_ids}
    if "labels" in batch:
        labels = batch["labels"]
        shifted = torch.full_like(labels, -100)
        shifted[:, :-1] = labels[:, 1:]
        columns["labels"] = labels
        columns["shift_labels"] = batch.get("shift_labels", shifted)
    total = padded_length(s, size, split)
    if total > s:
        extra = total - s
        pad = {
            "input_ids": torch.zeros(b, extra, dtype=input_ids.dtype, device=input_ids.device),
            "position_ids": position_ids[:, -1:] + torch.arange(1, extra + 1, device=input_ids.device),
        }
        for key in ("labels", "shift_labels"):
            if key in columns:
                pad[key] = torch.full((b, extra), -100, dtype=columns[key].dtype, device=input_ids.device)
        columns = {k: torch.cat([v, pad[k].to(v.dtype)], dim=1) for k, v in columns.items()}
    index = local_indices(total, size, rank, split).to(input_ids.device)
    for key, value in columns.items():
        out[key] = value.index_select(1, index).contiguous()
    return out


# -------------------------------------------------------------- attention


def _gather_along_sequence(tensor, state: CPState):
    """All-gather ``tensor`` over the cp group; differentiable."""
    import torch
    import torch.distributed as dist

    class _Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, local):
            local = local.contiguous()
            parts = [torch.empty_like(local) for _ in range(state.size)]
            dist.all_gather(parts, local, group=state.group)
            return tuple(parts)

        @staticmethod
        def backward(ctx, *grads):
            # every rank holds a gradient for every slice; the owner needs their sum.
            # contiguous: gloo mishandles strided gradients here
            stacked = torch.stack([g.contiguous() for g in grads])
            dist.all_reduce(stacked, group=state.group)
            return stacked[state.rank]

    return _Gather.apply(tensor)


def blockwise_attention(query, key_blocks, value_blocks, q_index, k_indices, q_doc, k_docs, scaling,
                        heads_k_stride=None):
    """Causal, document-masked attention of local queries over K/V blocks.

    ``query`` ``[b, hq, s, d]``; ``key_blocks``/``value_blocks`` lists of
    ``[b, hkv, s_j, d]`` (GQA: ``hq`` a multiple of ``hkv``); ``q_index``
    ``[s]`` and ``k_indices`` lists of ``[s_j]`` global token indices;
    ``q_doc`` ``[b, s]`` and ``k_docs`` lists of ``[b, s_j]`` document ids.
    ``heads_k_stride`` K/V heads are processed at a time (all by default).
    Returns ``[b, hq, s, d]`` in ``query``'s dtype.
    """
    import torch

    compute = torch.promote_types(query.dtype, torch.float32)
    b, hq, s, d = query.shape
    hkv = key_blocks[0].shape[1]
    n_rep = hq // hkv
    stride = heads_k_stride or hkv
    visible = [
        (k_idx[None, None, :] <= q_index[None, :, None]) & (q_doc[:, :, None] == k_doc[:, None, :])
        for k_idx, k_doc in zip(k_indices, k_docs)
    ]  # [b, s, s_j] each
    outputs = []
    for h0 in range(0, hkv, stride):
        h1 = min(hkv, h0 + stride)
        q = query[:, h0 * n_rep:h1 * n_rep].to(compute)
        out = lse = None
        for allowed, keys, values in zip(visible, key_blocks, value_blocks):
            if not bool(allowed.any()):
                continue  # a block entirely in this rank's causal future
            k = keys[:, h0:h1].to(compute).repeat_interleave(n_rep, dim=1)
            v = values[:, h0:h1].to(compute).repeat_interleave(n_rep, dim=1)
            scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
            scores = scores.masked_fill(~allowed[:, None], _MASKED)
            block_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
            block_out = torch.matmul(torch.exp(scores - block_lse), v)
            if out is None:
                out, lse = block_out, block_lse
                continue
            new_lse = torch.logaddexp(lse, block_lse)
            out = out * torch.exp(lse - new_lse) + block_out * torch.exp(block_lse - new_lse)
            lse = new_lse
        outputs.append(out)
    return torch.cat(outputs, dim=1).to(query.dtype)


def plait_ring_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None,
                         **kwargs):
    """transformers attention function (``AttentionInterface``) for context parallel.

    Receives this rank's slice of queries, keys and values; returns
    ``(attn_output [b, s, hq, d], None)`` like the built-in functions.
    ``attention_mask`` is ignored (masks are rebuilt from ``position_ids``).
    """
    import torch
    import torch.distributed as dist

    state: CPState | None = getattr(module, "_plait_cp", None)
    if state is None:
        raise RuntimeError("attention 'plait_ring' is only usable after wrap_parallel set up context parallelism")
    if position_ids is None:
        raise RuntimeError("context parallel needs position_ids: pass the batch through "
                           "shard_batch_for_context_parallel and give the model its position_ids")
    if dropout:
        raise RuntimeError("plait_ring attention has no dropout; set attention_dropout to 0")
    b, _, s, d = query.shape
    scaling = d ** -0.5 if scaling is None else scaling
    total = s * state.size
    positions = position_ids.expand(b, s).contiguous()
    gathered_pos = [torch.empty_like(positions) for _ in range(state.size)]
    dist.all_gather(gathered_pos, positions, group=state.group)
    indices = [local_indices(total, state.size, r, state.split).to(query.device) for r in range(state.size)]
    global_pos = torch.empty(b, total, dtype=positions.dtype, device=positions.device)
    for idx, pos in zip(indices, gathered_pos):
        global_pos[:, idx] = pos
    docs = document_ids(global_pos)
    k_docs = [docs[:, idx] for idx in indices]
    keys = _gather_along_sequence(key, state)
    values = _gather_along_sequence(value, state)
    out = blockwise_attention(query, keys, values, indices[state.rank], indices, k_docs[state.rank], k_docs,
                              scaling, state.heads_k_stride)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """Mask function for ``plait_ring``: masks are built inside the attention."""
    return None


def register_attention() -> None:
    """Register ``plait_ring`` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, plait_ring_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


def _pretrained(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def enable_context_parallel(model, cp_mesh, split: str = "contiguous", heads_k_stride: int | None = None) -> int:
    """Switch ``model`` to ``plait_ring`` attention over ``cp_mesh``; returns the
    number of attention modules set up."""
    import torch.distributed as dist

    register_attention()
    group = cp_mesh.get_group()
    state = CPState(group=group, size=cp_mesh.size(), rank=dist.get_rank(group), split=split,
                    heads_k_stride=heads_k_stride)
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx"):
            module._plait_cp = state
            count += 1
    if count == 0:
        from plait.errors import ConfigError

        raise ConfigError("context_parallel_size > 1: no attention module of this model could be switched to "
                          "plait_ring (its attention must follow transformers' AttentionInterface)")
    _pretrained(model).set_attn_implementation(ATTENTION_NAME)
    return count

"""Per-sequence log-probabilities from the backbone's hidden states.

Only the positions a loss needs go through the LM head, a chunk at a time,
and each chunk is recomputed in the backward pass (activation checkpointing),
so at most ``chunk_size x vocab`` logits exist at once, never
``batch x seq x vocab``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: keys the collator adds for the objective; the model never sees them
SEGMENT_KEYS = ("segment_index", "segment_roles")


@dataclass
class SegmentLogps:
    """Sums over each segment (sequence) of a micro-batch, in segment order."""

    completion: object  # [S] summed log-probs of the response tokens
    completion_tokens: object  # [S] how many response tokens
    whole: object = None  # [S] summed log-probs of every token after the first (ORPO's NLL), when asked
    whole_tokens: object = None
    outputs: object = None  # what the model's forward returned (for extra_loss)


def _token_logps(hidden, weight, targets):
    import torch
    import torch.nn.functional as F

    logits = F.linear(hidden, weight).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chunked_token_logps(hidden, weight, targets, chunk_size: int = 2048):
    """``log p(targets | hidden)`` for ``hidden [N, H]``, a chunk at a time."""
    import torch
    from torch.utils.checkpoint import checkpoint

    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            parts.append(checkpoint(_token_logps, h, weight, t, use_reentrant=False))
        else:
            parts.append(_token_logps(h, weight, t))
    if not parts:
        return hidden.new_zeros((0,), dtype=torch.float32)
    return torch.cat(parts)


def segment_logps(model, batch: dict, *, whole_roles=()) -> SegmentLogps:
    """Run ``model`` on a collated preference micro-batch (already on its
    device) and sum the log-probabilities per segment.

    ``whole_roles``: segment roles whose every token after the first is also
    scored (``whole``), for ORPO's NLL over prompt and response.
    """
    import torch

    from plait.model.forward import forward_hidden

    inputs = {k: v for k, v in batch.items() if k not in ("labels", *SEGMENT_KEYS)}
    hidden, head, outputs = forward_hidden(model, inputs)
    weight = head.weight
    weight = weight.to_local() if hasattr(weight, "to_local") else weight
    segments = batch["segment_index"]
    n_segments = batch["segment_roles"].shape[0]
    # position t predicts token t+1: score where token t+1 is a response token
    targets = batch["input_ids"][:, 1:]
    completion = batch["labels"][:, 1:] != -100
    target_segment = segments[:, 1:]
    needed = completion
    whole = None
    if whole_roles:
        roles = batch["segment_roles"]
        same = (target_segment == segments[:, :-1]) & (target_segment >= 0)
        wanted = torch.zeros_like(roles, dtype=torch.bool)
        for role in whole_roles:
            wanted |= roles == role
        whole = same & wanted[target_segment.clamp(min=0)]
        needed = completion | whole
    logps = chunked_token_logps(hidden[:, :-1][needed], weight, targets[needed])
    index = target_segment[needed]

    def per_segment(mask_of_needed):
        sums = logps.new_zeros(n_segments).index_add(0, index[mask_of_needed], logps[mask_of_needed])
        counts = torch.zeros(n_segments, dtype=torch.long, device=logps.device).index_add(
            0, index[mask_of_needed], torch.ones_like(index[mask_of_needed]))
        return sums, counts

    completion_sums, completion_counts = per_segment(completion[needed])
    result = SegmentLogps(completion_sums, completion_counts, outputs=outputs)
    if whole is not None:
        result.whole, result.whole_tokens = per_segment(whole[needed])
    return result

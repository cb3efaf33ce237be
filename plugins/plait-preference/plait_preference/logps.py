"""Per-sequence log-probabilities from the backbone's hidden states.

Only the positions a loss needs go through the LM head, a chunk at a time,
and each chunk is recomputed in the backward pass, so at most one
``chunk x vocab`` float32 buffer (``CHUNK_ELEMENTS``) exists at once, never
``batch x seq x vocab``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: keys the collator adds for the objective; the model never sees them
SEGMENT_KEYS = ("segment_index", "segment_roles", "ref_logps")


@dataclass
class SegmentLogps:
    """Sums over each segment (sequence) of a micro-batch, in segment order."""

    completion: object  # [S] summed log-probs of the response tokens
    completion_tokens: object  # [S] how many response tokens
    whole: object = None  # [S] summed log-probs of every token after the first (ORPO's NLL), when asked
    whole_tokens: object = None
    outputs: object = None  # what the model's forward returned (for extra_loss)


#: float32 logits one chunk may hold (128 MiB): a chunk has this // vocab tokens, so the
#: transient memory of the head stays about the same whatever the vocabulary
CHUNK_ELEMENTS = 2**25


def chunk_tokens(vocab: int) -> int:
    return max(16, CHUNK_ELEMENTS // max(vocab, 1))


def _compute_dtype(hidden):
    """The matmul dtype autograd would use here: autocast's where it is on."""
    import torch

    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class _TokenLogps:
    """``log softmax(hidden @ W.T + bias)[target]`` per token, chunk by chunk.

    Built as an autograd Function (``torch.autograd.Function`` subclass made on
    first use, so importing this module does not import torch). Forward keeps
    only each token's log-sum-exp; backward recomputes a chunk's logits and
    turns them into their gradient in place (``onehot(target) - softmax``,
    scaled), so one chunk holds one float32 ``[chunk, vocab]`` buffer (plus its
    low-precision copy under bf16) instead of the five or so that autograd
    through ``logsumexp`` and ``gather`` keeps (input, exp, the two branch
    gradients and their sum).
    """

    _function = None

    @classmethod
    def apply(cls, *args):
        if cls._function is None:
            cls._function = _make_function()
        return cls._function.apply(*args)


def _chunk_logits(h, weight, bias, softcap):
    """Float32 logits of one chunk (a fresh tensor the caller may overwrite), and
    ``tanh`` of the soft cap when there is one (for the backward)."""
    import torch
    import torch.nn.functional as F

    logits = F.linear(h, weight, bias)
    if logits.dtype != torch.float32:
        logits = logits.float()
    if not softcap:
        return logits, None
    tanh = logits.div_(softcap).tanh_()
    return tanh * softcap, tanh


def _make_function():
    import torch

    class TokenLogps(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, chunk, softcap):
            dtype = _compute_dtype(hidden)
            with torch.autocast(hidden.device.type, enabled=False):
                w = weight.to(dtype)
                b = None if bias is None else bias.to(dtype)
                n = hidden.shape[0]
                out = torch.empty(n, dtype=torch.float32, device=hidden.device)
                lse = torch.empty_like(out)
                for start in range(0, n, chunk):
                    end = min(start + chunk, n)
                    logits, _ = _chunk_logits(hidden[start:end].to(dtype), w, b, softcap)
                    target = logits.gather(1, targets[start:end, None])[:, 0]
                    # log-sum-exp in place: max, then log(sum(exp(x - max))) + max (torch.logsumexp's steps)
                    top = logits.amax(1, keepdim=True)
                    chunk_lse = logits.sub_(top).exp_().sum(1).log_().add_(top[:, 0])
                    lse[start:end] = chunk_lse
                    out[start:end] = target - chunk_lse
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
            ctx.chunk, ctx.softcap, ctx.dtype = chunk, softcap, dtype
            return out

        @staticmethod
        def backward(ctx, grad_out):
            hidden, weight, bias, targets, lse = ctx.saved_tensors
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            dtype, softcap, chunk = ctx.dtype, ctx.softcap, ctx.chunk
            grad_out = grad_out.float()
            with torch.autocast(hidden.device.type, enabled=False):
                w = weight.to(dtype)
                b = None if bias is None else bias.to(dtype)
                grad_h = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
                # summed over chunks in the weight's own dtype, as autograd accumulates a parameter's
                # gradient (float32 master weights under autocast: float32)
                grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
                grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
                for start in range(0, hidden.shape[0], chunk):
                    end = min(start + chunk, hidden.shape[0])
                    h = hidden[start:end].to(dtype)
                    g = grad_out[start:end, None]
                    logits, tanh = _chunk_logits(h, w, b, softcap)
                    # d logp[target] / d logits = onehot(target) - softmax, times the incoming gradient
                    grad = logits.sub_(lse[start:end, None]).exp_().mul_(-g)
                    grad.scatter_add_(1, targets[start:end, None], g)
                    if tanh is not None:  # through softcap * tanh(z / softcap)
                        grad.mul_(tanh.square_().neg_().add_(1))
                    if need_b:
                        grad_b += grad.sum(0)
                    grad = grad.to(dtype)
                    if need_h:
                        torch.mm(grad, w, out=grad_h[start:end])
                    if need_w and grad_w.dtype == dtype:
                        grad_w.addmm_(grad.t(), h)
                    elif need_w:
                        grad_w += grad.t() @ h
            return (None if grad_h is None else grad_h.to(hidden.dtype),
                    grad_w,
                    None if grad_b is None else grad_b.to(bias.dtype), None, None, None)

    return TokenLogps


def chunked_token_logps(hidden, weight, targets, chunk_size: int | None = None, *, bias=None,
                        softcap: float | None = None):
    """``log p(targets | hidden)`` for ``hidden [N, H]`` through the head
    ``weight [V, H]`` (+ ``bias``, then Gemma 2's ``softcap`` where set), as
    float32 ``[N]``; ``chunk_size`` tokens at a time (default: ``chunk_tokens(V)``)."""
    if hidden.shape[0] == 0:
        # keep the graph connected so backward works on a micro-batch with nothing to score
        return (hidden.sum() * 0.0).float().expand(0)
    chunk = chunk_size or chunk_tokens(weight.shape[0])
    return _TokenLogps.apply(hidden, weight, bias, targets, chunk, softcap)


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
    from plait.model.head import head_options

    weight = head.weight
    weight = weight.to_local() if hasattr(weight, "to_local") else weight
    options = head_options(model)
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
    logps = chunked_token_logps(hidden[:, :-1][needed], weight, targets[needed], bias=options.get("head_bias"),
                                softcap=options.get("softcap"))
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

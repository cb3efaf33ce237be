"""Per-sequence log-probabilities from the backbone's hidden states.

Only the positions a loss needs go through the LM head, a chunk at a time,
and each chunk is recomputed in the backward pass, so at most one
``chunk x vocab`` float32 buffer (``CHUNK_ELEMENTS``) exists at once, never
``batch x seq x vocab``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: keys the collator adds for the objective; the model never sees them
SEGMENT_KEYS = ("segment_index", "segment_roles", "ref_logps", "scoring_plan")


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
#: chunks are a whole number of this many tokens: the GPU's matmul tiles are 64 to 256 rows,
#: and a chunk just over a multiple (261 tokens at a 128k vocabulary) ran the head's
#: matmuls at a third of their speed on an H100, mostly computing empty tiles
CHUNK_MULTIPLE = 128


def chunk_tokens(vocab: int) -> int:
    fits = CHUNK_ELEMENTS // max(vocab, 1)
    return max(16, fits // CHUNK_MULTIPLE * CHUNK_MULTIPLE if fits >= CHUNK_MULTIPLE else fits)


def _compute_dtype(hidden):
    """The matmul dtype autograd would use here: autocast's where it is on."""
    import torch

    device = hidden.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _autocast_off(device_type: str):
    """Autocast switched off on ``device_type``; nothing to switch off where it has
    none (the ``meta`` device, on which the sync tests run a step: see
    tests/test_objective.py::test_step_waits_for_no_device)."""
    import contextlib

    import torch

    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


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
            with _autocast_off(hidden.device.type):
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
            with _autocast_off(hidden.device.type):
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


@dataclass
class ScoringPlan:
    """Which hidden states of a micro-batch go through the head, worked out on
    the host from the CPU batch, before it moves.

    Boolean-mask indexing on the device (``hidden[mask]``) waits for the device
    to count the mask, several host syncs per forward; with the positions known
    beforehand, the forward, the head and the sums are all queued without one.
    """

    positions: object  # [P] flat index into [B * W] of each hidden state whose next token is scored
    targets: object  # [P] that next token
    segment: object  # [P] the segment it belongs to
    completion: object  # [P] 1.0 where the scored token is a response token, else 0.0
    completion_tokens: object  # [S] response tokens of each segment
    n_segments: int
    whole: object = None  # [P] 1.0 where ORPO's whole-sequence NLL counts the token (when asked)
    whole_tokens: object = None
    #: [C] and [R]: the chosen and the rejected segments, in order (pairs: what the objective compares)
    chosen: object = None
    rejected: object = None
    #: every scored token is a response token (``completion`` all ones): its sums need no mask
    completion_only: bool = False

    def to(self, device) -> "ScoringPlan":
        """The plan on ``device``: its tensors in one copy per dtype (each copy
        is a transfer the device queues, and a launch), split into views there."""
        tensors = {name: value for name, value in vars(self).items() if hasattr(value, "to")}
        moved = move_together(list(tensors.values()), device)
        return ScoringPlan(**{**vars(self), **dict(zip(tensors, moved))})


def move_together(tensors: list, device) -> list:
    """``tensors`` on ``device``: those of a dtype concatenated on the host,
    moved in one copy (core's :func:`plait.data.batching.move_to_device`),
    and split back into views of their own shapes; the same values."""
    import torch

    from plait.data.batching import move_to_device as move

    out = list(tensors)
    by_dtype: dict = {}
    for i, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(i)
    for indices in by_dtype.values():
        if len(indices) == 1:
            out[indices[0]] = move(tensors[indices[0]], device)
            continue
        flat = move(torch.cat([tensors[i].reshape(-1) for i in indices]), device)
        pieces = flat.split([tensors[i].numel() for i in indices])
        for i, piece in zip(indices, pieces):
            out[i] = piece.view(tensors[i].shape)
    return out


def scoring_plan(batch: dict, *, whole_roles=()) -> ScoringPlan:
    """The :class:`ScoringPlan` of a collated micro-batch (CPU tensors).

    ``whole_roles``: segment roles whose every token after the first is also
    scored (``whole``), for ORPO's NLL over prompt and response.
    """
    import torch

    from plait_preference.rows import CHOSEN, REJECTED

    input_ids, segments = batch["input_ids"], batch["segment_index"]
    roles = batch["segment_roles"]
    width = input_ids.shape[1]
    # position t predicts token t+1: score where token t+1 is a response token
    completion = torch.zeros_like(segments, dtype=torch.bool)
    completion[:, :-1] = batch["labels"][:, 1:] != -100
    needed = completion
    whole = None
    if whole_roles:
        same = torch.zeros_like(completion)
        same[:, :-1] = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] >= 0)
        wanted = torch.zeros_like(roles, dtype=torch.bool)
        for role in whole_roles:
            wanted |= roles == role
        whole = same & wanted[segments.clamp(min=0)]
        needed = completion | whole
    positions = needed.reshape(-1).nonzero()[:, 0]
    segment = torch.zeros_like(segments)
    segment[:, :-1] = segments[:, 1:]  # the segment of the token being predicted
    segment = segment.reshape(-1)[positions]
    n_segments = int(roles.shape[0])

    def counts(flags):
        return torch.zeros(n_segments, dtype=torch.long).index_add(0, segment, flags.to(torch.long))

    scored_completion = completion.reshape(-1)[positions]
    plan = ScoringPlan(positions=positions, targets=input_ids.reshape(-1)[positions + 1], segment=segment,
                       completion=scored_completion.to(torch.float32),
                       completion_tokens=counts(scored_completion), n_segments=n_segments,
                       chosen=(roles == CHOSEN).nonzero()[:, 0], rejected=(roles == REJECTED).nonzero()[:, 0],
                       completion_only=bool(scored_completion.all()))
    if whole is not None:
        scored_whole = whole.reshape(-1)[positions]
        plan.whole, plan.whole_tokens = scored_whole.to(torch.float32), counts(scored_whole)
    return plan


def segment_logps(model, batch: dict, plan: ScoringPlan) -> SegmentLogps:
    """Run ``model`` on a collated preference micro-batch and sum the
    log-probabilities per segment as ``plan`` says; ``batch`` and ``plan`` are
    on the model's device."""
    from plait.model.forward import forward_hidden
    from plait.model.head import head_options

    inputs = {k: v for k, v in batch.items() if k not in ("labels", *SEGMENT_KEYS)}
    hidden, head, outputs = forward_hidden(model, inputs)
    weight = head.weight
    weight = weight.to_local() if hasattr(weight, "to_local") else weight
    options = head_options(model)
    scored = hidden.reshape(-1, hidden.shape[-1]).index_select(0, plan.positions)
    logps = chunked_token_logps(scored, weight, plan.targets, bias=options.get("head_bias"),
                                softcap=options.get("softcap"))

    def per_segment(flags):
        # into zeros in place (one kernel less than index_add's copy); no mask where every token counts
        return logps.new_zeros(plan.n_segments).index_add_(0, plan.segment, logps if flags is None else logps * flags)

    completion = per_segment(None if plan.completion_only else plan.completion)
    result = SegmentLogps(completion, plan.completion_tokens, outputs=outputs)
    if plan.whole is not None:
        result.whole, result.whole_tokens = per_segment(plan.whole), plan.whole_tokens
    return result

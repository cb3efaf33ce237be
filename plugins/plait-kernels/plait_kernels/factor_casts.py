"""LoRA factors in the compute dtype, cast once per optimizer step.

Adapters train in float32 over a bfloat16 base, and every fused LoRA path
(``lora_linear``, ``lora_mlp``) multiplies with its ``A`` and ``B`` in the
compute dtype. Cast where they are used, a checkpointed layer casts each
factor in its forward, again in the recompute pass and again in backward:
about 20 tiny kernels a decoder layer a step that compute nothing new, each a
launch the host pays for (a slow host left the GPU idle half of a 1B DPO step;
``bench/RESULTS.md``). Inside a training run the factors change only at the
optimizer's update, so one cast per factor per step gives the same values.

The training loop turns the cache on for a single-process run
(:func:`hold_for_run`, through plait-kernels' ``install_step_hooks``; with
several processes a sharding wrapper frees and gathers parameters within a
step, and each use casts as before) and every optimizer step empties it;
elsewhere (evaluation outside training, tests, a user's own loop) each call
casts as before. A cached copy is also checked against its source's version
counter and storage, so an in-place change within a step is never missed, and
under ``torch.compile`` nothing is cached (the compiler fuses the casts itself).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: cache key (where the sources' values live, the dtype) -> (the sources' versions, the cast or stacked
#: tensor, the sources)
_copies: dict[tuple, tuple] = {}
_holders = 0


def _place(t: torch.Tensor) -> tuple:
    # by memory, not by Python object: autograd hands backward (and a checkpoint's
    # recompute) other tensor objects over the same parameter storage
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


def in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, cast once per optimizer step while a run holds the cache."""
    if t.dtype == dtype:
        return t
    return stacked((t,), dtype)


def stacked(parts: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``torch.cat(parts).to(dtype)`` in one launch, once per optimizer step while a
    run holds the cache (the stacked ``A`` of projections that share an input)."""
    if not _holders or torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(p.requires_grad for p in parts)):
        # outside an autograd function's forward/backward the cast would carry a graph,
        # which must not outlive its call
        return _cast(parts, dtype)
    key = (tuple(_place(p) for p in parts), dtype)
    state = tuple(p._version for p in parts)  # shared by every tensor object over the parameter
    hit = _copies.get(key)
    if hit is not None and hit[0] == state:
        return hit[1]
    # the entry holds its sources: while it lives their memory cannot be handed to
    # another tensor, so an equal key is the same memory, not a reuse of its address
    out = _copies[key] = (state, _cast(parts, dtype), tuple(parts))
    return out[1]


def _cast(parts: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0].to(dtype)
    rows = sum(p.shape[0] for p in parts)
    out = torch.empty((rows, *parts[0].shape[1:]), dtype=dtype, device=parts[0].device)
    return torch.cat(list(parts), out=out)  # cat casts into out: one launch, not a cat and a cast


def clear() -> None:
    """Forget every cached copy (the factors are about to change, or the run ended)."""
    _copies.clear()


class _Hold:
    """A run's hold on the cache; ``remove()`` lets go (the loop calls it when training ends)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        global _holders
        _holders += 1
        # after each update: nothing cast from the old factors reaches the next forward
        self._hook = optimizer.register_step_post_hook(lambda *_: clear())
        self._held = True

    def remove(self) -> None:
        global _holders
        if self._held:
            self._held = False
            _holders -= 1
            self._hook.remove()
            clear()


def hold_for_run(optimizer: torch.optim.Optimizer) -> _Hold:
    """Turn the cache on until the returned handle's ``remove()``; emptied at every
    step of ``optimizer`` (the one that updates the factors)."""
    clear()
    return _Hold(optimizer)

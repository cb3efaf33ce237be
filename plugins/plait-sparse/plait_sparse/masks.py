"""Keeping the pruned entries of the targeted parameters at zero.

:class:`SparsityKeeper` hangs on the run's optimizer (torch's step pre- and
post-hooks), so it acts on every rank, whoever built the optimizer:

* before the optimizer step numbered ``start`` (0-based: after ``start``
  steps) it records each targeted parameter's mask, ``|w| > 1e-8``;
* before every step from then on it zeroes the masked entries' gradients, so
  the optimizer's moments for them stay zero (Adam's update of a pruned entry
  is then exactly zero, and its state never pushes it off zero later);
* after every step it multiplies the parameters by their masks, which puts
  back any change an optimizer makes without a gradient (weight decay of a
  non-zero, quantized 8-bit moments, momentum of a step before ``start``).

The masks are computed from the parameters as the loop holds them (a
``DTensor`` shard under FSDP2 gives a mask of the same sharding), so the
elementwise products need no gathering. A resumed run records them again
from the checkpoint's weights, whose pruned entries are already zero.
"""

from __future__ import annotations

from plait_sparse.recipe import EPSILON, ConstantPruning


def targeted_parameters(model, modifier: ConstantPruning) -> dict:
    """``{name: parameter}`` of the trainable parameters ``modifier`` targets
    (names as in the unwrapped causal LM, Axolotl's); ConfigError naming a
    target that selects none."""
    from plait.errors import ConfigError
    from plait.model.forward import unwrap

    causal_lm = unwrap(model)
    chosen, used = {}, set()
    for module_name, module in causal_lm.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            target = modifier.matches(name, type(module).__name__)
            if target is None:
                continue
            used.add(target)
            if param.requires_grad:
                chosen[name] = param
    missed = [target for target in modifier.targets if target not in used]
    if missed:
        raise ConfigError(f"config key '{modifier.where}.targets': {', '.join(map(repr, missed))} selects no "
                          f"parameter of {type(causal_lm).__name__} (names look like "
                          f"{next(n for n, _ in causal_lm.named_parameters())!r})")
    if not chosen:
        raise ConfigError(f"config key '{modifier.where}.targets': every parameter it selects is frozen; sparse "
                          f"fine-tuning keeps the zeros of parameters that train")
    return chosen


class SparsityKeeper:
    """Masks ``params`` (``{name: parameter}``) for the steps ``modifier`` is active."""

    def __init__(self, params: dict, modifier: ConstantPruning, step_now):
        self.params, self.modifier, self.step_now = params, modifier, step_now
        self.masks: dict = {}
        self.handles = []

    def attach(self, optimizer) -> list:
        """Hang on ``optimizer``; returns the hooks' handles (``detach`` removes them too)."""
        self.handles = [optimizer.register_step_pre_hook(self._before_step),
                        optimizer.register_step_post_hook(self._after_step)]
        return list(self.handles)

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.masks = [], {}

    def _before_step(self, optimizer, args, kwargs) -> None:
        import torch

        step = self.step_now()
        if not self.modifier.active(step):
            self.masks = {}  # past ``end``: the pruned entries may train again
            return
        with torch.no_grad():
            if not self.masks:
                self.masks = {name: param.detach().abs() > EPSILON for name, param in self.params.items()}
            for name, param in self.params.items():
                if param.grad is not None:
                    param.grad.mul_(self.masks[name])

    def _after_step(self, optimizer, args, kwargs) -> None:
        import torch

        if not self.masks:
            return
        with torch.no_grad():
            for name, param in self.params.items():
                param.mul_(self.masks[name])

    def sparsity(self) -> float:
        """The share of the targeted entries that are zero now (of this rank's
        shards under FSDP2: a log line, not worth a collective)."""
        local = [param.detach().to_local() if hasattr(param, "to_local") else param.detach()
                 for param in self.params.values()]
        zeros = sum(int((tensor == 0).sum()) for tensor in local)
        return zeros / max(sum(tensor.numel() for tensor in local), 1)

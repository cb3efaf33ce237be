"""The trainable parameters of a model, grouped for the optimizer."""

from __future__ import annotations


def param_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed matrices, and biases and
    norm weights (1-D) without decay, since shrinking those only hurts."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]

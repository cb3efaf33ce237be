"""The trainable parameters of a model, grouped for the optimizer."""

from __future__ import annotations


def param_groups(model, weight_decay: float, learning_rates: dict[str, float] | None = None) -> list[dict]:
    """Trainable parameters grouped by weight decay and learning rate.

    Decayed matrices, and biases and norm weights (1-D) without decay, since
    shrinking those only hurts. ``learning_rates`` (``{name: lr}``) gives
    parameters their own peak learning rate: they go into groups carrying that
    ``lr``; the first groups are always those at the optimizer's default
    learning rate (the loop logs group 0's).
    """
    learning_rates = learning_rates or {}
    groups: dict[tuple, dict] = {(None, True): {"params": [], "weight_decay": weight_decay},
                                 (None, False): {"params": [], "weight_decay": 0.0}}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = not (param.ndim < 2 or name.endswith(".bias"))
        lr = learning_rates.get(name)
        key = (lr, decayed)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decayed else 0.0, "lr": lr}
        groups[key]["params"].append(param)
    return [group for group in groups.values() if group["params"]]


def optimizer_param_groups(cfg, pm, model) -> list[dict]:
    """:func:`param_groups` with the learning rates every plugin's
    ``parameter_learning_rates`` gives; a parameter two plugins name is a
    :class:`~plait.errors.ConfigError` naming both."""
    from plait.errors import ConfigError

    rates: dict[str, float] = {}
    owners: dict[str, str] = {}
    hook = pm.hook.parameter_learning_rates
    for impl in hook.get_hookimpls():  # first registered first: core, then plugins
        answer = impl.function(cfg=cfg, model=model) or {}
        for name, lr in answer.items():
            if name in owners and rates[name] != lr:
                raise ConfigError(f"parameter {name!r} is given two learning rates: {rates[name]} by "
                                  f"{owners[name]!r} and {lr} by {impl.plugin_name!r}; the keys each reads "
                                  f"(embedding_lr, embedding_lr_scale, lr_groups, loraplus_lr_ratio, "
                                  f"loraplus_lr_embedding) must not both reach it")
            rates[name], owners[name] = lr, impl.plugin_name
    return param_groups(model, cfg.weight_decay, rates)

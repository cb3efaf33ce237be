"""The trainable parameters of a model, grouped for the optimizer."""

from __future__ import annotations


def param_groups(model, weight_decay: float, learning_rates: dict[str, float] | None = None,
                 embeddings: set[int] | None = None) -> list[dict]:
    """Trainable parameters grouped by weight decay and learning rate.

    Decayed matrices, and biases and norm weights (1-D) without decay, since
    shrinking those only hurts. ``learning_rates`` (``{name: lr}``) gives
    parameters their own peak learning rate: they go into groups carrying that
    ``lr``; the first groups are always those at the optimizer's default
    learning rate (the loop logs group 0's). ``embeddings`` (parameter ids)
    puts those parameters in groups of their own marked ``embeddings: True``.
    """
    learning_rates, embeddings = learning_rates or {}, embeddings or set()
    groups: dict[tuple, dict] = {(None, True, False): {"params": [], "weight_decay": weight_decay},
                                 (None, False, False): {"params": [], "weight_decay": 0.0}}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = not (param.ndim < 2 or name.endswith(".bias"))
        lr = learning_rates.get(name)
        embedding = id(param) in embeddings
        key = (lr, decayed, embedding)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decayed else 0.0,
                           **({"lr": lr} if lr is not None else {}), **({"embeddings": True} if embedding else {})}
        groups[key]["params"].append(param)
    return [group for group in groups.values() if group["params"]]


def embedding_parameter_ids(model) -> set[int]:
    """Ids of the input and output embeddings' parameters (with an adapter's
    trained copies and LoRA factors on them)."""
    from plait.model.forward import unwrap

    base, ids = unwrap(model), set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(base, getter)()
        except (AttributeError, NotImplementedError, TypeError):
            module = None
        if module is not None:
            ids.update(id(p) for p in module.parameters())
    return ids


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
    from plait.registries import find_optimizer

    apart = find_optimizer(pm, cfg.optimizer).embeddings_apart
    return param_groups(model, cfg.weight_decay, rates, embedding_parameter_ids(model) if apart else None)

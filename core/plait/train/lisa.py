"""LISA (Pan et al. 2024, "LISA: Layerwise Importance Sampling for Memory-
Efficient Large Language Model Fine-Tuning").

Axolotl's meaning: a full fine-tune where, every ``lisa_step_interval``
optimizer steps, ``lisa_n_layers`` of the decoder layers (the list at
``lisa_layers_attribute``, ``model.layers`` from the causal LM) are chosen at
random and only they train; every parameter outside that list (embeddings,
head, final norm) trains throughout.

The optimizer holds every parameter from the start, so a layer chosen later
trains with its own state; a frozen layer gets no gradient, and torch's
optimizers skip it (no update, no decay). The choice for steps ``k x
interval`` to ``(k + 1) x interval - 1`` is drawn from a generator seeded by
``(seed, k)`` alone, so a resumed run trains the same layers as the run it
continues, bit for bit.
"""

from __future__ import annotations

import contextlib
from functools import reduce

from plait.errors import ConfigError


def chosen_layers(seed: int, period: int, total: int, n: int) -> list[int]:
    """The ``n`` layer indices (of ``total``) that train during ``period``."""
    import numpy as np

    rng = np.random.default_rng([seed, period])
    return sorted(int(i) for i in rng.choice(total, size=n, replace=False))


def decoder_layers(model, attribute: str):
    """The list of decoder layers at ``attribute`` (dotted) of the causal LM."""
    from plait.model.forward import unwrap

    causal_lm = unwrap(model)
    try:
        layers = reduce(getattr, attribute.split("."), causal_lm)
    except AttributeError:
        children = ", ".join(name for name, _ in causal_lm.named_children())
        raise ConfigError(f"config key 'lisa_layers_attribute': {attribute!r} is not an attribute path of "
                          f"{type(causal_lm).__name__} (its children: {children}); give the dotted path to the "
                          f"decoder layers, e.g. model.layers") from None
    if not hasattr(layers, "__len__") or not hasattr(layers, "__getitem__"):
        raise ConfigError(f"config key 'lisa_layers_attribute': {attribute!r} is a {type(layers).__name__}, not a "
                          f"list of layers")
    return layers


class Lisa:
    """Switches the trained decoder layers as the run's step crosses an interval."""

    def __init__(self, cfg, model, world_size: int):
        if world_size > 1:
            raise ConfigError("config key 'lisa_n_layers': LISA changes which layers train during the run, which "
                              "the data-parallel wrappers (DDP, FSDP2) cannot follow; run LISA in one process")
        self.layers = decoder_layers(model, cfg.lisa_layers_attribute)
        if cfg.lisa_n_layers > len(self.layers):
            raise ConfigError(f"config key 'lisa_n_layers': {cfg.lisa_n_layers} is more than the "
                              f"{len(self.layers)} layers at {cfg.lisa_layers_attribute}; give 1 to "
                              f"{len(self.layers)}")
        self.seed, self.n, self.interval = cfg.seed, cfg.lisa_n_layers, cfg.lisa_step_interval
        self.period = None
        self.active: list[int] = []

    def switches_before(self, step: int) -> bool:
        """Whether :meth:`before_step` would change the trained set before ``step``."""
        return step // self.interval != self.period

    def before_step(self, step: int) -> bool:
        """Choose the layers of ``step``'s period if they are not chosen yet;
        ``True`` when the trained set changed."""
        period = step // self.interval
        if period == self.period:
            return False
        self.period = period
        self.active = chosen_layers(self.seed, period, len(self.layers), self.n)
        for index, layer in enumerate(self.layers):
            layer.requires_grad_(index in self.active)
        return True

    @contextlib.contextmanager
    def every_layer_trainable(self):
        """Every layer counts as trained inside (checkpoints save the run's
        trained weights, and a layer frozen now was trained before or may be
        later); the current choice is restored on the way out."""
        for layer in self.layers:
            layer.requires_grad_(True)
        try:
            yield
        finally:
            for index, layer in enumerate(self.layers):
                layer.requires_grad_(self.period is None or index in self.active)


def checkpoint_view(run):
    """Around a checkpoint's save or load: LISA's layers all count as trained."""
    lisa = getattr(run, "lisa", None)  # a Run field; None without lisa_n_layers
    return lisa.every_layer_trainable() if lisa is not None else contextlib.nullcontext()


def forget_unsaved_state(model, optimizer, saved: dict) -> None:
    """Drop the optimizer state torch's loader made up for parameters the
    checkpoint has none of (layers no period had chosen yet): the run it
    continues had none either, and Adam's first step on them must be a first
    step (bias correction counts steps)."""
    kept = set(saved.get("state", {}))
    for name, param in model.named_parameters():
        if name not in kept:
            optimizer.state.pop(param, None)

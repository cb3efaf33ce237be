"""Core's per-parameter learning rates: ``embedding_lr``, ``embedding_lr_scale``
and ``lr_groups`` (the :func:`plait.hookspecs.parameter_learning_rates` hook).

Axolotl's meaning: the trainable parameters of the input embeddings and the
output head train at ``embedding_lr`` (or ``learning_rate x
embedding_lr_scale``); a trainable parameter whose name contains one of an
``lr_groups`` entry's ``modules`` trains at that entry's ``lr``. Plait finds
the embeddings by structure (``get_input_embeddings``/``get_output_embeddings``),
so a family whose embedding is not called ``embed_tokens`` is covered too, and
an ``lr_groups`` entry applies to every trainable parameter of its modules
(biases and norm weights as well, not only the decayed matrices).
"""

from __future__ import annotations

from plait.hookspecs import hookimpl


def embedding_parameter_names(model) -> list[str]:
    """Names (in ``model.named_parameters()``) of the trainable parameters of the
    input embeddings and the output head; a tied head counts once."""
    from plait.model.forward import unwrap

    causal_lm = unwrap(model)
    owned = set()
    for module in (causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()):
        if module is not None:
            owned.update(id(param) for param in module.parameters())
    return [name for name, param in model.named_parameters() if param.requires_grad and id(param) in owned]


def group_of(name: str, lr_groups):
    """The first ``lr_groups`` entry with a module that is part of ``name``, or ``None``."""
    for group in lr_groups or ():
        if any(module in name for module in group.modules):
            return group
    return None


@hookimpl
def parameter_learning_rates(cfg, model):
    if cfg.embedding_lr is None and cfg.embedding_lr_scale is None and not cfg.lr_groups:
        return None
    rates: dict[str, float] = {}
    if cfg.embedding_lr is not None or cfg.embedding_lr_scale is not None:
        lr = cfg.embedding_lr if cfg.embedding_lr is not None else cfg.learning_rate * cfg.embedding_lr_scale
        names = embedding_parameter_names(model)
        if not names:
            from plait.errors import ConfigError

            key = "embedding_lr" if cfg.embedding_lr is not None else "embedding_lr_scale"
            raise ConfigError(f"config key {key!r}: the input embeddings and the head do not train in this run "
                              f"(adapter: {cfg.adapter}); add them to lora_modules_to_save (e.g. [embed_tokens, "
                              f"lm_head]) or remove {key}")
        rates.update(dict.fromkeys(names, lr))
    if cfg.lr_groups:
        matched = set()
        for name, param in model.named_parameters():
            group = group_of(name, cfg.lr_groups) if param.requires_grad else None
            if group is not None:
                rates[name] = group.lr  # an explicit module's rate beats embedding_lr
                matched.add(group.name)
        unmatched = [group.name for group in cfg.lr_groups if group.name not in matched]
        if unmatched:
            from plait.errors import ConfigError

            example = next((n for n, p in model.named_parameters() if p.requires_grad), "")
            raise ConfigError(f"config key 'lr_groups': group(s) {unmatched} match no trainable parameter (names "
                              f"look like {example!r}); give modules that are part of those names")
    return rates

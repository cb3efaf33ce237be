"""Core's loss step: the LM head and cross-entropy over trained tokens
(:mod:`plait.model.head`), which a fused kernel plugin replaces without
touching model code."""

from __future__ import annotations

from plait.hookspecs import hookimpl
from plait.model.head import chunked_linear_cross_entropy, head_options


@hookimpl(trylast=True)
def build_loss(cfg, model):
    import functools

    options = head_options(model)
    return functools.partial(chunked_linear_cross_entropy, **options) if options else chunked_linear_cross_entropy

"""Core's loss step: the LM head and cross-entropy over trained tokens
(:mod:`plait.model.head`), which a fused kernel plugin replaces without
touching model code."""

from __future__ import annotations

from plait.hookspecs import hookimpl
from plait.model.head import chunked_linear_cross_entropy, eaft_of, head_options


@hookimpl(trylast=True)
def build_loss(cfg, model):
    import functools

    options = head_options(model)
    eaft = eaft_of(cfg)
    if eaft:
        options["eaft"] = eaft
    return functools.partial(chunked_linear_cross_entropy, **options) if options else chunked_linear_cross_entropy


class TokenCrossEntropy:
    """Core's objective: summed cross-entropy over trained tokens, averaged
    per trained token of the step (:func:`plait.hookspecs.build_objective`)."""

    unit = "tokens"
    perplexity = True

    def count(self, batch) -> int:
        """Positions trained after the shift (the label of the *next* token)."""
        if "shift_labels" in batch:  # a context-parallel shard: already shifted
            return int((batch["shift_labels"] != -100).sum())
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss(self, run, batch, *, training: bool = False):
        # the loop's forward + loss step (builtin does not import the loop: run hands it over)
        loss_sum, _ = run.cross_entropy(batch, training=training)
        return loss_sum, {}


@hookimpl(trylast=True)
def build_objective(cfg, model, loss_fn):
    return TokenCrossEntropy()

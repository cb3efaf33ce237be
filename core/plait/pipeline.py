"""The setup steps every command shares, in the order a run takes them.

``plait train``, ``preprocess``, ``inspect``, ``evaluate``, ``inference`` and
``merge-lora`` all start the same way; the steps live here once so a hook is
called at the same point whichever command runs.

1. :func:`setup_tokenizer` -- ``load_tokenizer``, then ``tokenizer_loaded``.
"""

from __future__ import annotations


def setup_tokenizer(cfg, pm):
    """The run's tokenizer: ``load_tokenizer`` (firstresult), then every
    plugin's ``tokenizer_loaded`` (a family's chat template, pad token) before
    any row is tokenized or the model's embeddings are sized to it."""
    from plait.plugins import call_required

    tokenizer = call_required(pm, "load_tokenizer", cfg=cfg)
    pm.hook.tokenizer_loaded(cfg=cfg, tokenizer=tokenizer)
    return tokenizer

"""bitsandbytes optimizers: 8-bit AdamW (state in uint8 with block-wise
scales, a quarter of AdamW's state memory) and the paged variants, whose state
can be evicted to host memory under GPU memory pressure."""

from __future__ import annotations

from plait_bnb.config import OPTIMIZERS


def build(cfg, params):
    """The bitsandbytes optimizer for ``cfg.optimizer``, or None when the name is not ours.

    Hyper-parameters come from the same keys as core's ``adamw_torch``, so
    switching between them changes only the state's precision.
    """
    if cfg.optimizer not in OPTIMIZERS:
        return None
    import bitsandbytes.optim as bnb_optim

    cls = getattr(bnb_optim, OPTIMIZERS[cfg.optimizer])
    return cls(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        **cfg.optim_args,
    )

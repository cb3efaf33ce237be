"""bitsandbytes optimizers: 8-bit AdamW (state in uint8 with block-wise
scales, a quarter of AdamW's state memory) and the paged variants, whose state
can be evicted to host memory under GPU memory pressure."""

from __future__ import annotations

from plait.registries import Optimizer, build_transformers_optimizer
from plait_bnb.config import OPTIMIZERS, TRANSFORMERS_OPTIMIZERS, check_optimizer


def build(cfg, params):
    """The bitsandbytes optimizer for ``cfg.optimizer`` (one of :data:`OPTIMIZERS`).

    Hyper-parameters come from the same keys as core's ``adamw_torch``, so
    switching between them changes only the state's precision.
    """
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


def optimizers() -> list[Optimizer]:
    """The registry records: :data:`OPTIMIZERS` built here, the rest of
    transformers' bitsandbytes names built through transformers."""
    install = "pip install bitsandbytes"
    records = [Optimizer(name, build, requires=("bitsandbytes",), install=install, check=check_optimizer,
                         description=f"bitsandbytes {cls}") for name, cls in OPTIMIZERS.items()]
    records += [Optimizer(name, build_transformers_optimizer, requires=("bitsandbytes",), install=install,
                          description=f"transformers' {name} (bitsandbytes)") for name in TRANSFORMERS_OPTIMIZERS]
    return records

"""Core optimizers and learning-rate schedules (``build_optimizer``/``build_scheduler``)."""

from __future__ import annotations

import math

from plait.hookspecs import hookimpl

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw", "sgd", "adafactor")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


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


def check_names(cfg, pm) -> None:
    """Fail before any model work when no plugin builds ``optimizer`` or
    ``lr_scheduler``: each hook is asked once with a throwaway parameter."""
    import torch

    from plait.errors import PlaitError

    probe = torch.nn.Parameter(torch.zeros(2, 2))
    try:
        optimizer = pm.hook.build_optimizer(cfg=cfg, params=[{"params": [probe], "weight_decay": 0.0}])
    except PlaitError:
        raise
    except Exception:  # a plugin's optimizer that needs a GPU parameter: the name is known
        optimizer = True
    if optimizer is None:
        raise unknown_name_error("optimizer", cfg.optimizer, "optimizer", pm.hook.optimizer_names())
    if pm.hook.build_scheduler(cfg=cfg, optimizer=torch.optim.SGD([probe], lr=1.0), total_steps=10) is None:
        raise unknown_name_error("lr_scheduler", cfg.lr_scheduler, "schedule", pm.hook.scheduler_names())


def unknown_name_error(key: str, value: str, what: str, answers):
    """The error for a name no plugin builds: every installed plugin's names
    (from ``optimizer_names`` / ``scheduler_names``) and the closest one."""
    from plait.errors import ConfigError, did_you_mean

    names = list(dict.fromkeys(name for names in answers for name in (names or ())))
    return ConfigError(f"config key {key!r}: {value!r} is not a known {what}{did_you_mean(value, names)}\n"
                       f"accepted: {', '.join(names)}")


@hookimpl
def optimizer_names():
    return list(OPTIMIZERS)


@hookimpl
def scheduler_names():
    return list(SCHEDULERS)


@hookimpl(trylast=True)
def build_optimizer(cfg, params):
    import torch

    name = cfg.optimizer
    if name in ("adamw_torch", "adamw", "adamw_torch_fused"):
        return torch.optim.AdamW(
            params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
            # fused needs every parameter on an accelerator; fall back to foreach elsewhere
            fused=name == "adamw_torch_fused" and torch.cuda.is_available(),
            **cfg.optim_args,
        )
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                               **{"momentum": 0.9, **cfg.optim_args})
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **cfg.optim_args)
    return None


def warmup_steps(cfg, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    if cfg.warmup_ratio is not None:
        return int(math.ceil(cfg.warmup_ratio * total_steps))
    return 0


def lr_factor(name: str, step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if name in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if name == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    # cosine
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@hookimpl(trylast=True)
def build_scheduler(cfg, optimizer, total_steps):
    import torch

    name = cfg.lr_scheduler
    if name not in SCHEDULERS:
        return None
    warmup = warmup_steps(cfg, total_steps)
    min_ratio = cfg.cosine_min_lr_ratio or 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(name, step, warmup, total_steps, min_ratio)
    )

"""Core's optimizers and learning-rate schedules, and the default
``build_optimizer``/``build_scheduler`` hookimpls that build the registry's
entry for the configured name.

Optimizers: torch's AdamW (``adamw_torch``, ``adamw``, ``adamw_torch_fused``),
SGD, Adafactor, Adagrad, RMSprop, and the names of transformers'
``OptimizerNames`` that need another package (built through
``Trainer.get_optimizer_cls_and_kwargs``, so their defaults are
transformers'). bitsandbytes' names belong to plait-bnb. Schedules: every
``transformers.SchedulerType`` a loop that steps once per optimizer step can
drive; ``cosine``, ``linear``, ``constant`` and ``constant_with_warmup`` are
Plait's own so ``cosine_min_lr_ratio``, ``cosine_constant_lr_ratio`` and
``lr_quadratic_warmup`` apply to them, with transformers' warmup (step ``i``
of ``w`` gets ``i / w``).
"""

from __future__ import annotations

import inspect
import math

from plait.errors import ConfigError
from plait.hookspecs import hookimpl
from plait.registries import Optimizer, Scheduler, build_transformers_optimizer, find_optimizer, find_scheduler

PLAIT_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
#: transformers' schedules built through ``transformers.get_scheduler`` -> the ``lr_scheduler_kwargs`` each
#: takes (its function's arguments past the warmup and total steps; a test checks them against transformers)
TRANSFORMERS_SCHEDULERS = {
    "cosine_with_restarts": ("num_cycles",),
    "polynomial": ("lr_end", "power"),
    "inverse_sqrt": ("timescale",),
    "cosine_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate"),
    "cosine_warmup_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate", "warmup_lr_rate"),
    "warmup_stable_decay": ("num_decay_steps", "num_stable_steps", "warmup_type", "decay_type", "min_lr_ratio",
                            "num_cycles"),
}
#: schedules that fail without one of these kwargs
REQUIRED_KWARGS = {
    "cosine_with_min_lr": ("min_lr", "min_lr_rate"),
    "cosine_warmup_with_min_lr": ("min_lr", "min_lr_rate"),
    "warmup_stable_decay": ("num_decay_steps",),
}

#: transformers' optimizer names built through Trainer's resolution -> the package they import
TRANSFORMERS_OPTIMIZERS = {
    "adamw_torch_4bit": ("torchao", "pip install torchao"),
    "adamw_torch_8bit": ("torchao", "pip install torchao"),
    "adamw_anyprecision": ("torchdistx", "pip install torchdistx"),
    "grokadamw": ("grokadamw", "pip install grokadamw"),
    "stable_adamw": ("optimi", "pip install torch-optimi"),
}


# -------------------------------------------------------------- optimizers


def _adamw(cfg, params):
    import torch

    return torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        # fused needs every parameter on an accelerator; fall back to foreach elsewhere
        fused=cfg.optimizer == "adamw_torch_fused" and torch.cuda.is_available(),
        **cfg.optim_args,
    )


def _sgd(cfg, params):
    import torch

    return torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                           **{"momentum": 0.9, **cfg.optim_args})


def _torch(class_name: str):
    def build(cfg, params):
        import torch

        cls = getattr(torch.optim, class_name)
        return cls(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **cfg.optim_args)
    return build


def _torch_check(class_name: str, fixed=("params", "lr", "weight_decay")):
    def check(cfg):
        import torch

        check_optim_args(cfg, getattr(torch.optim, class_name), fixed, f"torch.optim.{class_name}")
    return check


def check_optim_args(cfg, cls, fixed, what: str) -> None:
    """``optim_args`` must be arguments of ``cls`` that the other keys do not set."""
    if not cfg.optim_args:
        return
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", *fixed)]
    unknown = [k for k in cfg.optim_args if k not in accepted]
    if unknown:
        raise ConfigError(f"config key 'optim_args': {unknown} are not arguments of {what} "
                          f"(optimizer {cfg.optimizer!r}); accepted: {', '.join(accepted)}")


@hookimpl
def optimizers():
    adamw_check = _torch_check("AdamW", ("params", "lr", "betas", "eps", "weight_decay", "fused"))
    records = [Optimizer(name, _adamw, check=adamw_check, description="torch.optim.AdamW")
               for name in ("adamw_torch", "adamw", "adamw_torch_fused")]
    records.append(Optimizer("sgd", _sgd, check=_torch_check("SGD"), description="torch.optim.SGD, momentum 0.9"))
    for name, class_name in (("adafactor", "Adafactor"), ("adagrad", "Adagrad"), ("rmsprop", "RMSprop")):
        records.append(Optimizer(name, _torch(class_name), check=_torch_check(class_name),
                                 description=f"torch.optim.{class_name}"))
    for name, (module, install) in TRANSFORMERS_OPTIMIZERS.items():
        records.append(Optimizer(name, build_transformers_optimizer, requires=(module,), install=install,
                                 description=f"transformers' {name}"))
    records.append(Optimizer("muon", _muon, check=_check_muon, embeddings_apart=True,
                             description="Muon on the weight matrices, AdamW on the embeddings and 1-D parameters"))
    for name, same in AXOLOTL_OPTIMIZER_NAMES.items():
        module, install = TRANSFORMERS_OPTIMIZERS[same]
        records.append(Optimizer(name, _named_as(same), requires=(module,), install=install,
                                 description=f"Axolotl's name of {same}"))
    return records


def _muon(cfg, params):
    from plait.builtin.muon import build_muon  # torch: imported when a run builds it, not for `plait --help`

    return build_muon(cfg, params)


def _check_muon(cfg):
    from plait.builtin.muon import check_muon

    check_muon(cfg)


#: Axolotl's older optimizer names -> the transformers name of the same optimizer (torchao's AdamW4bit / AdamW8bit)
AXOLOTL_OPTIMIZER_NAMES = {"ao_adamw_4bit": "adamw_torch_4bit", "ao_adamw_8bit": "adamw_torch_8bit"}


def _named_as(name: str):
    """A build that makes the optimizer ``name`` with the run's settings."""
    def build(cfg, params):
        return build_transformers_optimizer(cfg.model_copy(update={"optimizer": name}), params)

    return build


@hookimpl(trylast=True)
def build_optimizer(cfg, params):
    return find_optimizer(cfg.plugin_manager, cfg.optimizer).build(cfg, params)


# --------------------------------------------------------------- schedules


#: warm-up when a config names none: Axolotl's trainer builder's default
DEFAULT_WARMUP_RATIO, DEFAULT_WARMUP_CAP = 0.03, 100


def warmup_steps(cfg, total_steps: int) -> int:
    """Warm-up steps of a run of ``total_steps``, as Axolotl's trainer builder
    counts them: ``warmup_steps`` as given, else ``warmup_ratio`` of the run
    truncated (``int(ratio * total_steps)``), and with neither key 3% of the
    run truncated, at most 100 steps (Axolotl's default, so a config that
    names no warm-up trains on the curve it had there); a count of 1 becomes 2
    (Axolotl raises a one-step warm-up, whose only step would train at
    learning rate 0, to two). ``warmup_steps`` below 1 is a fraction of the
    run rounded up, as transformers' ``get_warmup_steps`` reads the value
    Axolotl passes it."""
    if isinstance(cfg.warmup_steps, float):
        return int(math.ceil(cfg.warmup_steps * total_steps))
    if cfg.warmup_steps is not None:
        count = cfg.warmup_steps
    elif cfg.warmup_ratio is not None:
        count = int(cfg.warmup_ratio * total_steps)
    else:
        count = min(int(DEFAULT_WARMUP_RATIO * total_steps), DEFAULT_WARMUP_CAP)
    if count == 1:
        count = 2
    return min(count, total_steps)


def lr_factor(name: str, step: int, warmup: int, total: int, min_ratio: float, num_cycles: float = 0.5, *,
              quadratic_warmup: bool = False, constant_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Warmup is transformers': step ``i`` of ``w`` gets ``i / w`` (the first
    step at learning rate 0), so a config trains on the curve it would get
    under the HF Trainer and Axolotl; ``quadratic_warmup`` (Axolotl's
    ``lr_quadratic_warmup``) squares it, ``(i / w) ** 2``.

    ``constant_ratio`` (Axolotl's ``cosine_constant_lr_ratio``, cosine only):
    the decay is squeezed into the steps before ``int(total * constant_ratio)``
    and the rate stays at ``min_ratio`` from there; 0 decays over the whole run.
    """
    if warmup and step < warmup:
        return (step / warmup) ** 2 if quadratic_warmup else step / warmup
    if name in ("constant", "constant_with_warmup"):
        return 1.0
    end = total
    if constant_ratio and name == "cosine":
        # Axolotl's step where the decay ends; one at or before the warmup's end leaves no decay at all
        end = int(total * constant_ratio)
        if end <= warmup:
            return min_ratio
    progress = (step - warmup) / max(1, end - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if name == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    if name == "rex":
        # REX (Chen et al. 2021) as Axolotl's RexLR writes it: z, the share of the decay left, as z / (0.1 + 0.9 z)
        left = 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * left / (0.1 + 0.9 * left)
    # cosine; num_cycles 0.5 is one half-wave from the peak to the floor, as in transformers
    return min_ratio + (1.0 - min_ratio) * max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * progress)))


def _plait_schedule(cfg, optimizer, total_steps):
    import torch

    name = cfg.lr_scheduler
    warmup = warmup_steps(cfg, total_steps)
    min_ratio = cfg.cosine_min_lr_ratio or 0.0
    num_cycles = cfg.lr_scheduler_kwargs.get("num_cycles", 0.5)
    quadratic, constant_ratio = bool(cfg.lr_quadratic_warmup), cfg.cosine_constant_lr_ratio or 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(name, step, warmup, total_steps, min_ratio, num_cycles,
                                          quadratic_warmup=quadratic, constant_ratio=constant_ratio)
    )


def _transformers_schedule(cfg, optimizer, total_steps):
    from transformers import get_scheduler

    kwargs = dict(cfg.lr_scheduler_kwargs)
    if cfg.cosine_min_lr_ratio is not None and cfg.lr_scheduler in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        kwargs.setdefault("min_lr_rate", cfg.cosine_min_lr_ratio)
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps, scheduler_specific_kwargs=kwargs)


#: lr_scheduler_kwargs of one_cycle: torch's OneCycleLR arguments past the optimizer, max_lr and total_steps
ONE_CYCLE_KWARGS = ("pct_start", "anneal_strategy", "cycle_momentum", "base_momentum", "max_momentum", "div_factor",
                    "final_div_factor", "three_phase")


def _one_cycle_schedule(cfg, optimizer, total_steps):
    """Axolotl's ``lr_scheduler: one_cycle``: torch's OneCycleLR peaking at
    ``learning_rate``, its rise the run's warm-up share (``pct_start``) and its
    fall a cosine, unless ``lr_scheduler_kwargs`` says otherwise."""
    from torch.optim.lr_scheduler import OneCycleLR

    kwargs = dict(cfg.lr_scheduler_kwargs)
    kwargs.setdefault("pct_start", warmup_steps(cfg, total_steps) / total_steps)
    kwargs.setdefault("anneal_strategy", "cos")
    defaults = optimizer.defaults
    if "momentum" not in defaults and "betas" not in defaults:
        # OneCycleLR cycles beta1 (or momentum) by default, which this optimizer has not: the rate alone cycles
        kwargs.setdefault("cycle_momentum", False)
    return OneCycleLR(optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total_steps,
                      **kwargs)


def _check_rex(cfg) -> None:
    if cfg.lr_quadratic_warmup:
        raise ConfigError("config key 'lr_quadratic_warmup': true has no effect on lr_scheduler 'rex' (as in "
                          "Axolotl, its warm-up is linear); remove it")
    _check_plait_schedule(cfg)


def _check_one_cycle(cfg) -> None:
    _check_plait_schedule(cfg)
    if cfg.cosine_min_lr_ratio is not None and not cfg.jagged_restart_steps:
        raise ConfigError("config key 'cosine_min_lr_ratio' has no effect on lr_scheduler 'one_cycle' (it ends at "
                          "learning_rate / (div_factor * final_div_factor)); remove it, or set final_div_factor in "
                          "lr_scheduler_kwargs")


def _check_plait_schedule(cfg) -> None:
    """Axolotl's schedule shapers apply to Plait's own schedules only (the
    jagged restarts, to every schedule: each one's check calls this)."""
    _check_jagged_restarts(cfg)
    name = cfg.lr_scheduler
    if cfg.cosine_constant_lr_ratio and name != "cosine":
        raise ConfigError(f"config key 'cosine_constant_lr_ratio': {cfg.cosine_constant_lr_ratio} has no effect on "
                          f"lr_scheduler {name!r}; it shapes lr_scheduler: cosine only. Remove it, or use cosine")
    if cfg.lr_quadratic_warmup and name not in PLAIT_SCHEDULERS:
        raise ConfigError(f"config key 'lr_quadratic_warmup': true has no effect on lr_scheduler {name!r} (transformers' "
                          f"schedule has its own warmup); accepted with lr_scheduler: {', '.join(PLAIT_SCHEDULERS)}")


def _check_schedule(cfg) -> None:
    _check_plait_schedule(cfg)
    name = cfg.lr_scheduler
    given = set(cfg.lr_scheduler_kwargs) | ({"min_lr_rate"} if cfg.cosine_min_lr_ratio is not None else set())
    required = REQUIRED_KWARGS.get(name)
    if required and not given & set(required):
        raise ConfigError(f"config key 'lr_scheduler': {name!r} needs {' or '.join(required)} in "
                          f"lr_scheduler_kwargs" + (" (or cosine_min_lr_ratio)" if "min_lr_rate" in required else ""))
    if cfg.cosine_min_lr_ratio is not None and name in TRANSFORMERS_SCHEDULERS and "min_lr_rate" not in \
            TRANSFORMERS_SCHEDULERS[name] and not cfg.jagged_restart_steps:
        raise ConfigError(f"config key 'cosine_min_lr_ratio' has no effect on lr_scheduler {name!r}; it applies to "
                          f"cosine, linear, cosine_with_min_lr and cosine_warmup_with_min_lr. Remove it")


@hookimpl
def schedulers():
    check = _check_plait_schedule
    records = [Scheduler("cosine", _plait_schedule, kwargs=("num_cycles",), check=check,
                         description="cosine to cosine_min_lr_ratio (held from cosine_constant_lr_ratio of the run)"),
               Scheduler("linear", _plait_schedule, check=check, description="linear to cosine_min_lr_ratio"),
               Scheduler("rex", _plait_schedule, check=_check_rex,
                         description="REX (reflected exponential) to cosine_min_lr_ratio, as Axolotl's rex"),
               Scheduler("constant", _plait_schedule, check=check, description="constant after warmup"),
               Scheduler("constant_with_warmup", _plait_schedule, check=check, description="constant after warmup")]
    for name, kwargs in TRANSFORMERS_SCHEDULERS.items():
        records.append(Scheduler(name, _transformers_schedule, kwargs=kwargs, check=_check_schedule,
                                 description=f"transformers' {name}"))
    records.append(Scheduler("one_cycle", _one_cycle_schedule, kwargs=ONE_CYCLE_KWARGS, check=_check_one_cycle,
                             description="torch's OneCycleLR up to learning_rate over the warm-up, then a cosine "
                                         "(Axolotl's one_cycle)"))
    return records


@hookimpl(trylast=True)
def build_scheduler(cfg, optimizer, total_steps):
    scheduler = find_scheduler(cfg.plugin_manager, cfg.lr_scheduler).build(cfg, optimizer, total_steps)
    if cfg.jagged_restart_steps:
        scheduler = JaggedRestarts(scheduler, cfg.jagged_restart_steps,
                                   warmup=cfg.jagged_restart_warmup_steps or JAGGED_DEFAULT_WARMUP,
                                   anneal=cfg.jagged_restart_anneal_steps or JAGGED_DEFAULT_ANNEAL,
                                   floor=cfg.cosine_min_lr_ratio or JAGGED_DEFAULT_FLOOR)
    return scheduler


# --------------------------------------------------------------- jagged restarts

#: Axolotl's values when a jagged-restart key is unset (or 0)
JAGGED_DEFAULT_WARMUP, JAGGED_DEFAULT_ANNEAL, JAGGED_DEFAULT_FLOOR = 10, 1, 0.001


def jagged_restart_scale(step: int, every: int, warmup: int, anneal: int, floor: float) -> float:
    """The factor jagged restarts put on the schedule's rate at scheduler step ``step``.

    Axolotl's shape: 1 until the first restart's fall begins (``every -
    anneal``); from then on, within each period of ``every`` steps, a linear
    rise from ``floor`` over the first ``warmup`` steps and a linear fall to
    ``floor`` over the last ``anneal``, 1 in between.
    """
    if step < every - anneal:
        return 1.0
    at = step % every
    if at < warmup:
        share = at / warmup
    elif at > every - anneal:
        share = min(1.0, (every - at) / anneal)
    else:
        share = 1.0
    return floor + (1.0 - floor) * share


def _check_jagged_restarts(cfg) -> None:
    if not cfg.jagged_restart_steps:
        for key in ("jagged_restart_warmup_steps", "jagged_restart_anneal_steps"):
            if getattr(cfg, key):
                raise ConfigError(f"config key '{key}': {getattr(cfg, key)} has no effect without "
                                  f"jagged_restart_steps; set jagged_restart_steps (the restart period) or remove it")


class JaggedRestarts:
    """A schedule with jagged restarts: each step the wrapped scheduler sets
    its rates and this scales them by :func:`jagged_restart_scale`.

    The wrapped schedules compute their rates from the base rate and the step
    (LambdaLR, OneCycleLR: every schedule of core's registry), never from the
    rate a group holds, so the scaling does not compound. The checkpoint holds
    the wrapped scheduler's state; the scale follows from its step.
    """

    def __init__(self, inner, every: int, *, warmup: int, anneal: int, floor: float):
        self.inner, self.every, self.warmup, self.anneal, self.floor = inner, every, warmup, anneal, floor
        self.optimizer = inner.optimizer
        self._scale()

    @property
    def last_epoch(self) -> int:
        return self.inner.last_epoch

    def step(self) -> None:
        self.inner.step()
        self._scale()

    def _scale(self) -> None:
        factor = jagged_restart_scale(self.inner.last_epoch, self.every, self.warmup, self.anneal, self.floor)
        for group, rate in zip(self.optimizer.param_groups, self.inner.get_last_lr()):
            group["lr"] = rate * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
        self._scale()

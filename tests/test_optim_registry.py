"""The optimizer and schedule registries against transformers.

Every name of transformers' ``OptimizerNames`` and ``SchedulerType`` is either
registered (and built) or refused at config time with a message saying what
to install or why Plait cannot drive it. Plait's own schedules follow
transformers' curves exactly (warmup ``i / w``, cosine, cosine with a floor).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers

from plait.errors import ConfigError
from plait.registries import KNOWN_ELSEWHERE, find_optimizer, find_scheduler, registry
from plait.testing import build_run_config


def _lrs(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_every_transformers_optimizer_name_is_registered_or_explained():
    from transformers.training_args import OptimizerNames

    _, pm = build_run_config({"base_model": "m"})
    registered = registry(pm, "optimizers")
    for name in (o.value for o in OptimizerNames):
        if name in registered:
            continue
        assert name in KNOWN_ELSEWHERE["optimizers"], f"{name}: neither registered nor explained"
        with pytest.raises(ConfigError, match=f"config key 'optimizer': '{name}' (is|needs)"):
            find_optimizer(pm, name)


def test_every_transformers_schedule_is_registered_or_explained():
    from transformers.trainer_utils import SchedulerType

    _, pm = build_run_config({"base_model": "m"})
    registered = registry(pm, "schedulers")
    for name in (s.value for s in SchedulerType):
        assert name in registered or name in KNOWN_ELSEWHERE["schedulers"], name
        if name not in registered:
            with pytest.raises(ConfigError, match=f"'{name}' is not supported by Plait"):
                find_scheduler(pm, name)


def test_transformers_schedule_kwargs_table_matches_its_functions():
    import inspect

    from plait.builtin.optim import TRANSFORMERS_SCHEDULERS
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    common = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}
    for name, kwargs in TRANSFORMERS_SCHEDULERS.items():
        params = set(inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]).parameters) - common
        assert set(kwargs) == params, name


@pytest.mark.parametrize("keys, reference", [
    ({"lr_scheduler": "cosine", "warmup_steps": 3},
     lambda opt: transformers.get_cosine_schedule_with_warmup(opt, 3, 20)),
    ({"lr_scheduler": "cosine", "warmup_steps": 3, "lr_scheduler_kwargs": {"num_cycles": 1.5}},
     lambda opt: transformers.get_cosine_schedule_with_warmup(opt, 3, 20, num_cycles=1.5)),
    ({"lr_scheduler": "linear", "warmup_steps": 4},
     lambda opt: transformers.get_linear_schedule_with_warmup(opt, 4, 20)),
    ({"lr_scheduler": "constant_with_warmup", "warmup_steps": 5},
     lambda opt: transformers.get_constant_schedule_with_warmup(opt, 5)),
    ({"lr_scheduler": "cosine", "warmup_steps": 2, "cosine_min_lr_ratio": 0.1},
     lambda opt: transformers.get_cosine_with_min_lr_schedule_with_warmup(opt, 2, 20, min_lr_rate=0.1)),
    ({"lr_scheduler": "polynomial", "warmup_steps": 2, "lr_scheduler_kwargs": {"power": 2.0, "lr_end": 1e-4}},
     lambda opt: transformers.get_polynomial_decay_schedule_with_warmup(opt, 2, 20, lr_end=1e-4,
                                                                                       power=2.0)),
    ({"lr_scheduler": "cosine_with_min_lr", "warmup_steps": 2, "cosine_min_lr_ratio": 0.2},
     lambda opt: transformers.get_cosine_with_min_lr_schedule_with_warmup(opt, 2, 20, min_lr_rate=0.2)),
])
def test_schedules_match_transformers(keys, reference):
    """Plait's learning rate at every step equals transformers' for the same
    settings (an independent implementation), to 1e-12."""
    cfg, pm = build_run_config({"base_model": "m", "learning_rate": 1e-3, **keys})
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1e-3)
    ours = _lrs(pm.hook.build_scheduler(cfg=cfg, optimizer=ours_opt, total_steps=20), ours_opt, 20)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1e-3)
    expected = _lrs(reference(ref_opt), ref_opt, 20)
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if keys.get("warmup_steps"):
        assert ours[0] == 0.0  # transformers' warmup starts from 0


def test_one_cycle_is_torchs_one_cycle_over_the_warmup_share():
    """Axolotl's one_cycle: OneCycleLR to learning_rate, pct_start = warm-up / total, cosine annealing; beta1
    cycles too (torch's default, as in Axolotl)."""
    from torch.optim.lr_scheduler import OneCycleLR

    cfg, pm = build_run_config({"base_model": "m", "learning_rate": 1e-3, "lr_scheduler": "one_cycle",
                                "warmup_steps": 5})
    ours_opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], lr=1e-3)
    scheduler = pm.hook.build_scheduler(cfg=cfg, optimizer=ours_opt, total_steps=20)
    betas = []
    ours = []
    for _ in range(20):
        ours.append(ours_opt.param_groups[0]["lr"])
        betas.append(ours_opt.param_groups[0]["betas"][0])
        ours_opt.step()
        scheduler.step()
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], lr=1e-3)
    expected = _lrs(OneCycleLR(ref_opt, max_lr=1e-3, total_steps=20, pct_start=5 / 20, anneal_strategy="cos"),
                    ref_opt, 20)
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert max(ours) == pytest.approx(1e-3) and ours.index(max(ours)) == 4 and ours[0] == pytest.approx(1e-3 / 25)
    assert min(betas) == pytest.approx(0.85) and betas[0] == pytest.approx(0.95)
    # lr_scheduler_kwargs reach OneCycleLR; an optimizer without beta1 or momentum cycles the rate alone
    cfg, pm = build_run_config({"base_model": "m", "lr_scheduler": "one_cycle",
                                "lr_scheduler_kwargs": {"div_factor": 10.0, "pct_start": 0.5}})
    plain = torch.optim.Adagrad([torch.nn.Parameter(torch.ones(1))], lr=1e-3)
    lrs = _lrs(pm.hook.build_scheduler(cfg=cfg, optimizer=plain, total_steps=20), plain, 20)
    assert lrs[0] == pytest.approx(1e-4) and lrs.index(max(lrs)) == 9
    with pytest.raises(ConfigError, match="'cosine_min_lr_ratio' has no effect on lr_scheduler 'one_cycle'"):
        build_run_config({"base_model": "m", "lr_scheduler": "one_cycle", "cosine_min_lr_ratio": 0.1})


def _axolotl_rex(step, *, peak, floor, warmup, total):
    """Axolotl's RexLR at optimizer step ``step`` >= 1, written from its definition (linear warm-up to the
    peak, then min/max + (1 - min/max) * z / (0.1 + 0.9 z) with z the share of the post-warm-up steps left)."""
    if 1 <= step <= warmup:
        return peak * step / warmup
    after, remaining = step - warmup, total - warmup
    if after >= remaining:
        return floor
    z = (remaining - after) / remaining
    return peak * (floor / peak + (1 - floor / peak) * z / (0.1 + 0.9 * z))


@pytest.mark.parametrize("warmup, min_ratio", [(0, None), (4, None), (3, 0.1)])
def test_rex_is_axolotls_reflected_exponential(warmup, min_ratio):
    keys = {"base_model": "m", "learning_rate": 1e-3, "lr_scheduler": "rex", "warmup_steps": warmup}
    if min_ratio is not None:
        keys["cosine_min_lr_ratio"] = min_ratio  # Axolotl's rex floor: learning_rate * cosine_min_lr_ratio
    cfg, pm = build_run_config(keys)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1e-3)
    ours = _lrs(pm.hook.build_scheduler(cfg=cfg, optimizer=opt, total_steps=20), opt, 21)
    floor = 1e-3 * (min_ratio or 0.0)
    expected = [_axolotl_rex(step, peak=1e-3, floor=floor, warmup=warmup, total=20) for step in range(1, 21)]
    assert ours[1:] == pytest.approx(expected, rel=1e-12, abs=1e-18)
    # step 0: transformers' warm-up starts at 0 (Axolotl's RexLR gives a small rate there); no warm-up: the peak
    assert ours[0] == (0.0 if warmup else pytest.approx(1e-3))
    with pytest.raises(ConfigError, match="'lr_quadratic_warmup': true has no effect on lr_scheduler 'rex'"):
        build_run_config({**keys, "lr_quadratic_warmup": True})


def _axolotl_jagged(step, *, every, warmup, anneal, floor):
    """Axolotl's JaggedLRRestartScheduler factor at its step ``step``, written from its definition: untouched
    before the first fall, then per period a rise from the floor over ``warmup`` steps and a fall to it over the
    last ``anneal``."""
    if step < every - anneal:
        return 1.0
    at = step % every
    t = at / warmup if at < warmup else (min(1.0, (every - at) / anneal) if at > every - anneal else 1.0)
    return t * (1 - floor) + floor


@pytest.mark.parametrize("scheduler, keys", [
    ("cosine", {"jagged_restart_warmup_steps": 3, "jagged_restart_anneal_steps": 2, "cosine_min_lr_ratio": 0.1}),
    ("constant", {}),  # Axolotl's defaults: warm-up 10, anneal 1, floor 0.001
    ("one_cycle", {"jagged_restart_warmup_steps": 2, "cosine_min_lr_ratio": 0.2}),
])
def test_jagged_restarts_scale_any_schedule_as_axolotls(scheduler, keys):
    base = {"base_model": "m", "learning_rate": 1e-3, "lr_scheduler": scheduler, "warmup_steps": 4}
    every = 12 if scheduler == "constant" else 8
    plain_cfg, pm = build_run_config({**base, **({"cosine_min_lr_ratio": keys["cosine_min_lr_ratio"]}
                                                 if scheduler == "cosine" else {})})
    plain_opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], lr=1e-3)
    plain = _lrs(pm.hook.build_scheduler(cfg=plain_cfg, optimizer=plain_opt, total_steps=30), plain_opt, 30)
    cfg, pm = build_run_config({**base, "jagged_restart_steps": every, **keys})
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], lr=1e-3)
    ours = _lrs(pm.hook.build_scheduler(cfg=cfg, optimizer=opt, total_steps=30), opt, 30)
    shape = {"every": every, "warmup": keys.get("jagged_restart_warmup_steps", 10),
             "anneal": keys.get("jagged_restart_anneal_steps", 1), "floor": keys.get("cosine_min_lr_ratio", 0.001)}
    expected = [rate * _axolotl_jagged(step, **shape) for step, rate in enumerate(plain)]
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert ours[every] == pytest.approx(plain[every] * shape["floor"])  # each restart starts at the floor
    assert ours[:every - shape["anneal"]] == plain[:every - shape["anneal"]]  # the first period is the schedule's


def test_jagged_restart_shape_keys_need_the_period():
    with pytest.raises(ConfigError, match="'jagged_restart_warmup_steps': 5 has no effect without "
                                          "jagged_restart_steps"):
        build_run_config({"base_model": "m", "jagged_restart_warmup_steps": 5})


def test_schedule_keys_are_checked_at_config_time():
    with pytest.raises(ConfigError, match=r"'lr_scheduler_kwargs': \['power'\] are not arguments of schedule "
                                          r"'cosine'; accepted: num_cycles"):
        build_run_config({"base_model": "m", "lr_scheduler": "cosine", "lr_scheduler_kwargs": {"power": 2}})
    with pytest.raises(ConfigError, match="'cosine_with_min_lr' needs min_lr or min_lr_rate"):
        build_run_config({"base_model": "m", "lr_scheduler": "cosine_with_min_lr"})
    with pytest.raises(ConfigError, match="'reduce_lr_on_plateau' is not supported by Plait"):
        build_run_config({"base_model": "m", "lr_scheduler": "reduce_lr_on_plateau"})


@pytest.mark.parametrize("name", ["adamw_torch_4bit", "adamw_torch_8bit"])
def test_torchao_optimizers_need_torchao(name):
    if importlib.util.find_spec("torchao") is not None:
        cfg, pm = build_run_config({"base_model": "m", "optimizer": name})
        param = torch.nn.Parameter(torch.randn(256, 256))
        assert pm.hook.build_optimizer(cfg=cfg, params=[{"params": [param], "weight_decay": 0.0}]) is not None
        return
    with pytest.raises(ConfigError, match=f"config key 'optimizer': '{name}' needs torchao, which is not "
                                          f"installed; pip install torchao"):
        build_run_config({"base_model": "m", "optimizer": name})


@pytest.mark.parametrize("old, name", [("ao_adamw_4bit", "adamw_torch_4bit"), ("ao_adamw_8bit", "adamw_torch_8bit")])
def test_axolotls_torchao_names_build_the_same_optimizer(old, name):
    pytest.importorskip("torchao")
    built = {}
    for optimizer in (old, name):
        cfg, pm = build_run_config({"base_model": "m", "optimizer": optimizer, "learning_rate": 0.02,
                                    "weight_decay": 0.1, "adam_beta2": 0.95})
        param = torch.nn.Parameter(torch.randn(256, 256))
        built[optimizer] = pm.hook.build_optimizer(cfg=cfg, params=[{"params": [param], "weight_decay": 0.1}])
    assert type(built[old]) is type(built[name]) and type(built[old]).__module__.startswith("torchao")
    assert built[old].defaults == built[name].defaults and built[old].defaults["lr"] == 0.02



def test_axolotls_own_optimizers_are_named_as_such():
    with pytest.raises(ConfigError, match="'optimizer': 'came_pytorch' is one of Axolotl's own optimizers, which "
                                          "Plait does not have; use adamw_torch"):
        build_run_config({"base_model": "m", "optimizer": "came_pytorch"})


@pytest.mark.parametrize("name, cls", [("adagrad", torch.optim.Adagrad), ("rmsprop", torch.optim.RMSprop)])
def test_torch_optimizers_take_the_configured_keys(name, cls):
    cfg, pm = build_run_config({"base_model": "m", "optimizer": name, "learning_rate": 0.05, "weight_decay": 0.01,
                                "optim_args": {"eps": 1e-6}})
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = pm.hook.build_optimizer(cfg=cfg, params=[{"params": [param], "weight_decay": 0.01}])
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, cls) and (group["lr"], group["weight_decay"], group["eps"]) == (0.05, 0.01, 1e-6)
    with pytest.raises(ConfigError, match=r"'optim_args': \['epz'\] are not arguments of torch.optim"):
        build_run_config({"base_model": "m", "optimizer": name, "optim_args": {"epz": 1e-6}})


def _schedule_factors(keys: dict, total: int) -> list[float]:
    cfg, pm = build_run_config({"base_model": "m", "learning_rate": 1.0, **keys})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    return _lrs(pm.hook.build_scheduler(cfg=cfg, optimizer=opt, total_steps=total), opt, total)


def test_cosine_constant_lr_ratio_decays_to_the_floor_then_holds_it():
    """Axolotl's cosine_constant_lr_ratio: over 20 steps with 2 of warmup and
    ratio 0.5, the cosine reaches cosine_min_lr_ratio (0.1) at step
    int(20 * 0.5) = 10 and stays there. Values worked out by hand from
    min + (1 - min) * (1 + cos(pi * (step - 2) / 8)) / 2."""
    lrs = _schedule_factors({"warmup_steps": 2, "cosine_min_lr_ratio": 0.1, "cosine_constant_lr_ratio": 0.5}, 20)
    expected = {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.1 + 0.9 * (1 + 2 ** -0.5) / 2, 6: 0.55, 10: 0.1, 15: 0.1, 19: 0.1}
    assert {step: lrs[step] for step in expected} == pytest.approx(expected, abs=1e-12)
    # 0 (the Axolotl examples' value): the plain cosine to the floor over the whole run
    assert _schedule_factors({"warmup_steps": 2, "cosine_min_lr_ratio": 0.1, "cosine_constant_lr_ratio": 0}, 20) == \
        _schedule_factors({"warmup_steps": 2, "cosine_min_lr_ratio": 0.1}, 20)
    with pytest.raises(ConfigError, match=r"'cosine_constant_lr_ratio': 0.5 has no effect on lr_scheduler 'linear'"):
        build_run_config({"base_model": "m", "lr_scheduler": "linear", "cosine_constant_lr_ratio": 0.5})
    with pytest.raises(ConfigError, match=r"cosine_constant_lr_ratio"):
        build_run_config({"base_model": "m", "cosine_constant_lr_ratio": 1.5})


def test_lr_quadratic_warmup_squares_the_warmup():
    """Step i of w warms up to (i / w) ** 2; the cosine after it is unchanged
    (12 steps, 4 of warmup: step 8 is half way down, 0.5)."""
    lrs = _schedule_factors({"warmup_steps": 4, "lr_quadratic_warmup": True}, 12)
    expected = {0: 0.0, 1: 1 / 16, 2: 0.25, 3: 9 / 16, 4: 1.0, 8: 0.5}
    assert {step: lrs[step] for step in expected} == pytest.approx(expected, abs=1e-12)
    linear = _schedule_factors({"warmup_steps": 4}, 12)
    assert lrs[4:] == pytest.approx(linear[4:], abs=1e-12) and linear[1] == pytest.approx(0.25)
    with pytest.raises(ConfigError, match=r"'lr_quadratic_warmup': true has no effect on lr_scheduler 'polynomial'"):
        build_run_config({"base_model": "m", "lr_scheduler": "polynomial", "lr_quadratic_warmup": True})

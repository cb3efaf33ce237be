"""The optimizer and schedule registries against transformers.

Every name of transformers' ``OptimizerNames`` and ``SchedulerType`` is either
registered (and built) or refused at config time with a message saying what
to install or why Plait cannot drive it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from plait.errors import ConfigError
from plait.registries import KNOWN_ELSEWHERE, find_optimizer, find_scheduler, registry
from plait.testing import build_run_config


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

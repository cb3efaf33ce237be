"""bitsandbytes optimizers built by the ``build_optimizer`` hook.

The 8-bit AdamW must track torch's AdamW given the same gradients: after 5
steps the parameters' distance from the torch result is under 5% of how far
torch moved them (relative Frobenius error of the update; measured 0.95%
here), while its two moment buffers are stored as uint8. The paged 32-bit
AdamW matches within 1e-3 (measured 2e-7).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from plait.testing import build_run_config

KEYS = {"base_model": "/nonexistent/model", "learning_rate": 1e-2, "weight_decay": 0.01,
        "adam_beta1": 0.85, "adam_beta2": 0.99, "adam_epsilon": 1e-7}


def run_steps(pm, cfg, steps=5):
    """Take ``steps`` optimizer steps on a 256x256 weight (over bitsandbytes'
    4096-element threshold for 8-bit state) with fixed random gradients."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(256, 256, generator=gen) * 0.1
    grads = [torch.randn(256, 256, generator=gen) for _ in range(steps)]
    param = torch.nn.Parameter(start.clone())
    optimizer = pm.hook.build_optimizer(cfg=cfg, params=[{"params": [param], "weight_decay": cfg.weight_decay}])
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    return start, param.detach(), optimizer, param


def torch_result(steps=5):
    cfg, pm = build_run_config({**KEYS, "optimizer": "adamw_torch"})
    start, end, optimizer, _ = run_steps(pm, cfg, steps)
    assert isinstance(optimizer, torch.optim.AdamW)
    return start, end


@pytest.mark.parametrize("name", ["adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"])
def test_8bit_adamw_tracks_torch_adamw(name):
    import bitsandbytes as bnb

    start, reference = torch_result()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paged on the CPU warns that it falls back; see test below
        cfg, pm = build_run_config({**KEYS, "optimizer": name})
        _, end, optimizer, param = run_steps(pm, cfg)
    assert isinstance(optimizer, bnb.optim.optimizer.Optimizer8bit)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-2, (0.85, 0.99), 1e-7, 0.01)
    state = optimizer.state[param]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    update_error = (end - reference).norm() / (reference - start).norm()
    assert update_error < 0.05


def test_paged_adamw_32bit_matches_torch_closely():
    start, reference = torch_result()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg, pm = build_run_config({**KEYS, "optimizer": "paged_adamw_32bit"})
        _, end, optimizer, param = run_steps(pm, cfg)
    assert optimizer.state[param]["state1"].dtype == torch.float32
    assert ((end - reference).norm() / (reference - start).norm()) < 1e-3


def test_paged_on_cpu_falls_back_as_bitsandbytes_does():
    """bitsandbytes 0.50 keeps paged state in ordinary memory when there is no
    CUDA device (with a warning) instead of failing; we let it, having warned
    at validation (test_bnb_config)."""
    if torch.cuda.is_available():
        pytest.skip("paging works on a CUDA device")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg, pm = build_run_config({**KEYS, "optimizer": "paged_adamw_8bit"})
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):
        _, end, _, _ = run_steps(pm, cfg, steps=1)
    assert torch.isfinite(end).all()


def test_optim_args_reach_the_optimizer():
    cfg, pm = build_run_config({**KEYS, "optimizer": "adamw_8bit", "optim_args": {"amsgrad": False, "min_8bit_size": 10**6}})
    _, _, optimizer, param = run_steps(pm, cfg, steps=1)
    # the weight is under the raised threshold, so its state is kept in float32
    assert optimizer.state[param]["state1"].dtype == torch.float32


def test_transformers_bnb_names_are_registered_here():
    """transformers' other bitsandbytes names (lion_8bit, ...) build through
    transformers' own resolution, with Plait's learning rate and betas; without
    plait-bnb the name says what to install, at config time."""
    import bitsandbytes as bnb

    from plait.errors import ConfigError

    cfg, pm = build_run_config({**KEYS, "optimizer": "lion_8bit"})
    _, end, optimizer, _ = run_steps(pm, cfg, steps=1)
    assert isinstance(optimizer, bnb.optim.Lion) and torch.isfinite(end).all()
    assert (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"]) == (1e-2, (0.85, 0.99))
    from plait.config import build_config
    from plait.plugins import build_plugin_manager

    without_bnb = build_plugin_manager(disable=["bnb"])
    with pytest.raises(ConfigError, match="'lion_8bit' is a bitsandbytes optimizer; install plait-bnb"):
        build_config(without_bnb, {**KEYS, "optimizer": "lion_8bit"})

"""Training keys that had no test of their own: ``max_grad_norm`` (clipping, and 0
meaning none), ``warmup_ratio``, the ``adafactor`` and ``adamw_torch_fused``
optimizers, and ``saves_per_epoch``. In process, on pre-tokenized rows, a few steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from plait.testing import build_run_config

# reuse the loop tests' helpers (pytest's importlib mode does not put tests/ on sys.path)
sys.path.insert(0, str(Path(__file__).parent))
from test_train_loop import data, losses, run_train, tiny_model  # noqa: E402,F401


# ------------------------------------------------------------------ max_grad_norm


def one_sgd_step(model_dir, output_dir, max_grad_norm):
    """One plain SGD step (no momentum, constant lr 1, fp32): the update is -g, clipped or not.
    Returns the logged grad_norm and the update of every parameter, flattened."""
    from transformers import AutoModelForCausalLM

    run = run_train({"base_model": str(model_dir), "output_dir": str(output_dir), "optimizer": "sgd",
                     "optim_args": {"momentum": 0.0}, "learning_rate": 1.0, "lr_scheduler": "constant",
                     "max_steps": 1, "micro_batch_size": 4, "bf16": False, "max_grad_norm": max_grad_norm},
                    data(4, 0))
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    trained = dict(run.model.named_parameters())
    update = torch.cat([(trained[name].detach().float() - param).flatten()
                        for name, param in base.named_parameters()])
    (record,) = [r for r in run.metrics_log.read() if "grad_norm" in r]
    return record["grad_norm"], update


def test_max_grad_norm_zero_is_accepted_and_means_no_clipping():
    cfg, _ = build_run_config({"base_model": "m", "max_grad_norm": 0})
    assert cfg.max_grad_norm == 0


def test_max_grad_norm_clips_the_update_and_logs_the_norm_before_clipping(tiny_model, tmp_path):
    norm_free, free = one_sgd_step(tiny_model, tmp_path / "free", 0)  # 0: no clipping
    # blank (null): Axolotl leaves HF Trainer's default, clipping at 1.0
    norm_none, blank = one_sgd_step(tiny_model, tmp_path / "none", None)
    _, at_one = one_sgd_step(tiny_model, tmp_path / "one", 1.0)
    bound = 1e-2
    norm_clipped, clipped = one_sgd_step(tiny_model, tmp_path / "clipped", bound)

    # the same gradient each time, and the logged norm is the one before clipping
    assert norm_free == pytest.approx(norm_none, rel=1e-6)
    assert norm_clipped == pytest.approx(norm_free, rel=1e-6)
    assert norm_free > 10 * bound
    torch.testing.assert_close(blank, at_one, rtol=0, atol=0)
    # unclipped: the update is the whole gradient (lr 1)
    assert free.norm().item() == pytest.approx(norm_free, rel=1e-3)
    # clipped: the same direction, scaled down to the bound
    assert clipped.norm().item() == pytest.approx(bound, rel=1e-3)
    torch.testing.assert_close(clipped, free * (bound / norm_free), rtol=1e-3, atol=1e-7)


# ------------------------------------------------------------------ warmup_ratio


def test_warmup_ratio_ramps_the_learning_rate_over_that_share_of_the_steps(tiny_model, tmp_path):
    # 16 rows / micro_batch_size 2: 8 steps; warmup_ratio 0.4 x 8 = 3.2, truncated to 3 warmup steps (Axolotl's int())
    run = run_train({"base_model": str(tiny_model), "output_dir": str(tmp_path / "out"), "learning_rate": 1e-3,
                     "lr_scheduler": "constant", "warmup_ratio": 0.4, "micro_batch_size": 2}, data(16, 0))
    assert run.total_steps == 8
    logged = [r["lr"] for r in run.metrics_log.read() if "lr" in r]
    warmup = 3
    ramp = [1e-3 * step / warmup for step in range(warmup)]  # transformers' warmup: step i of w gets i / w
    assert logged == pytest.approx(ramp + [1e-3] * (8 - warmup), rel=1e-12)


@pytest.mark.parametrize("keys,total,expected", [
    ({"warmup_ratio": 0.3}, 8, 2),      # 2.4: truncated, where rounding up would give 3
    ({"warmup_ratio": 0.29}, 100, 28),  # 28.999...: Python's int(), as Axolotl computes it
    ({"warmup_ratio": 0.15}, 8, 2),     # 1.2 -> 1 -> 2: Axolotl raises a one-step warm-up to two
    ({"warmup_ratio": 0.1}, 8, 0),      # 0.8 -> 0: no warm-up
    ({"warmup_steps": 1}, 8, 2),        # the same rule for a count given
    ({"warmup_steps": 5}, 8, 5),
    ({"warmup_steps": 20}, 8, 8),
    ({"warmup_steps": 0.3}, 8, 3),      # a fraction: transformers' reading, rounded up
    ({}, 8, 0),                         # neither key: Axolotl's min(int(0.03 x steps), 100)
    ({}, 40, 2),                        # 1.2 -> 1 -> 2
    ({}, 1000, 30),
    ({}, 10000, 100),
    ({"warmup_steps": 0}, 1000, 0),     # 0 turns it off
])
def test_warmup_counts_as_axolotl_counts_them(keys, total, expected):
    # Axolotl's trainer builder: int(warmup_ratio * total_num_steps), with neither key
    # min(int(0.03 * total_num_steps), 100); then `if warmup_steps == 1: warmup_steps = 2`
    from plait.builtin.optim import warmup_steps

    cfg, _ = build_run_config({"base_model": "m", **keys})
    assert warmup_steps(cfg, total) == expected


def test_warmup_steps_below_one_is_a_fraction_of_the_run(tiny_model, tmp_path):
    # transformers' reading of warmup_steps (Axolotl passes it on): 0.3 x 8 steps = 2.4, rounded up to 3
    run = run_train({"base_model": str(tiny_model), "output_dir": str(tmp_path / "out"), "learning_rate": 1e-3,
                     "lr_scheduler": "constant", "warmup_steps": 0.3, "micro_batch_size": 2}, data(16, 0))
    logged = [r["lr"] for r in run.metrics_log.read() if "lr" in r]
    assert logged == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3] + [1e-3] * 5, rel=1e-12)


@pytest.mark.parametrize("value,message", [(2.5, "a whole number of steps, or a fraction of the run between 0 and 1"),
                                           (-0.1, "greater than or equal to 0")])
def test_warmup_steps_rejects_what_is_neither_a_count_nor_a_fraction(value, message):
    from plait.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"warmup_steps.*{message}"):
        build_run_config({"base_model": "m", "warmup_steps": value})
    assert build_run_config({"base_model": "m", "warmup_steps": 4.0})[0].warmup_steps == 4  # a whole float is a count


# ------------------------------------------------------------------ optimizers


# torch's Adafactor scales lr by each parameter's RMS (about 0.02 here), hence the large lr
@pytest.mark.parametrize("name,cls,lr", [("adafactor", torch.optim.Adafactor, 1e-1),
                                         ("adamw_torch_fused", torch.optim.AdamW, 3e-3)])
def test_optimizer_is_the_expected_class_and_reduces_loss(tiny_model, tmp_path, name, cls, lr):
    run = run_train({"base_model": str(tiny_model), "output_dir": str(tmp_path / name), "optimizer": name,
                     "learning_rate": lr, "lr_scheduler": "constant", "micro_batch_size": 4, "max_steps": 6},
                    data(24, 0))
    assert type(run.optimizer) is cls
    if name == "adamw_torch_fused" and torch.cuda.is_available():
        assert run.optimizer.defaults["fused"]
    curve = losses(run)
    assert sum(curve[-2:]) / 2 < curve[0] - 0.5, curve


# ------------------------------------------------------------------ saves_per_epoch


def test_saves_per_epoch_writes_the_expected_checkpoints(tiny_model, tmp_path):
    # 16 rows / micro_batch_size 4: 4 steps an epoch; 2 saves an epoch over 2 epochs: every 2 steps
    out = tmp_path / "out"
    run = run_train({"base_model": str(tiny_model), "output_dir": str(out), "micro_batch_size": 4,
                     "num_epochs": 2, "saves_per_epoch": 2}, data(16, 0))
    assert run.steps_per_epoch == 4 and run.total_steps == 8
    names = sorted((p.name for p in out.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert all((out / n / "trainer_state.json").is_file() for n in names)

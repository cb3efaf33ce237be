"""accelerator_config: the HF Trainer's accelerate settings, noted where they change nothing, refused otherwise."""

import pytest

from plait.errors import ConfigError
from plait.testing import build_run_config


def test_settings_about_batch_delivery_and_gradient_sync_are_noted():
    cfg, _ = build_run_config({"base_model": "m", "gradient_accumulation_steps": 4, "accelerator_config": {
        "gradient_accumulation_kwargs": {"sync_each_batch": True, "num_steps": 4}, "non_blocking": True,
        "split_batches": False}})
    note = next(n for n in cfg.notes if n.startswith("accelerator_config:"))
    for key in ("gradient_accumulation_kwargs.sync_each_batch", "gradient_accumulation_kwargs.num_steps",
                "non_blocking", "split_batches"):
        assert key in note


@pytest.mark.parametrize("settings, message", [
    ({"split_batches": True}, "split_batches: True"),
    ({"gradient_accumulation_kwargs": {"num_steps": 8}}, "gradient_accumulation_kwargs.num_steps: 8"),
    ({"mixed_precision": "bf16"}, "mixed_precision: 'bf16' \\(not a setting Plait reads\\)"),
])
def test_settings_that_would_change_the_batches_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        build_run_config({"base_model": "m", "gradient_accumulation_steps": 4, "accelerator_config": settings})

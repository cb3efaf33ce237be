"""``lora_model_dir``: refused without ``adapter``, and LoRA shape keys set beside it
that the saved adapter overrides are named in one info line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from plait.errors import ConfigError
from plait.testing import build_run_config

# reuse the adapter tests' helpers (pytest's importlib mode does not put tests/ on sys.path)
sys.path.insert(0, str(Path(__file__).parent))
from test_peft_adapter import adapted, adapted_modules, tiny_model  # noqa: E402,F401


def test_lora_model_dir_without_adapter_is_an_error_before_the_model_loads(tmp_path):
    missing = str(tmp_path / "no-such-model")  # loading it would fail differently
    with pytest.raises(ConfigError, match=r"'lora_model_dir': .* is set but 'adapter' is not; "
                                          r"add adapter: lora \(or qlora\)"):
        build_run_config({"base_model": missing, "lora_model_dir": str(tmp_path / "adapter")})


@pytest.fixture(scope="module")
def saved_adapter(tiny_model, tmp_path_factory):
    """An adapter of rank 4 on q_proj and v_proj, alpha 16, no DoRA, saved by peft."""
    _, model = adapted({"base_model": str(tiny_model), "adapter": "lora", "lora_r": 4,
                        "lora_target_modules": ["q_proj", "v_proj"]})
    path = tmp_path_factory.mktemp("saved") / "adapter"
    model.save_pretrained(path)
    return path


def records(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "plait.peft"]


def test_set_keys_that_differ_from_the_saved_adapter_are_named_once(tiny_model, saved_adapter, caplog):
    caplog.set_level(logging.INFO, logger="plait.peft")
    _, model = adapted({"base_model": str(tiny_model), "adapter": "lora", "lora_model_dir": str(saved_adapter),
                        "lora_r": 16, "peft_use_dora": True,
                        "lora_alpha": 16, "lora_target_modules": ["v_proj", "q_proj"]})  # as saved
    (message,) = records(caplog)
    assert "settings saved in" in message and "adapter_config.json" in message
    assert "lora_r: 16 (saved 4)" in message and "peft_use_dora: True (saved False)" in message
    assert "lora_alpha" not in message and "lora_target_modules" not in message
    # the saved adapter's settings are the ones used
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    assert lora_a.shape[0] == 4 and adapted_modules(model) == {"q_proj", "v_proj"}
    assert not any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


def test_keys_matching_the_saved_adapter_log_nothing(tiny_model, saved_adapter, caplog):
    caplog.set_level(logging.INFO, logger="plait.peft")
    adapted({"base_model": str(tiny_model), "adapter": "lora", "lora_model_dir": str(saved_adapter),
             "lora_r": 4, "lora_dropout": 0.0})
    assert records(caplog) == []


def test_an_adapter_dir_that_is_not_local_is_not_read(tmp_path):
    from plait_peft.adapter import keys_differing_from_saved_adapter

    cfg, _ = build_run_config({"base_model": "m", "adapter": "lora", "lora_model_dir": "someone/adapter",
                               "lora_r": 64})
    assert keys_differing_from_saved_adapter(cfg, "someone/adapter") == []

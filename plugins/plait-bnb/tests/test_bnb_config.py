"""Every validation rule of plait-bnb fails before any model work, naming the keys."""

from __future__ import annotations

import warnings

import pytest

from plait.errors import ConfigError
from plait.testing import build_run_config

#: no such directory: a rule that fired after loading would fail differently
BASE = {"base_model": "/nonexistent/model"}
QLORA = {**BASE, "adapter": "qlora", "load_in_4bit": True, "lora_target_linear": True}


def test_defaults_and_qlora_config_accepted():
    cfg, _ = build_run_config(QLORA)
    assert (cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant) == ("nf4", True)
    assert cfg.bnb_4bit_compute_dtype is None and cfg.load_in_8bit is False


def test_8bit_lora_accepted():
    cfg, _ = build_run_config({**BASE, "adapter": "lora", "load_in_8bit": True, "lora_target_linear": True})
    assert cfg.load_in_8bit


def test_4bit_and_8bit_together_refused():
    with pytest.raises(ConfigError, match="load_in_4bit: true and load_in_8bit: true"):
        build_run_config({**QLORA, "load_in_8bit": True})


def test_4bit_full_finetune_refused():
    with pytest.raises(ConfigError, match="load_in_4bit: true needs adapter: qlora.*'adapter' is None"):
        build_run_config({**BASE, "load_in_4bit": True})


def test_8bit_full_finetune_refused():
    with pytest.raises(ConfigError, match="load_in_8bit: true needs an adapter.*adapter: lora"):
        build_run_config({**BASE, "load_in_8bit": True})


def test_qlora_without_4bit_refused(monkeypatch):
    # plait-peft refuses this too and is asked first; disable it to reach our own rule
    monkeypatch.setenv("PLAIT_DISABLE_PLUGINS", "peft")
    with pytest.raises(ConfigError, match="'adapter': 'qlora'.*set load_in_4bit: true"):
        build_run_config({**BASE, "adapter": "qlora"})


def test_qlora_with_8bit_refused(monkeypatch):
    monkeypatch.setenv("PLAIT_DISABLE_PLUGINS", "peft")
    with pytest.raises(ConfigError, match="load_in_4bit"):
        build_run_config({**BASE, "adapter": "qlora", "load_in_8bit": True})


def test_4bit_keys_without_4bit_refused():
    with pytest.raises(ConfigError, match="bnb_4bit_quant_type, bnb_4bit_compute_dtype set but load_in_4bit is not"):
        build_run_config({**BASE, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": "bfloat16"})


def test_bad_quant_type_refused():
    with pytest.raises(ConfigError, match="'bnb_4bit_quant_type': 'int4' is not accepted.*'nf4' or 'fp4'"):
        build_run_config({**QLORA, "bnb_4bit_quant_type": "int4"})


def test_unknown_bnb_config_kwarg_refused():
    with pytest.raises(ConfigError, match=r"'bnb_config_kwargs': \['llm_int4_threshold'\].*accepted: .*llm_int8_threshold"):
        build_run_config({**QLORA, "bnb_config_kwargs": {"llm_int4_threshold": 6.0}})


def test_bnb_config_kwarg_repeating_a_key_refused():
    with pytest.raises(ConfigError, match=r"'bnb_config_kwargs' repeats \['bnb_4bit_quant_type'\], also set at the top"):
        build_run_config({**QLORA, "bnb_4bit_quant_type": "nf4", "bnb_config_kwargs": {"bnb_4bit_quant_type": "fp4"}})


def test_axolotl_sets_4bit_options_in_bnb_config_kwargs():
    from plait_bnb.quantize import quantization_config

    cfg, _ = build_run_config({**QLORA, "bnb_config_kwargs": {"bnb_4bit_use_double_quant": False,
                                                              "bnb_4bit_quant_type": "fp4"}})
    made = quantization_config(cfg)
    assert made.bnb_4bit_use_double_quant is False and made.bnb_4bit_quant_type == "fp4"


def _needs_parallel_keys():
    cfg, _ = build_run_config(QLORA)
    if "fsdp" not in type(cfg).model_fields:
        pytest.skip("no plugin declares the fsdp key (plait-parallel)")


def test_fsdp_sets_float_quant_storage():
    _needs_parallel_keys()
    cfg, _ = build_run_config({**QLORA, "fsdp": ["full_shard"], "torch_dtype": "bfloat16"})
    assert cfg.bnb_4bit_quant_storage == "bfloat16"
    assert cfg.source_of("bnb_4bit_quant_storage") == "plugin:bnb"


def test_fsdp_with_uint8_storage_refused():
    _needs_parallel_keys()
    with pytest.raises(ConfigError, match="'bnb_4bit_quant_storage': 'uint8' cannot be sharded.*bfloat16"):
        build_run_config({**QLORA, "fsdp_version": 2, "bnb_4bit_quant_storage": "uint8"})


def test_fsdp_with_8bit_says_the_int8_weights_stay_whole():
    _needs_parallel_keys()
    cfg, _ = build_run_config({**BASE, "adapter": "lora", "load_in_8bit": True, "lora_target_linear": True,
                               "fsdp": True})
    assert any(note.startswith("load_in_8bit with FSDP: the int8 base weights (and their row scales) are not "
                               "sharded") for note in cfg.notes)


def test_unknown_optim_args_for_8bit_optimizer_refused():
    with pytest.raises(ConfigError, match=r"'optim_args': \['momentum'\].*AdamW8bit.*accepted: .*min_8bit_size"):
        build_run_config({**QLORA, "optimizer": "adamw_8bit", "optim_args": {"momentum": 0.9}})


def test_paged_optimizer_on_cpu_warns_at_validation():
    import torch

    if torch.cuda.is_available():
        pytest.skip("paging works on a CUDA device")
    with pytest.warns(UserWarning, match="paging needs a CUDA device"):
        build_run_config({**QLORA, "optimizer": "paged_adamw_8bit"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_run_config({**QLORA, "optimizer": "adamw_8bit"})


def test_4bit_with_plain_lora_refused():
    # whichever of plait-peft and plait-bnb answers first, the message says to write adapter: qlora
    with pytest.raises(ConfigError, match="adapter: qlora"):
        build_run_config({**BASE, "adapter": "lora", "load_in_4bit": True, "lora_target_linear": True})


def test_keys_need_the_plugin(monkeypatch):
    monkeypatch.setenv("PLAIT_DISABLE_PLUGINS", "bnb")
    with pytest.raises(ConfigError, match=r"load_in_4bit: declared by plugin 'bnb' \(plait-bnb\), which is installed "
                                          r"but not loaded"):
        build_run_config(QLORA)

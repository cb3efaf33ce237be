"""The ``qat:`` block validates with Axolotl's meaning; bad pairs and sizes
are refused with the key, the value and what is accepted; what this machine
cannot run is a note at validate and a refusal at train."""

from __future__ import annotations

import pytest

from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model, run_cli, write_config, write_jsonl

pytest.importorskip("torchao")


def qat_cfg(block: dict, **keys):
    cfg, _ = build_run_config({"base_model": "m", "qat": block, **keys})
    return cfg.qat


def test_axolotl_examples_blocks_validate():
    block = qat_cfg({"activation_dtype": "int8", "weight_dtype": "int4", "group_size": 256,
                     "fake_quant_after_n_steps": 1000})
    assert (block.activation_dtype, block.weight_dtype, block.group_size, block.fake_quant_after_n_steps) == \
        ("int8", "int4", 256, 1000)
    assert qat_cfg({"activation_dtype": "fp8", "weight_dtype": "float8"}).weight_dtype == "float8_e4m3fn"
    assert qat_cfg({"weight_dtype": "mxfp4"}).group_size == 32
    # blank means unset, as in Axolotl
    cfg, _ = build_run_config({"base_model": "m", "qat": None})
    assert cfg.qat is None


@pytest.mark.parametrize("block, message", [
    ({"weight_dtype": "int3"}, r"'int3' is not a quantization dtype; accepted: int4, int8, float8_e4m3fn"),
    ({}, r"activation_dtype unset with weight_dtype int8 is not accepted \(torchao's QAT has no int8 "
         r"weight-only scheme\); accepted activation / weight pairs: unset / int4; int8 / int4"),
    ({"activation_dtype": "int4", "weight_dtype": "int4"}, r"no int4-activation / int4-weight scheme"),
    ({"activation_dtype": "int8", "weight_dtype": "float8"}, r"not a scheme torchao's QAT fake-quantizes"),
    ({"activation_dtype": "nvfp4", "weight_dtype": "nvfp4", "group_size": 32},
     r"'qat.group_size': 32 is not accepted with weight_dtype nvfp4, whose scales cover blocks of 16; accepted: 16"),
    ({"weight_dtype": "mxfp4", "group_size": 16}, r"blocks of 32; accepted: 32"),
    ({"weight_dtype": "int4", "group_size": None}, r"'qat.group_size': int4 weights are quantized per group"),
    ({"activation_dtype": "fp8", "weight_dtype": "fp8", "quantize_embedding": True},
     r"'qat.quantize_embedding': true is not accepted with weight_dtype float8_e4m3fn"),
    ({"weight_dtype": "mxfp4", "fake_quant_after_n_steps": 10}, r"'qat.fake_quant_after_n_steps': torchao's mxfp4"),
    ({"weight_dtype": "int4", "group_siz": 32}, r"group_siz"),
])
def test_bad_blocks_are_refused(block, message):
    with pytest.raises(ConfigError, match=message):
        build_run_config({"base_model": "m", "qat": block})


@pytest.mark.slow  # validate and train through the CLI
def test_nvfp4_is_a_machine_fact_without_a_blackwell_gpu(tmp_path):
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (10, 0):
        pytest.skip("this machine runs NVFP4")
    block = {"activation_dtype": "nvfp4", "weight_dtype": "nvfp4", "group_size": 16}
    with pytest.raises(ConfigError, match=r"'qat.weight_dtype': nvfp4 runs torchao's fp4 "
                                               r"matmuls, which need an NVIDIA Blackwell GPU"):
        build_run_config({"base_model": "m", "qat": block})
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "hello"}])
    config = write_config(tmp_path / "c.yml", base_model=str(make_tiny_model(tmp_path / "model")), qat=block,
                          datasets=[{"path": str(data), "type": "completion"}], output_dir=str(tmp_path / "out"))
    validated = run_cli(["config", "validate", str(config)])
    assert validated.exit_code == 0 and "need an NVIDIA Blackwell GPU" in validated.stdout + validated.stderr
    trained = run_cli(["train", str(config)])
    assert trained.exit_code == 2 and "need an NVIDIA Blackwell GPU" in trained.stderr
    assert not (tmp_path / "out").exists()


def test_missing_torchao_is_a_machine_fact(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    # torchao is installed here; hide it from the lookup the check makes
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ConfigError, match=r"config key 'qat' needs torchao, which is not installed; "
                                               r"pip install torchao"):
        build_run_config({"base_model": "m", "qat": {"activation_dtype": "int8", "weight_dtype": "int4"}})


def test_group_size_must_divide_the_layers(tmp_path):
    from plait.testing import build_run_config as build
    from transformers import AutoModelForCausalLM

    from plait_qat.fake_quant import prepare

    cfg, _ = build({"base_model": "m", "qat": {"weight_dtype": "int4", "group_size": 48}})
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m"))
    with pytest.raises(ConfigError, match=r"'qat.group_size': 48 does not divide the input size of 15 linear "
                                          r"layers: model.layers.0.self_attn.q_proj \(64\)"):
        prepare(model, cfg.qat)

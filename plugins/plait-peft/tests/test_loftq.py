"""LoftQ initialisation (Axolotl's ``peft: {loftq_config: {loftq_bits: 4}}``)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model, run_cli

LOFTQ = {"adapter": "lora", "lora_target_linear": True, "lora_r": 8, "peft": {"loftq_config": {"loftq_bits": 4}}}
HAS_GPU_AND_SCIPY = torch.cuda.is_available() and importlib.util.find_spec("scipy") is not None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("loftq") / "model")


@pytest.mark.parametrize("keys,match", [
    ({"adapter": "qlora", "load_in_4bit": True}, "with adapter: qlora, load_in_4bit: true the base is already"),
    ({"load_in_8bit": True}, "load_in_8bit: true the base is already quantized"),
    ({"lora_model_dir": "saved"}, "lora_model_dir continues a saved one"),
    ({"peft": {"loftq_config": {"loftq_bits": 3}}}, "loftq_bits"),
])
def test_loftq_rules(model_dir, keys, match):
    with pytest.raises(ConfigError, match=match):
        build_run_config({"base_model": str(model_dir), **LOFTQ, **keys})


@pytest.mark.skipif(HAS_GPU_AND_SCIPY, reason="this machine can run LoftQ")
def test_loftq_without_a_gpu_is_a_note_for_validate_and_a_refusal_for_train(model_dir, tmp_path):
    import yaml

    from plait.testing import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "one two three"}])
    config = tmp_path / "loftq.yml"
    config.write_text(yaml.safe_dump({"base_model": str(model_dir), "datasets": [{"path": str(data),
                                                                                "type": "completion"}], **LOFTQ}))
    result = run_cli(["config", "validate", str(config)])
    assert result.exit_code == 0, result.stderr
    assert "config key 'peft.loftq_config' needs" in result.stdout + result.stderr
    with pytest.raises(ConfigError, match="peft.loftq_config. needs"):
        build_run_config({"base_model": str(model_dir), **LOFTQ})


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU_AND_SCIPY, reason="LoftQ needs a CUDA device and scipy")
def test_loftq_starts_the_adapter_at_the_quantization_residual(model_dir):
    """Each adapted weight W becomes a quantized Q, and Q + B @ A is closer to
    W than Q alone: the adapter starts at a low-rank fit of W - Q. (peft fits
    B @ A itself; the forward scales it by lora_alpha / r on top.)"""
    from transformers import AutoModelForCausalLM

    cfg, pm = build_run_config({"base_model": str(model_dir), "bf16": False, **LOFTQ})
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = pm.hook.load_tokenizer(cfg=cfg)
    model = pm.hook.load_adapter(cfg=cfg, model=pm.hook.load_model(cfg=cfg, tokenizer=tokenizer))
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    w = original.get_submodule("model.layers.0.self_attn.q_proj").weight.detach().float().cpu()
    q = layer.base_layer.weight.detach().float().cpu()
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().float().cpu()
    assert not torch.equal(q, w)  # the base weight now holds its quantized value
    assert (w - (q + delta)).norm() < 0.9 * (w - q).norm()

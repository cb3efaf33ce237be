"""``plait quantize``: post-training quantization of a trained model with
torchao (Axolotl's ``quantization:`` block, or ``qat:``), saved so plain
transformers loads it quantized."""

from __future__ import annotations

import pytest
import torch

from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model, run_cli, write_config

pytest.importorskip("torchao")


@pytest.mark.slow  # quantizes, saves and reloads a model
def test_quantize_int8_int4_saves_a_model_transformers_loads_quantized(tmp_path):
    from transformers import AutoModelForCausalLM

    trained = make_tiny_model(tmp_path / "out")  # stands in for a finished run's output_dir
    config = write_config(tmp_path / "c.yml", base_model=str(trained), output_dir=str(tmp_path / "out"),
                          quantization={"activation_dtype": "int8", "weight_dtype": "int4", "group_size": 32})
    result = run_cli(["quantize", str(config)])
    assert result.exit_code == 0, result.stderr[-3000:]
    assert "int8 dynamic activations, int4 weights (per group), from quantization:" in result.stdout
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "quantized")
    assert quantized.config.quantization_config.quant_method == "torchao"
    weight = quantized.model.layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ == "IntxUnpackedToInt8Tensor"
    # int4 values per group of 32: the dequantized weight has at most 16 levels per group
    dense = weight.dequantize()
    assert all(len(torch.unique(group)) <= 16 for group in dense.reshape(-1, 32))
    original = AutoModelForCausalLM.from_pretrained(trained)
    ids = torch.tensor([[5, 17, 42, 9, 3, 77]])
    with torch.no_grad():
        got, want = quantized(input_ids=ids).logits, original(input_ids=ids).logits
    # int4 weights and int8 inputs move the logits, but only by the rounding: well under their spread
    assert 0 < (got - want).abs().max() < 0.25 * want.abs().max()


def test_quantize_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ConfigError, match=r"'quantization': activation_dtype unset with weight_dtype mxfp4 is not "
                                          r"accepted for post-training quantization \(torchao's MXFP4 weights cannot "
                                          r"be stored as safetensors\)"):
        build_run_config({"base_model": "m", "quantization": {"weight_dtype": "mxfp4"}})
    import torch as _torch

    if not (_torch.cuda.is_available() and _torch.cuda.get_device_capability() >= (8, 9)):
        with pytest.raises(ConfigError, match=r"float8 dynamic quantization needs a CUDA GPU of compute capability "
                                              r"8.9 or newer"):
            build_run_config({"base_model": "m", "quantization": {"activation_dtype": "fp8", "weight_dtype": "fp8"}})
    config = write_config(tmp_path / "c.yml", base_model="m", output_dir=str(tmp_path / "out"),
                          qat={"activation_dtype": "int8", "weight_dtype": "int4"},
                          quantization={"activation_dtype": "int8", "weight_dtype": "int4"})
    both = run_cli(["quantize", str(config)])
    assert both.exit_code == 2 and "config keys 'qat' and 'quantization' are both set" in both.stderr

"""``plait quantize CONFIG``: post-training quantization of the trained model
with torchao, as Axolotl's ``axolotl quantize``.

The layout is the config's ``quantization:`` block, or its ``qat:`` block
(the layout the model was trained to survive). The model in ``output_dir``
(or ``--model``) is loaded, its linear layers are quantized with torchao's
``quantize_`` and the result is saved with transformers' ``TorchAoConfig`` in
its ``config.json``, as safetensors, to ``output_dir/quantized`` (or
``--out``): ``AutoModelForCausalLM.from_pretrained`` loads it quantized.
"""

from __future__ import annotations

import torch

from plait.errors import ConfigError


def ptq_config(block):
    """torchao's post-training config for ``block`` (a validated pair)."""
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_api import (Float8DynamicActivationFloat8WeightConfig,
                                                Float8DynamicActivationInt4WeightConfig, Int4WeightOnlyConfig,
                                                Int8DynamicActivationIntxWeightConfig)

    pair = (block.activation_dtype, block.weight_dtype)
    if pair == (None, "int4"):
        return Int4WeightOnlyConfig(group_size=block.group_size or 128, version=2)
    if pair == ("int8", "int4"):
        granularity = {"weight_granularity": PerGroup(block.group_size)} if block.group_size else {}
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, **granularity)
    if pair == ("float8_e4m3fn", "float8_e4m3fn"):
        return Float8DynamicActivationFloat8WeightConfig()
    if pair == ("float8_e4m3fn", "int4"):
        return Float8DynamicActivationInt4WeightConfig()
    from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig

    return NVFP4WeightOnlyConfig()


def quantize_model(model, block) -> None:
    """Quantize ``model``'s linear layers (and embedding) in place and record
    the layout in its config so ``save_pretrained`` writes torchao's tensors."""
    from torchao.quantization import quantize_
    from transformers import TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    config = ptq_config(block)
    quantize_(model, config)
    if block.quantize_embedding:
        from types import SimpleNamespace

        embedding = ptq_config(SimpleNamespace(activation_dtype=None, weight_dtype="int4", group_size=block.group_size))
        quantize_(model, embedding, filter_fn=lambda module, fqn: isinstance(module, torch.nn.Embedding))
    ao_config = TorchAoConfig(quant_type=config, include_input_output_embeddings=bool(block.quantize_embedding))
    model.config.quantization_config = ao_config
    model.hf_quantizer = TorchAoHfQuantizer(ao_config)


def block_of(cfg):
    """``(block, key)`` to quantize with: ``quantization:``, else ``qat:``."""
    if cfg.quantization is not None and cfg.qat is not None:
        raise ConfigError("config keys 'qat' and 'quantization' are both set; plait quantize takes its layout from "
                          "one of them; accepted: quantization: (post-training) or qat: (the trained layout), not both")
    if cfg.quantization is not None:
        return cfg.quantization, "quantization"
    if cfg.qat is not None:
        return cfg.qat, "qat"
    raise ConfigError("plait quantize needs a quantization: or qat: block in the config (weight_dtype, "
                      "activation_dtype, group_size)")


def run_quantize(args, pm) -> int:
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plait.config import build_config, load_raw_config
    from plait_qat.config import PTQ_PAIRS, validate_ptq

    raw, sources = load_raw_config(args.config, args.overrides)
    cfg = build_config(pm, raw, sources)
    block, key = block_of(cfg)
    if key == "qat":  # the qat: block's pairs were checked for training; check them as a post-training layout too
        validate_ptq(block, key)
    model_dir = Path(args.model or cfg.output_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} holds no trained model (config.json); train first, or pass --model DIR "
                          "(a full fine-tune or a merged LoRA model)")
    out = Path(args.out or Path(cfg.output_dir) / "quantized")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    quantize_model(model, block)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    print(f"quantized {model_dir} ({PTQ_PAIRS[(block.activation_dtype, block.weight_dtype)][0]}, from {key}:) "
          f"to {out}")
    return 0

"""Quantized loading through the ``load_model`` hook, on the CPU.

Two references per quantized model:

* the fp32 model with each quantized weight replaced by its dequantized value
  must give the same logits up to the kernels' own rounding (1e-2 for 4-bit,
  whose CPU kernel multiplies in bfloat16; 2e-2 for int8, which quantizes
  activations too): the quantized layers compute what they should;
* the original fp32 model: logits differ by the quantization error alone,
  bounded here (relative Frobenius error) by 0.25 for 4-bit and 0.03 for
  8-bit. Measured on this random-init model: nf4 0.110, fp4 0.132, int8
  0.009 (against the dequantized references: 0.0035, 0.0036, 0.0058).
"""

from __future__ import annotations

import pytest
import torch

from plait.testing import build_run_config
from plait_bnb.reference import dequantized_model, logits_on_cpu, model_device

QLORA = {"adapter": "qlora", "load_in_4bit": True, "lora_target_linear": True}
LORA8 = {"adapter": "lora", "load_in_8bit": True, "lora_target_linear": True}


def load(model_dir, **keys):
    cfg, pm = build_run_config({"base_model": str(model_dir), **keys})
    tokenizer = pm.hook.load_tokenizer(cfg=cfg)
    return cfg, pm, tokenizer, pm.hook.load_model(cfg=cfg, tokenizer=tokenizer)


def reference(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def logits(model, ids):
    """Float32 logits on the CPU, whatever device the loader put ``model`` on."""
    return logits_on_cpu(model, ids)


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


IDS = torch.randint(10, 500, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("quant_type,bound", [("nf4", 0.25), ("fp4", 0.25)])
def test_4bit_load(tiny_model_dir, quant_type, bound):
    import bitsandbytes as bnb

    cfg, _, _, model = load(tiny_model_dir, **QLORA, bnb_4bit_quant_type=quant_type)
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # q k v o gate up down in each of 2 layers; the head stays unquantized
    assert all(m.weight.quant_state.quant_type == quant_type for m in linears)
    assert linears[0].weight.quant_state.nested  # double quant by default
    assert model.is_loaded_in_4bit and model.config.use_cache is False
    assert not any(p.requires_grad for p in model.parameters())

    # dequantize before the first forward: on AVX512-BF16 CPUs bitsandbytes repacks the weight then
    dequantized = dequantized_model(tiny_model_dir, model)
    out = logits(model, IDS)
    # bitsandbytes' CPU 4-bit kernel multiplies in bfloat16 (measured 0.0035 here), hence not 1e-4
    assert rel_error(out, logits(dequantized, IDS)) < 1e-2
    error = rel_error(out, logits(reference(tiny_model_dir), IDS))
    assert 1e-4 < error < bound  # quantized for real, within the 4-bit error


def test_8bit_load(tiny_model_dir):
    import bitsandbytes as bnb

    _, _, _, model = load(tiny_model_dir, **LORA8)
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(linears) == 14 and all(m.weight.dtype == torch.int8 for m in linears)
    dequantized = dequantized_model(tiny_model_dir, model)
    out = logits(model, IDS)
    # int8 matmuls quantize activations too (measured 0.006 here), so this reference is no closer than the original
    assert rel_error(out, logits(dequantized, IDS)) < 2e-2
    assert 1e-5 < rel_error(out, logits(reference(tiny_model_dir), IDS)) < 0.03


def test_not_quantized_leaves_loading_to_core(tiny_model_dir):
    _, _, _, model = load(tiny_model_dir, adapter="lora", lora_target_linear=True)
    assert not getattr(model, "is_loaded_in_4bit", False)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_compute_dtype_defaults_to_run_dtype_and_nothing_upcast(tiny_model_dir):
    _, _, _, model = load(tiny_model_dir, **QLORA, torch_dtype="bfloat16")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.compute_dtype == torch.bfloat16
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    assert floats == {torch.bfloat16}  # embeddings, head and norms stay in the compute dtype


def test_explicit_compute_dtype_and_storage(tiny_model_dir):
    _, _, _, model = load(tiny_model_dir, **QLORA, torch_dtype="bfloat16", bnb_4bit_compute_dtype="float32",
                          bnb_4bit_quant_storage="bfloat16")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.compute_dtype == torch.float32
    assert q_proj.weight.dtype == torch.bfloat16  # packed 4-bit data viewed as bf16, for FSDP2


def test_embeddings_resized_for_added_tokens(tiny_model_dir):
    _, _, tokenizer, model = load(tiny_model_dir, **QLORA, tokens=["<tool>", "</tool>", "<think>"])
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert logits(model, torch.tensor([[len(tokenizer) - 1]])).shape[-1] == len(tokenizer)


def test_gradient_checkpointing_and_input_grads(tiny_model_dir):
    from plait.pipeline import setup_model

    cfg, pm, tokenizer, loaded = load(tiny_model_dir, **QLORA, gradient_checkpointing=True)
    assert not loaded.is_gradient_checkpointing  # the loader prepares; core's model pipeline switches it on
    model = setup_model(cfg, pm, tokenizer, for_training=True, device=torch.device("cpu"))
    assert model.is_gradient_checkpointing
    hidden = model.get_input_embeddings()(IDS.to(model_device(model)))
    assert hidden.requires_grad  # gradients can reach adapters through the frozen embedding


@pytest.mark.gpu
def test_4bit_load_on_gpu(tiny_model_dir):
    """On a GPU the whole model is placed on this process's device while loading."""
    _, _, _, model = load(tiny_model_dir, **QLORA, torch_dtype="bfloat16")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    dequantized = dequantized_model(tiny_model_dir, model)
    out = logits(model, IDS.cuda()).cpu()
    assert rel_error(out, logits(dequantized, IDS)) < 2e-2  # bf16 compute


def test_4bit_loads_a_text_only_checkpoint_of_a_composite_model(tiny_model_dir, tmp_path):
    # MllamaForCausalLM saves MllamaTextConfig, which AutoModelForCausalLM does not map: the quantized
    # loader takes the class the checkpoint names, as core's loader does (plait.model.loading.causal_lm_class_of)
    import bitsandbytes as bnb
    from transformers import AutoTokenizer, MllamaForCausalLM, MllamaTextConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = MllamaTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                              pad_token_id=tokenizer.pad_token_id, architectures=["MllamaForCausalLM"])
    torch.manual_seed(0)
    MllamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, _, _, model = load(tmp_path, **QLORA)
    assert type(model) is MllamaForCausalLM and model.is_loaded_in_4bit
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.layers[1].modules())  # the cross-attention layer
    dequantized = dequantized_model(tmp_path, model)
    assert rel_error(logits(model, IDS), logits(dequantized, IDS)) < 1e-2  # the 4-bit CPU kernel's bf16 rounding

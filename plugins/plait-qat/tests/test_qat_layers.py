"""What prepare swaps, on small models built in memory: micro-scaling layouts
run on the CPU, embeddings fake-quantize to int4 keeping a tied head tied,
and under LoRA only the base layers are fake-quantized."""

from __future__ import annotations

import pytest
import torch

from plait.testing import build_run_config

pytest.importorskip("torchao")


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, **overrides)
    return LlamaForCausalLM(config)


def qat_block(**block):
    cfg, _ = build_run_config({"base_model": "m", "qat": block})
    return cfg.qat


def test_mxfp4_fake_quantizes_and_trains_on_the_cpu():
    from plait_qat.fake_quant import prepare

    model = tiny_llama()
    changes = prepare(model, qat_block(weight_dtype="mxfp4"))
    assert changes == {"8 linear layers": "torchao fake quantization, MXFP4 activations and weights (blocks of 32)"}
    assert all(type(m).__name__ == "MXFakeQuantizedLinear" for n, m in model.named_modules() if n.endswith("q_proj"))
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_embedding_fake_quantization_keeps_a_tied_head_tied():
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear

    from plait_qat.fake_quant import convert, prepare

    model = tiny_llama(tie_word_embeddings=True)
    block = qat_block(weight_dtype="int4", group_size=32, quantize_embedding=True)
    prepare(model, block)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, FakeQuantizedEmbedding) and isinstance(head, FakeQuantizedLinear)
    assert head.weight is embed.weight
    # the embedding looks its rows up in the fake-quantized table: at most 16 values per group of 32
    looked_up = embed(torch.tensor([[5]]))[0, 0]
    assert all(len(torch.unique(group)) <= 16 for group in looked_up.reshape(-1, 32))
    assert not torch.equal(looked_up, embed.weight[5])
    convert(model, block)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_lora_matrices_stay_full_precision():
    from peft import LoraConfig, get_peft_model
    from torchao.quantization.qat import FakeQuantizedLinear

    from plait_qat.fake_quant import prepare

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    prepare(model, qat_block(activation_dtype="int8", weight_dtype="int4", group_size=32))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, FakeQuantizedLinear)
    assert type(q_proj.lora_A["default"]) is torch.nn.Linear and type(q_proj.lora_B["default"]) is torch.nn.Linear

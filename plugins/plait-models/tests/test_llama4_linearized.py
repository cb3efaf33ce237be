"""``llama4_linearized_experts``: Llama 4's routed experts built one
``nn.Linear`` per expert, on a tiny ``llama4_text`` model.

Tolerance: the linearized module multiplies the same float32 weights
(transposed into ``nn.Linear`` layout) per expert instead of in one batched
matmul, so outputs agree to float32 rounding (1e-5; measured 8e-8 relative)."""

from __future__ import annotations

import pytest
import torch

from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model

IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 64, 2]])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from plait_models.llama4_experts import save_linearized_checkpoint

    root = tmp_path_factory.mktemp("llama4")
    fused = make_tiny_model(root / "fused", family="llama4_text", num_local_experts=4, num_experts_per_tok=1,
                            intermediate_size=64, intermediate_size_mlp=128, head_dim=16,
                            interleave_moe_layer_step=1)
    return fused, save_linearized_checkpoint(fused, root / "linearized")


def test_linearized_experts_compute_what_the_fused_ones_do():
    from transformers import AutoConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    from plait_models.llama4_experts import linearized_from_fused

    config = AutoConfig.for_model("llama4_text", hidden_size=32, intermediate_size=48, num_local_experts=3)
    fused = Llama4TextExperts(config)
    torch.nn.init.normal_(fused.gate_up_proj, std=0.2)
    torch.nn.init.normal_(fused.down_proj, std=0.2)
    routed = torch.randn(3 * 5, 32)  # 5 tokens, repeated per expert as Llama4TextMoe does
    linear = linearized_from_fused(fused, config)
    torch.testing.assert_close(linear(routed), fused(routed), rtol=1e-5, atol=1e-5)


def test_a_linearized_checkpoint_loads_per_expert_linears_and_lora_reaches_them(checkpoints):
    from transformers import AutoModelForCausalLM

    fused_dir, linear_dir = checkpoints
    reference = AutoModelForCausalLM.from_pretrained(fused_dir, dtype=torch.float32)
    cfg, pm = build_run_config({"base_model": str(linear_dir), "llama4_linearized_experts": True, "bf16": False,
                                "adapter": "lora", "lora_target_linear": True, "lora_r": 4})
    model = pm.hook.load_model(cfg=cfg, tokenizer=None)
    experts = model.model.layers[0].feed_forward.experts
    assert type(experts).__name__ == "LinearizedLlama4Experts" and len(experts.gate_projs) == 4
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, reference(input_ids=IDS).logits,
                                   rtol=1e-5, atol=1e-5)
    adapted = pm.hook.load_adapter(cfg=cfg, model=model)
    targets = {n.split(".lora_A")[0].split("feed_forward.")[-1] for n, _ in adapted.named_parameters()
               if ".lora_A." in n and "layers.0." in n}
    assert {f"experts.{proj}.{e}" for proj in ("gate_projs", "up_projs", "down_projs") for e in range(4)} <= targets
    # a later load without the key builds transformers' own fused experts again
    assert type(AutoModelForCausalLM.from_pretrained(fused_dir).model.layers[0].feed_forward.experts).__name__ \
        == "Llama4TextExperts"


def test_4bit_quantizes_each_expert(checkpoints):
    import bitsandbytes as bnb

    _, linear_dir = checkpoints
    cfg, pm = build_run_config({"base_model": str(linear_dir), "llama4_linearized_experts": True,
                                "adapter": "qlora", "load_in_4bit": True, "lora_target_linear": True})
    experts = pm.hook.load_model(cfg=cfg, tokenizer=None).model.layers[1].feed_forward.experts
    assert all(isinstance(layer, bnb.nn.Linear4bit) for layer in [*experts.gate_projs, *experts.down_projs])


def test_a_fused_checkpoint_or_another_model_is_a_config_error(checkpoints, tmp_path):
    fused_dir, _ = checkpoints
    with pytest.raises(ConfigError, match=r"'llama4_linearized_experts': true loads a checkpoint whose experts are "
                                          r"stored one nn.Linear per expert .* stores them fused"):
        build_run_config({"base_model": str(fused_dir), "llama4_linearized_experts": True})
    llama = make_tiny_model(tmp_path / "llama", tokenizer_path=fused_dir)
    with pytest.raises(ConfigError, match=r"applies to Llama 4 models .* this model is 'llama'"):
        build_run_config({"base_model": str(llama), "llama4_linearized_experts": True})

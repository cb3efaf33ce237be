"""``lora_target_parameters``: LoRA on parameters by name (peft ``target_parameters``)
on the fused 3-D expert weights of a tiny Qwen3-MoE, trained, saved and
reloaded with plain peft. Reload tolerance: the same float32 weights and
the same math, so logits agree to float32 rounding (1e-5)."""

from __future__ import annotations

import pytest
import torch

from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model

TARGETS = ["mlp.experts.gate_up_proj", "experts.down_proj"]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("moe") / "model", family="qwen3_moe", num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16)


def adapted(model_dir, **keys):
    cfg, pm = build_run_config({"base_model": str(model_dir), "adapter": "lora", "lora_r": 4, **keys})
    return pm.hook.load_adapter(cfg=cfg, model=pm.hook.load_model(cfg=cfg, tokenizer=None))


def test_lora_on_named_parameters_trains_saves_and_reloads(tiny_moe, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = adapted(tiny_moe, lora_target_parameters=TARGETS)  # no module targets: parameters only
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp.experts." in n and "lora_" in n for n in trainable)
    assert {m.parameter_name for m in model.modules() if type(m).__name__ == "ParamWrapper"} == {"gate_up_proj",
                                                                                                 "down_proj"}
    ids = torch.randint(10, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses

    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert sorted(reloaded.peft_config["default"].target_parameters) == sorted(TARGETS)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_a_target_parameter_matching_nothing_is_a_config_error(tiny_moe):
    with pytest.raises(ConfigError, match=r"'lora_target_parameters': \['mlp.experts.up_proj'\] match no parameter"):
        adapted(tiny_moe, lora_target_parameters=["mlp.experts.up_proj"])


@pytest.mark.parametrize("key, value", [("lora_dropout", 0.1), ("peft_use_dora", True)])
def test_target_parameters_refuse_dropout_and_dora(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}': {value!r} cannot be combined with lora_target_parameters"):
        build_run_config({"base_model": "m", "adapter": "lora", "lora_target_parameters": "experts.down_proj",
                          key: value})

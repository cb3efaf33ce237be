"""QLoRA end to end on the CPU: train LoRA on the 4-bit base, then merge it
into the unquantized base (what ``plait merge-lora`` does for qlora).

Merge tolerance: the adapter model on the 4-bit base and the merged model on
the float32 base differ by the base's 4-bit quantization error alone, so the
relative logit error is bounded like the plain 4-bit load (0.25; measured
0.137, while the base without the adapter is 1.06 away). Merging into the
*dequantized* base instead must agree within the CPU 4-bit kernel's bfloat16
rounding (1e-2; measured 0.004).
"""

from __future__ import annotations

import torch

from plait.testing import build_run_config
from plait_bnb.reference import dequantized_model, logits_on_cpu, model_device

KEYS = {"adapter": "qlora", "load_in_4bit": True, "lora_target_linear": True, "lora_r": 8, "lora_alpha": 16,
        "gradient_checkpointing": True}


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def lora_on_quantized(model_dir, keys=KEYS):
    from peft import LoraConfig, get_peft_model

    cfg, pm = build_run_config({"base_model": str(model_dir), **keys})
    model = pm.hook.load_model(cfg=cfg, tokenizer=pm.hook.load_tokenizer(cfg=cfg))
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def train(model, steps=10):
    """Fit one batch of a repeating 8-token pattern (learnable by a rank-8
    adapter in a few steps, unlike random tokens); returns the losses."""
    pattern = torch.randint(10, 500, (4, 8), generator=torch.Generator().manual_seed(1))
    ids = pattern.repeat(1, 4).to(model_device(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_qlora_trains_and_merges(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = lora_on_quantized(tiny_model_dir)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    # before any eval forward: see plait_bnb.reference.dequantized_weight
    dequantized = dequantized_model(tiny_model_dir, model)

    losses = train(model)
    # from ln(512) = 6.24 at the zero-initialised adapter; measured 6.30 -> 5.37 in 10 steps
    assert losses[-1] < losses[0] - 0.5, losses

    model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(10, 500, (2, 24), generator=torch.Generator().manual_seed(2))
    model.eval()
    qlora_logits = logits_on_cpu(model, ids)  # the reference models below are float32 on the CPU

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().eval()
    merged_on_dequantized = PeftModel.from_pretrained(dequantized, tmp_path / "adapter").merge_and_unload().eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
        exact_logits = merged_on_dequantized(input_ids=ids).logits
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert rel_error(qlora_logits, exact_logits) < 1e-2
    assert rel_error(qlora_logits, merged_logits) < 0.25
    # the adapter matters: without it the logits are further from the trained model's
    with torch.no_grad():
        untrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()(input_ids=ids).logits
    assert rel_error(qlora_logits, merged_logits) < rel_error(qlora_logits, untrained)


def test_lora_on_8bit_base_trains(tiny_model_dir):
    import bitsandbytes as bnb

    keys = {"adapter": "lora", "load_in_8bit": True, "lora_target_linear": True, "lora_r": 8, "lora_alpha": 16}
    model = lora_on_quantized(tiny_model_dir, keys)
    assert isinstance(model.base_model.model.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear8bitLt)
    losses = train(model)
    assert losses[-1] < losses[0] - 0.5, losses  # measured 6.29 -> 5.37

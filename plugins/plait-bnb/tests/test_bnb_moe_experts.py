"""``quantize_moe_experts``: the fused 3-D expert weights of a tiny Qwen3-MoE
stored in 4 (or 8) bits, read back dequantized, and QLoRA over them.

Tolerances. The quantized model reads each expert weight through
bitsandbytes' dequantization; the reference is the float32 model with every
quantized weight (linear layers and experts) replaced by that same
dequantized value, so the two differ only by the CPU kernels' rounding of
4-bit linear layers in bfloat16: relative logit error < 2e-2 (measured
0.005). One experts block alone computes the same float math on the same
weights: < 1e-5; against the block's original float weights it differs by
nf4's quantization error, which must be clearly non-zero (> 1e-2), or
nothing was quantized. Storage: 50.7 kB for the experts in 4 bits against
393 kB in float32 (7.8x).
"""

from __future__ import annotations

import pytest
import torch

from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model
from plait_bnb.reference import logits_on_cpu, model_device

EXPERTS = ("gate_up_proj", "down_proj")
IDS = torch.tensor([[3, 17, 42, 99, 7, 250, 31, 64, 5, 120, 77, 18]])


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("moe") / "model", family="qwen3_moe", num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16)


def load(model_dir, **keys):
    cfg, pm = build_run_config({"base_model": str(model_dir), "lora_target_linear": True, **keys})
    return pm.hook.load_model(cfg=cfg, tokenizer=pm.hook.load_tokenizer(cfg=cfg))


def experts_modules(model):
    return [m for name, m in model.named_modules() if name.endswith("mlp.experts")]


def stored_bytes(model) -> int:
    """Bytes the experts' parameters and buffers take (the packed data and its scales)."""
    total = 0
    for module in experts_modules(model):
        total += sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        for stack in getattr(module, "parametrizations", {}).values():
            for p in stack:  # the 4-bit quant state's absmax (and its own double-quant state)
                state = getattr(p, "quant_state", None)
                if state is not None:
                    total += state.absmax.numel() * state.absmax.element_size()
    return total


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def dequantized_reference(model_dir, quantized):
    """The float32 model with every quantized weight of ``quantized`` copied in dequantized."""
    from plait_bnb.reference import dequantized_model

    reference = dequantized_model(model_dir, quantized)
    float_modules = dict(reference.named_modules())
    for name, module in quantized.named_modules():
        if name.endswith("mlp.experts"):
            for param in EXPERTS:
                getattr(float_modules[name], param).data.copy_(getattr(module, param).float())
    return reference


def test_expert_weights_are_stored_in_4_bits_and_read_back_dequantized(tiny_moe):
    plain = load(tiny_moe, adapter="qlora", load_in_4bit=True)
    quantized = load(tiny_moe, adapter="qlora", load_in_4bit=True, quantize_moe_experts=True)
    reference = dequantized_reference(tiny_moe, quantized)  # before the first forward (see reference.py)

    for module in experts_modules(quantized):
        for param in EXPERTS:
            packed = module.parametrizations[param].original
            shape = getattr(module, param).shape  # read through the parametrization: the 3-D weight
            assert packed.dtype == torch.uint8 and packed.numel() * 2 == shape.numel()
            assert len(shape) == 3 and not packed.requires_grad
    # packed 4-bit data + double-quantized block scales: half a byte per weight and ~3% for the scales,
    # whatever the compute dtype the unquantized experts keep (float32 on a CPU, bfloat16 by default on a
    # GPU: 50688 bytes against 393216 or 196608, the same 4-bit storage on both)
    weights = sum(getattr(m, p).numel() for m in experts_modules(quantized) for p in EXPERTS)
    assert stored_bytes(quantized) < 0.55 * weights, (stored_bytes(quantized), weights)
    assert stored_bytes(plain) >= 2 * weights  # the unquantized experts: 16 bits and more a weight

    # one experts block alone: the same float math on the same (dequantized) weights
    hidden = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    top_k = torch.tensor([[i % 4, (i + 1) % 4] for i in range(12)])
    routing = torch.full((12, 2), 0.5)

    def run_block(model):  # on the model's device and dtype (the loader may put it on a GPU), back on the CPU
        module = experts_modules(model)[0]
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        device = model_device(model)
        with torch.no_grad():
            return module(hidden.to(device, dtype), top_k.to(device), routing.to(device, dtype)).float().cpu()

    block, block_want, block_unquantized = run_block(quantized), run_block(reference), run_block(plain)
    got = logits_on_cpu(quantized, IDS)
    want = logits_on_cpu(reference, IDS)
    # float32 experts (the CPU default): the same float math, rounding only; on a GPU the run dtype defaults
    # to bfloat16, so the quantized block computes in bf16 against the float32 reference: bf16's 2^-8 rounding
    compute_dtype = next(p for p in quantized.parameters() if p.is_floating_point()).dtype
    assert rel_error(block, block_want) < (1e-5 if compute_dtype == torch.float32 else 1e-2)
    assert rel_error(block, block_unquantized) > 1e-2  # nf4's error: the experts really are the quantized ones
    assert rel_error(got, want) < 2e-2


def test_expert_weights_in_8_bits(tiny_moe):
    quantized = load(tiny_moe, adapter="lora", load_in_8bit=True, quantize_moe_experts=True)
    module = experts_modules(quantized)[0]
    packed = module.parametrizations["gate_up_proj"].original
    assert packed.dtype == torch.int8 and packed.shape == module.gate_up_proj.shape
    # row-wise absmax scaling: each dequantized row is within half a step (absmax / 127 / 2) of the original
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).model.layers[0].mlp.experts
    step = original.gate_up_proj.abs().amax(dim=-1, keepdim=True) / 127
    dequantized = module.gate_up_proj.float().cpu()  # on the GPU when the loader put the model there
    assert ((dequantized - original.gate_up_proj).abs() <= step / 2 + 1e-3).all()


def test_quantize_moe_experts_needs_a_quantized_base():
    with pytest.raises(ConfigError, match=r"'quantize_moe_experts': true .* set load_in_4bit: true"):
        build_run_config({"base_model": "m", "adapter": "lora", "lora_target_linear": True,
                          "quantize_moe_experts": True})


@pytest.mark.slow  # ~9 s: three loads of the model and six 4-bit training steps
def test_qlora_over_4bit_experts_trains_the_expert_adapters(tiny_moe, tmp_path):
    """QLoRA through plait-bnb's loader and plait-peft's adapter, with LoRA on
    the 4-bit experts (lora_target_parameters): the loss falls, and the
    adapter saves with the experts' full names."""
    import json

    cfg, pm = build_run_config({"base_model": str(tiny_moe), "adapter": "qlora", "load_in_4bit": True,
                                "quantize_moe_experts": True, "lora_r": 4, "lora_alpha": 8,
                                "lora_target_modules": ["q_proj", "v_proj"],
                                "lora_target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]})
    model = pm.hook.load_adapter(cfg=cfg, model=pm.hook.load_model(cfg=cfg, tokenizer=pm.hook.load_tokenizer(cfg=cfg)))
    expert_adapters = [n for n, p in model.named_parameters() if p.requires_grad and ".mlp.experts." in n]
    assert len(expert_adapters) == 2 * 2 * 2  # A and B, 2 parameters, 2 layers
    pattern = torch.randint(10, 300, (4, 8), generator=torch.Generator().manual_seed(1)).repeat(1, 3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=pattern.to(model_device(model)), labels=pattern.to(model_device(model))).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == sorted(f"model.layers.{i}.mlp.experts.{p}"
                                                        for i in range(2) for p in EXPERTS)

    # the adapter loads with plain peft onto the float base (merge-lora's path), tensor for tensor
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # on the CPU: the float base loads there while the trained model may sit on a GPU
    trained = {n: p.detach().cpu() for n, p in model.named_parameters() if ".mlp.experts." in n and "lora_" in n}
    float_base = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    on_float = PeftModel.from_pretrained(float_base, str(tmp_path / "adapter"))
    reloaded = {n: p for n, p in on_float.named_parameters() if ".mlp.experts." in n and "lora_" in n}
    assert reloaded.keys() == trained.keys()
    assert all(torch.equal(reloaded[n], trained[n]) for n in trained)
    # and back onto a 4-bit base through plait-peft (lora_model_dir): the same model
    cfg2, pm2 = build_run_config({**{k: getattr(cfg, k) for k in cfg.model_fields_set if k != "plugin_manager"},
                                  "lora_model_dir": str(tmp_path / "adapter")})
    again = pm2.hook.load_adapter(cfg=cfg2, model=pm2.hook.load_model(cfg=cfg2, tokenizer=None))
    want = logits_on_cpu(model, pattern)
    got = logits_on_cpu(again, pattern)
    with model.disable_adapter():
        base = logits_on_cpu(model, pattern)
    again_experts = {n: p.detach().cpu() for n, p in again.named_parameters() if ".mlp.experts." in n and "lora_" in n}
    assert again_experts.keys() == trained.keys() and all(torch.equal(again_experts[n], trained[n]) for n in trained)
    # the 4-bit kernels' bf16 rounding differs between a trained and a fresh copy (measured 0.002);
    # the adapter's own effect on the logits is ~500x that (measured 1.09)
    assert rel_error(got, want) < 1e-2 < 0.5 < rel_error(base, want)

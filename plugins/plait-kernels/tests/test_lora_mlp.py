"""The fused LoRA MLP equals peft's modules, and adapters save unchanged."""

import copy

import pytest
import torch

from plait_kernels.lora_mlp import PlaitLoRAGLUMLP
from plait_kernels.patch import patch
from plait_kernels.testing import gpu_test

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from plait.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def _lora_model(model_dir, dtype, device, dropout=0.0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.config.use_cache = False
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(model, config)
    # peft starts B at zero, which would hide every error in the LoRA terms
    gen = torch.Generator().manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def _step(model, ids):
    from plait.builtin.loss import chunked_linear_cross_entropy

    model.zero_grad(set_to_none=True)
    base = model.get_base_model()
    hidden = base.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, base.config.hidden_size)
    loss, n = chunked_linear_cross_entropy(hidden, base.lm_head.weight, ids[:, 1:].reshape(-1))
    (loss / n).backward()
    return loss.detach() / n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _patch_glu_only(model):
    chosen = dict(rms_norm=None, rope=None, glu="triton", loss=None)
    cfg = type("Cfg", (), {"torch_compile": False, "plugin_manager": None})()
    return patch(cfg, model, chosen)


def _check(model_dir, dtype, device, tol):
    model = _lora_model(model_dir, dtype, device)
    patched = copy.deepcopy(model)
    assert _patch_glu_only(patched) == {"LlamaMLP x2": "plait triton lora_swiglu_mlp"}
    calls = []
    original = PlaitLoRAGLUMLP.forward
    ids = torch.randint(3, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0)).to(device)
    from plait_kernels import lora_mlp

    apply = lora_mlp.LoRAGLUMLPFunction.apply
    lora_mlp.LoRAGLUMLPFunction.apply = lambda *a: calls.append(1) or apply(*a)
    try:
        loss, grads = _step(patched, ids)
    finally:
        lora_mlp.LoRAGLUMLPFunction.apply = apply
    assert len(calls) == 2 and PlaitLoRAGLUMLP.forward is original  # the fused path ran in both layers
    ref_loss, ref_grads = _step(model, ids)
    torch.testing.assert_close(loss, ref_loss, **tol)
    assert grads.keys() == ref_grads.keys() and any("mlp" in k for k in grads)
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name].float(), want.float(), atol=tol["atol"] * want.abs().max().item(),
                                   rtol=tol["rtol"], msg=lambda m: f"{name}: {m}")
    return model, patched


def test_lora_mlp_matches_peft_fp32(tiny_dir, tmp_path, device):
    model, patched = _check(tiny_dir, torch.float32, device, dict(atol=1e-5, rtol=1e-5))
    # the adapter saved from the patched model is peft's own, tensor for tensor
    from safetensors.torch import load_file

    model.save_pretrained(tmp_path / "ref")
    patched.save_pretrained(tmp_path / "patched")
    ref = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    got = load_file(tmp_path / "patched" / "adapter_model.safetensors")
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=0, rtol=0)


def test_dropout_takes_peft_path(tiny_dir, device):
    model = _lora_model(tiny_dir, torch.float32, device, dropout=0.1)
    _patch_glu_only(model)
    from plait_kernels import lora_mlp

    mlp = model.get_base_model().model.layers[0].mlp
    assert isinstance(mlp, PlaitLoRAGLUMLP)
    assert lora_mlp._lora_parts(mlp.gate_proj) is None  # dropout in training: not fusable
    model.eval()  # dropout off: fusable again
    assert lora_mlp._lora_parts(mlp.gate_proj) is not None


@gpu_test
def test_lora_mlp_matches_peft_bf16_gpu(tiny_dir):
    _check(tiny_dir, torch.bfloat16, "cuda", dict(atol=3e-2, rtol=3e-2))


def _qlora_model(model_dir, device, dtype):
    """LoRA on a bitsandbytes 4-bit base (nf4, double quant, ``dtype`` compute)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=dtype,
                                                 device_map={"": device})
    model.config.use_cache = False
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=["gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def _dequantized_bases(model):
    """The same adapters over dense ``nn.Linear`` bases holding the dequantized
    4-bit weights: the exact arithmetic the fused path must reproduce."""
    from bitsandbytes.functional import dequantize_4bit

    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if base is not None and type(base).__name__ == "Linear4bit":
            dense = torch.nn.Linear(base.in_features, base.out_features, bias=False, device=base.weight.device)
            dense.weight = torch.nn.Parameter(dequantize_4bit(base.weight.data, base.weight.quant_state),
                                              requires_grad=False)
            module.base_layer = dense
    return model


def test_qlora_mlp_matches_lora_over_the_dequantized_base(tiny_dir, device):
    """The fused path dequantizes the 4-bit gate/up/down weights itself: loss and
    LoRA gradients equal peft over dense copies of those weights (fp32, 1e-5)."""
    _check_qlora(tiny_dir, device, torch.float32, 1e-5)


@gpu_test
def test_qlora_mlp_matches_lora_over_the_dequantized_base_bf16_gpu(tiny_dir):
    _check_qlora(tiny_dir, "cuda", torch.bfloat16, 3e-2)


def _check_qlora(tiny_dir, device, dtype, tol):
    pytest.importorskip("bitsandbytes")
    from plait_kernels import lora_mlp

    model = _qlora_model(tiny_dir, device, dtype)
    mlp = model.get_base_model().model.layers[0].mlp
    assert lora_mlp._lora_parts(mlp.gate_proj)[1] is not None  # a 4-bit base the fast path accepts
    reference = _dequantized_bases(copy.deepcopy(model))
    assert _patch_glu_only(model) == {"LlamaMLP x2": "plait triton lora_swiglu_mlp"}
    calls = []
    apply = lora_mlp.LoRAGLUMLPFunction.apply
    lora_mlp.LoRAGLUMLPFunction.apply = lambda *a: calls.append(1) or apply(*a)
    ids = torch.randint(3, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0)).to(device)
    try:
        loss, grads = _step(model, ids)
    finally:
        lora_mlp.LoRAGLUMLPFunction.apply = apply
    assert len(calls) == 2  # both layers took the fused 4-bit path
    ref_loss, ref_grads = _step(reference, ids)
    torch.testing.assert_close(loss, ref_loss, atol=tol, rtol=tol)
    assert grads.keys() == ref_grads.keys() and len(grads) == 12
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name].float(), want.float(), atol=tol * want.abs().max().item(), rtol=tol,
                                   msg=lambda m: f"{name}: {m}")

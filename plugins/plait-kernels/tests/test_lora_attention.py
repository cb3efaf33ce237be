"""The fused LoRA q/k/v and o projections (plait_kernels.lora_linear) equal
peft's modules, over dense and 4-bit bases, and can be switched off."""

import copy
from types import SimpleNamespace

import pytest
import torch
from plait_kernels.lora_linear import LoRASharedInputFunction
from plait_kernels.patch import patch
from plait_kernels.testing import (
    CountCalls,
    assert_same_loss_and_grads,
    gpu_test,
    lora_model,
    loss_and_lora_grads,
    with_dequantized_bases,
)

pytest.importorskip("peft")


def _patch_rope(model, **keys):
    cfg = SimpleNamespace(torch_compile=False, plugin_manager=None, **keys)
    return patch(cfg, model, dict(rms_norm=None, rope="triton", glu=None, loss=None))


def test_shared_input_function_matches_autograd_fp64():
    """Three projections of different widths and ranks sharing one input:
    outputs and the gradients of x, every A and every B equal plain autograd."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 24, dtype=torch.float64, generator=gen)
    shapes = [(32, 4, 0.5), (8, 2, 2.0), (8, 3, 1.0)]  # (out, rank, scaling): q, k, v of a GQA layer
    params = [(torch.randn(out, 24, dtype=torch.float64, generator=gen), torch.randn(r, 24, dtype=torch.float64,
               generator=gen), torch.randn(out, r, dtype=torch.float64, generator=gen), s) for out, r, s in shapes]
    weights = [torch.randn(out, dtype=torch.float64, generator=gen) for out, _, _ in shapes]

    def run(fused):
        xl = x.clone().requires_grad_()
        leaves = [(w, a.clone().requires_grad_(), b.clone().requires_grad_(), s) for w, a, b, s in params]
        if fused:
            outs = LoRASharedInputFunction.apply(xl, *(v for w, a, b, s in leaves for v in (w, None, a, b, s)))
        else:
            outs = [xl @ w.t() + s * (xl @ a.t()) @ b.t() for w, a, b, s in leaves]
        sum((o * g).sum() for o, g in zip(outs, weights)).backward()
        return [o.detach() for o in outs], [xl.grad] + [t.grad for _, a, b, _ in leaves for t in (a, b)]

    (outs, grads), (ref_outs, ref_grads) = run(True), run(False)
    for got, want in zip(outs + grads, ref_outs + ref_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def _check(model_dir, dtype, device, tol, load_in_4bit=False):
    model = lora_model(model_dir, dtype, device, load_in_4bit=load_in_4bit)
    reference = with_dequantized_bases(copy.deepcopy(model)) if load_in_4bit else copy.deepcopy(model)
    report = _patch_rope(model)
    assert report == {"LlamaAttention x2": "plait triton rope + lora_qkv + lora_o"}
    assert_fused_matches(model, reference, device, tol)


def assert_fused_matches(model, reference, device, tol):
    """The patched two-layer model's loss and LoRA gradients equal the
    reference's within ``tol``, through the fused q/k/v and o paths."""
    ids = torch.randint(3, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0)).to(device)
    with CountCalls(LoRASharedInputFunction) as calls:
        got = loss_and_lora_grads(model, ids)
    assert calls.count == 4  # q/k/v and o, in both layers
    want = loss_and_lora_grads(reference, ids)
    assert sum("self_attn" in k for k in want[1]) == 16  # A and B of q, k, v, o in two layers
    assert_same_loss_and_grads(got, want, tol)


def test_lora_attention_matches_peft_fp32(tiny_dir, device):
    _check(tiny_dir, torch.float32, device, 1e-5)


def test_qlora_attention_matches_lora_over_the_dequantized_base(tiny_dir, device):
    pytest.importorskip("bitsandbytes")
    _check(tiny_dir, torch.float32, device, 1e-5, load_in_4bit=True)


def _checkpointed_base_matmuls(model, mode, device, monkeypatch):
    """Loss, LoRA gradients and the number of base-weight matmul operands the
    fused projections built, in one step under ``gradient_checkpointing: mode``."""
    from plait.model.recompute import enable_gradient_checkpointing
    from plait_kernels import lora_linear

    enable_gradient_checkpointing(model, mode)
    model.train()
    built = []
    real = lora_linear.dense_weight
    monkeypatch.setattr(lora_linear, "dense_weight", lambda w, q, dt: built.append(w) or real(w, q, dt))
    result = loss_and_lora_grads(model, torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(0))
                                 .to(device))
    monkeypatch.setattr(lora_linear, "dense_weight", real)
    return result, len(built)


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_offloaded_recompute_takes_the_kept_projection_outputs(tiny_dir, device, monkeypatch, load_in_4bit):
    """Under ``gradient_checkpointing: offload`` the forward parks the q/k/v and o
    outputs and the recompute pass takes them back: no base matmul (nor 4-bit
    dequantization) there. Plain checkpointing rebuilds them. Loss and gradients
    are the same bits either way, and equal peft's without checkpointing."""
    if load_in_4bit:
        pytest.importorskip("bitsandbytes")
    model = lora_model(tiny_dir, torch.float32, device, load_in_4bit=load_in_4bit)
    reference = with_dequantized_bases(copy.deepcopy(model)) if load_in_4bit else copy.deepcopy(model)
    plain_model = copy.deepcopy(model)
    _patch_rope(model)
    _patch_rope(plain_model)
    kept, kept_matmuls = _checkpointed_base_matmuls(model, "offload", device, monkeypatch)
    plain, plain_matmuls = _checkpointed_base_matmuls(plain_model, True, device, monkeypatch)
    # per layer q, k, v, o: forward 4 + backward 4, and plain checkpointing's recompute 4 more
    assert (kept_matmuls, plain_matmuls) == (2 * 8, 2 * 12)
    assert torch.equal(kept[0], plain[0])
    assert all(torch.equal(kept[1][name], plain[1][name]) for name in plain[1])
    assert_same_loss_and_grads(kept, loss_and_lora_grads(reference, torch.randint(
        3, 100, (2, 11), generator=torch.Generator().manual_seed(0)).to(device)), 1e-5)


def test_keys_turn_the_fused_projections_off(tiny_dir, device):
    model = lora_model(tiny_dir, torch.float32, device)
    assert _patch_rope(model, lora_qkv_kernel=False, lora_o_kernel=False) == {"LlamaAttention x2": "plait triton rope"}
    with CountCalls(LoRASharedInputFunction) as calls:
        loss_and_lora_grads(model, torch.randint(3, 100, (1, 9)).to(device))
    assert calls.count == 0


def test_partial_targets_keep_peft_modules(tiny_dir, device):
    """LoRA on q and v only: k is a plain linear, so q/k/v are not fused, and o
    (not adapted) neither."""
    model = lora_model(tiny_dir, torch.float32, device, targets=["q_proj", "v_proj"])
    assert _patch_rope(model) == {"LlamaAttention x2": "plait triton rope"}


def test_lora_kernel_keys_conflict_with_plain_torch():
    from plait.errors import ConfigError
    from plait.testing import build_run_config

    with pytest.raises(ConfigError, match="lora_qkv_kernel.*plait_kernels is 'torch'"):
        build_run_config({"base_model": "x", "plugins": ["plait_kernels.plugin"], "plait_kernels": "torch",
                          "lora_qkv_kernel": True})


@gpu_test
def test_lora_attention_matches_peft_bf16_gpu(tiny_dir):
    _check(tiny_dir, torch.bfloat16, "cuda", 3e-2)


@gpu_test
def test_qlora_attention_matches_lora_over_the_dequantized_base_bf16_gpu(tiny_dir):
    pytest.importorskip("bitsandbytes")
    _check(tiny_dir, torch.bfloat16, "cuda", 3e-2, load_in_4bit=True)


def test_qwen3_moe_attention_takes_the_fused_projections_and_matches_peft(tmp_path, device):
    """Qwen3-MoE's attention (Qwen 3's forward: per-head q/k norms) takes Plait's
    rotary and fused LoRA q/k/v and o, as the MoE bench trains it (LoRA on the
    attention projections); loss and LoRA gradients equal peft's (float32)."""
    from plait.families import find_family
    from plait.testing import make_tiny_model, plugin_manager

    pm = plugin_manager()
    if find_family(pm, "qwen3_moe") is None:
        pytest.skip("plait-models (the family registry, which names Qwen3-MoE's classes) is not installed")
    model_dir = make_tiny_model(tmp_path / "qwen3_moe", family="qwen3_moe", head_dim=16)
    model = lora_model(model_dir, torch.float32, device, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    reference = copy.deepcopy(model)
    cfg = SimpleNamespace(torch_compile=False, plugin_manager=pm)
    report = patch(cfg, model, dict(rms_norm=None, rope="triton", glu=None, loss=None))
    assert report == {"Qwen3MoeAttention x2": "plait triton rope + lora_qkv + lora_o"}
    assert_fused_matches(model, reference, device, 1e-5)

"""The fused LoRA MLP equals peft's modules, over dense and 4-bit bases, and
adapters save unchanged."""

import copy

import pytest
import torch
from plait_kernels import lora_linear, lora_mlp
from plait_kernels.lora_mlp import PlaitLoRAGLUMLP
from plait_kernels.ops.nf4 import dequantizes
from plait_kernels.patch import patch
from plait_kernels.testing import (
    CountCalls,
    assert_same_loss_and_grads,
    gpu_test,
    lora_model,
    loss_and_lora_grads,
    with_dequantized_bases,
)

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
MLP_ONLY = ["gate_proj", "up_proj", "down_proj"]


def _patch_glu_only(model):
    chosen = dict(rms_norm=None, rope=None, glu="triton", loss=None)
    cfg = type("Cfg", (), {"torch_compile": False, "plugin_manager": None})()
    return patch(cfg, model, chosen)


def _ids(model, device):
    return torch.randint(3, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0)).to(device)


def _check(model_dir, dtype, device, tol):
    model = lora_model(model_dir, dtype, device, targets=TARGETS)
    patched = copy.deepcopy(model)
    assert _patch_glu_only(patched) == {"LlamaMLP x2": "plait triton lora_swiglu_mlp"}
    ids = _ids(model, device)
    with CountCalls(lora_mlp.LoRAGLUMLPFunction) as calls:
        got = loss_and_lora_grads(patched, ids)
    assert calls.count == 2  # the fused path ran in both layers
    want = loss_and_lora_grads(model, ids)
    assert any("mlp" in k for k in want[1])
    assert_same_loss_and_grads(got, want, tol)
    return model, patched


def test_lora_mlp_matches_peft_fp32(tiny_dir, tmp_path, device):
    model, patched = _check(tiny_dir, torch.float32, device, 1e-5)
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
    model = lora_model(tiny_dir, torch.float32, device, targets=TARGETS, dropout=0.1)
    _patch_glu_only(model)
    mlp = model.get_base_model().model.layers[0].mlp
    assert isinstance(mlp, PlaitLoRAGLUMLP)
    assert lora_linear.lora_parts(mlp.gate_proj) is None  # dropout in training: not fusable
    model.eval()  # dropout off: fusable again
    assert lora_linear.lora_parts(mlp.gate_proj) is not None


@gpu_test
def test_lora_mlp_matches_peft_bf16_gpu(tiny_dir):
    _check(tiny_dir, torch.bfloat16, "cuda", 3e-2)


def _check_qlora(tiny_dir, device, dtype, tol):
    pytest.importorskip("bitsandbytes")
    model = lora_model(tiny_dir, dtype, device, targets=MLP_ONLY, load_in_4bit=True)
    mlp = model.get_base_model().model.layers[0].mlp
    weight, quant_state = lora_linear.lora_parts(mlp.gate_proj)[:2]
    assert quant_state is not None  # a 4-bit base the fast path accepts
    assert dequantizes(weight, quant_state)  # NF4: Plait's kernel dequantizes it, into the stacked weight
    reference = with_dequantized_bases(copy.deepcopy(model))
    assert _patch_glu_only(model) == {"LlamaMLP x2": "plait triton lora_swiglu_mlp"}
    ids = _ids(model, device)
    with CountCalls(lora_mlp.LoRAGLUMLPFunction) as calls:
        got = loss_and_lora_grads(model, ids)
    assert calls.count == 2  # both layers took the fused 4-bit path
    want = loss_and_lora_grads(reference, ids)
    assert len(want[1]) == 12
    assert_same_loss_and_grads(got, want, tol)


def test_qlora_mlp_matches_lora_over_the_dequantized_base(tiny_dir, device):
    """The fused path dequantizes the 4-bit gate/up/down weights itself: loss and
    LoRA gradients equal peft over dense copies of those weights (fp32, 1e-5)."""
    _check_qlora(tiny_dir, device, torch.float32, 1e-5)


@gpu_test
def test_qlora_mlp_matches_lora_over_the_dequantized_base_bf16_gpu(tiny_dir):
    _check_qlora(tiny_dir, "cuda", torch.bfloat16, 3e-2)


def _checkpointed_skip_flags(model, device, feeds_residual=None):
    """Train ``model`` (patched) one backward under non-reentrant checkpointing;
    return its loss and gradients and the ``skip_output`` flag of every fused MLP call."""
    from plait.model.recompute import enable_gradient_checkpointing

    if feeds_residual is not None:
        for layer in model.get_base_model().model.layers:
            layer.mlp.output_feeds_residual = feeds_residual
    enable_gradient_checkpointing(model, True)
    model.train()
    with CountCalls(lora_mlp.LoRAGLUMLPFunction) as calls:
        result = loss_and_lora_grads(model, _ids(model, device))
    return result, [args[-2] for args in calls.args]  # apply(..., gelu, skip_output, fold)


def test_recompute_skips_the_down_projection_and_gradients_stay_exact(tiny_dir, device):
    """Under non-reentrant checkpointing the recompute pass runs the fused MLP
    without its down projection (the layer output is discarded there), and the
    loss and LoRA gradients still equal peft's without checkpointing (fp32, 1e-5)."""
    model = lora_model(tiny_dir, torch.float32, device, targets=TARGETS)
    patched = copy.deepcopy(model)
    _patch_glu_only(patched)
    assert patched.get_base_model().model.layers[0].mlp.output_feeds_residual  # llama: MLP -> residual add
    got, flags = _checkpointed_skip_flags(patched, device)
    # two layers: each ran once in forward (output used) and once recomputed (output skipped)
    assert flags == [False, False, True, True]
    assert_same_loss_and_grads(got, loss_and_lora_grads(model, _ids(model, device)), 1e-5)


def test_no_skip_when_the_family_may_save_the_mlp_output(tiny_dir, device):
    """Without the family's ``mlp_output_feeds_residual`` (a post-MLP norm would
    save the output) the recompute pass runs the whole MLP."""
    model = lora_model(tiny_dir, torch.float32, device, targets=TARGETS)
    _patch_glu_only(model)
    _, flags = _checkpointed_skip_flags(model, device, feeds_residual=False)
    assert flags == [False] * 4


def test_backward_writes_the_activation_gradient_over_gate_up(tiny_dir, device):
    """The backward makes no second ``[tokens, 2 * intermediate]`` buffer: ``[d_gate | d_up]``
    is written over the saved ``[gate | up]`` (at the 1b DPO bench shape that buffer was
    256 MiB of the step's peak), and a second backward through the same graph, which would
    read the overwritten values, is refused. (That the gradients still equal peft's is
    test_lora_mlp_matches_peft_fp32's and the checkpointed test's.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    patched = lora_model(tiny_dir, torch.float32, device, targets=MLP_ONLY)
    _patch_glu_only(patched)
    ids = _ids(patched, device)
    inter = patched.config.intermediate_size

    class Shapes(TorchDispatchMode):
        made: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.made.append((func.__name__, tuple(out.shape)))
            return out

    base = patched.get_base_model()
    hidden = base.model(input_ids=ids).last_hidden_state
    loss = hidden.float().square().mean()
    with Shapes() as shapes:
        loss.backward(retain_graph=True)
    wide = [(op, shape) for op, shape in shapes.made if shape[-1:] == (2 * inter,)]
    assert not wide, f"the backward made [tokens, 2 * intermediate] tensors: {wide}"
    assert any(shape == (ids.numel(), inter) for _, shape in shapes.made)  # it did run: d_h is [tokens, inter]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()

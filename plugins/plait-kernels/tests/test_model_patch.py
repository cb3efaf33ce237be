"""A tiny Llama patched with the kernels trains like the unpatched model.

Loss and every parameter's gradient are compared with the model's own PyTorch
code plus core's chunked loss. On the CPU the kernels run in the Triton
interpreter in float32; on a GPU the same test runs in bf16.
"""

import copy
from types import SimpleNamespace

import pytest
import torch

from plait_kernels.backends import get_backend
from plait_kernels.modules import PlaitGLUMLP, PlaitRMSNorm
from plait_kernels.patch import patch
from plait_kernels.testing import gpu_test

PIECES = ("rms_norm", "rope", "glu", "loss")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from plait.testing import make_tiny_model, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tok = make_tiny_tokenizer(root / "tok")
    return {tied: make_tiny_model(root / f"llama-tied{tied}", tok, tie_word_embeddings=tied) for tied in (False, True)}


def _batch(vocab, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 13), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[1, 9:] = -100
    return ids.to(device), labels.to(device)


def _loss_and_grads(model, ids, labels, loss_fn):
    """What core's loop does: backbone hidden states, shifted labels, loss step."""
    model.zero_grad(set_to_none=True)
    hidden = model.model(input_ids=ids).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    shifted = labels[:, 1:].reshape(-1)
    loss_sum, n = loss_fn(hidden, model.lm_head.weight, shifted)
    (loss_sum / n).backward()
    return loss_sum.detach() / n, {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _check_parity(model_dir, dtype, device, loss_tol, grad_tol, backend="triton"):
    from transformers import AutoModelForCausalLM

    from plait.model.head import chunked_linear_cross_entropy

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    model.config.use_cache = False
    patched = copy.deepcopy(model)
    cfg = SimpleNamespace(torch_compile=False, torch_compile_backend=None, plugin_manager=None)
    report = patch(cfg, patched, dict.fromkeys(PIECES, backend))
    prefix = "plait triton" if backend == "triton" else backend
    assert report == {"LlamaRMSNorm x5": f"{prefix} rms_norm", "LlamaMLP x2": f"{prefix} swiglu",
                      "LlamaAttention x2": f"{prefix} rope"}
    assert sum(isinstance(m, PlaitRMSNorm) for m in patched.modules()) == 5
    assert sum(isinstance(m, PlaitGLUMLP) for m in patched.modules()) == 2
    # same parameter names and values: checkpoints and adapters are unaffected by patching
    assert patched.state_dict().keys() == model.state_dict().keys()

    rope_calls = []
    for module in patched.modules():
        if hasattr(module, "_plait_rope"):
            kernel = module._plait_rope
            module._plait_rope = lambda *a, _k=kernel: rope_calls.append(1) or _k(*a)

    ids, labels = _batch(model.config.vocab_size, device)
    ref_loss, ref_grads = _loss_and_grads(model, ids, labels, chunked_linear_cross_entropy)
    loss, grads = _loss_and_grads(patched, ids, labels, get_backend(backend)["loss"])
    assert len(rope_calls) == 2  # the fused rotary ran in both layers (no KV cache in training)
    torch.testing.assert_close(loss.float(), ref_loss.float(), **loss_tol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        want = ref_grads[name].float()
        torch.testing.assert_close(grads[name].float(), want, atol=grad_tol["atol"] * want.abs().max().item(),
                                   rtol=grad_tol["rtol"], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("tied", [False, True])
def test_patched_tiny_llama_matches_unpatched_fp32(tiny_dirs, tied, device):
    # float32 on both sides; the kernels reorder sums, so differences are rounding
    _check_parity(tiny_dirs[tied], torch.float32, device, dict(atol=1e-5, rtol=1e-5), dict(atol=1e-4, rtol=1e-4))


@gpu_test
@pytest.mark.parametrize("tied", [False, True])
def test_patched_tiny_llama_matches_unpatched_bf16_gpu(tiny_dirs, tied):
    # bf16 on both sides: the two paths round at different points (the kernels
    # keep float32 inside a fused op), so agreement is to a few bf16 ulps
    _check_parity(tiny_dirs[tied], torch.bfloat16, "cuda", dict(atol=2e-2, rtol=2e-2), dict(atol=5e-2, rtol=5e-2))


@gpu_test
def test_liger_backend_matches_unpatched_bf16_gpu(tiny_dirs):
    pytest.importorskip("liger_kernel")
    _check_parity(tiny_dirs[False], torch.bfloat16, "cuda", dict(atol=2e-2, rtol=2e-2), dict(atol=5e-2, rtol=5e-2),
                  backend="liger")


@pytest.mark.parametrize("family,expected", [
    ("qwen2", {"Qwen2RMSNorm x5": "plait triton rms_norm", "Qwen2MLP x2": "plait triton swiglu",
               "Qwen2Attention x2": "plait triton rope"}),
    # Gemma 2: (1 + weight) norms (four per layer) and GeGLU, from the registry; its attention (soft-capped)
    # is named by the registry but keeps the model's own forward, and the report says so
    ("gemma2", {"Gemma2RMSNorm x9": "plait triton rms_norm", "Gemma2MLP x2": "plait triton geglu",
                "Gemma2Attention x2": "the model's own rotary (Plait's fused attention forward is not checked for "
                                      "this class)"}),
    # Qwen3: per-head q/k norms are RMSNorms too, applied before the fused rotary
    ("qwen3", {"Qwen3RMSNorm x9": "plait triton rms_norm", "Qwen3MLP x2": "plait triton swiglu",
               "Qwen3Attention x2": "plait triton rope"}),
])
def test_families_through_the_registry(tmp_path, family, expected, device):
    """Class names, activation and norm offset come from plait-models' registry
    when it is installed; the patched model's loss and gradients match."""
    from transformers import AutoModelForCausalLM

    from plait.model.head import chunked_linear_cross_entropy
    from plait.families import find_family
    from plait.testing import make_tiny_model, plugin_manager

    pm = plugin_manager()
    model_dir = make_tiny_model(tmp_path / family, family=family, head_dim=16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    if family != "qwen2" and find_family(pm, model.config.model_type) is None:
        pytest.skip("plait-models (the family registry) is not installed")
    model.config.use_cache = False
    with torch.no_grad():  # non-trivial norm weights, so a wrong offset shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
    patched = copy.deepcopy(model)
    cfg = SimpleNamespace(torch_compile=False, torch_compile_backend=None, plugin_manager=pm)
    assert patch(cfg, patched, dict.fromkeys(PIECES, "triton")) == expected
    if family != "qwen2":  # plait-models' report of missing optimisations counts the swapped modules
        from plait_models import describe_optimisations

        assert not any("not found" in line for line in describe_optimisations(patched, find_family(pm, family)))
    ids, labels = _batch(model.config.vocab_size, device)
    ref_loss, ref_grads = _loss_and_grads(model, ids, labels, chunked_linear_cross_entropy)
    loss, grads = _loss_and_grads(patched, ids, labels, get_backend("triton")["loss"])
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, atol=1e-4 * want.abs().max().item(), rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")

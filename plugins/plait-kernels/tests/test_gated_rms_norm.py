"""The gated RMSNorm kernel (``liger_rms_norm_gated``) against transformers' own
modules, forward and backward, and its swap into a tiny Qwen3-Next.

On the CPU the kernel runs in Triton's interpreter, in float32 and float16
(the interpreter rounds float16 like a GPU; its bfloat16 casts truncate, so
bf16 is checked on a GPU only).
"""

import copy
import importlib
import inspect
from types import SimpleNamespace

import pytest
import torch

from plait_kernels import reference
from plait_kernels.modules import GATED_NORM_CLASSES, PlaitGatedRMSNorm, gated_norm_group_size
from plait_kernels.ops.gated_rms_norm import gated_rms_norm
from plait_kernels.patch import patch
from plait_kernels.testing import gpu_test, outputs_and_grads

#: the transformers module of each class in GATED_NORM_CLASSES (names differ
#: between the supported transformers releases: each test skips a class the
#: installed version lacks, so 5.17 and 5.25 each check what they have)
MODULES = {
    "Qwen3NextRMSNormGated": "qwen3_next",
    "Qwen3_5RMSNormGated": "qwen3_5",
    "Qwen3_5MoeRMSNormGated": "qwen3_5_moe",
    "OlmoHybridRMSNormGated": "olmo_hybrid",
    "NemotronHRMSNormGated": "nemotron_h",
    "MambaRMSNormGated": "mamba2",  # transformers 5.17's name
    "Mamba2RMSNormGated": "mamba2",  # later releases' name
    "Zamba2RMSNormGated": "zamba2",
    "BambaRMSNormGated": "bamba",
    "GraniteMoeHybridRMSNormGated": "granitemoehybrid",
}
WIDTH, GROUP = 24, 8  # three groups of eight for the gate-first order

# float32: the same maths in another order, so rounding only
FP32 = dict(atol=2e-5, rtol=2e-5)


#: gate-first classes present in every supported transformers (5.17 to 5.x),
#: for the tests that check one of each order
NORM_FIRST, GATE_FIRST = "Qwen3NextRMSNormGated", "Zamba2RMSNormGated"


def transformers_class(name: str) -> type:
    """The installed transformers' class ``name``; skips the test when this version has none."""
    import transformers

    try:
        module = importlib.import_module(f"transformers.models.{MODULES[name]}.modeling_{MODULES[name]}")
    except ModuleNotFoundError:  # the model family itself arrived in a later release
        module = None
    if not hasattr(module, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name} (another release's name)")
    return getattr(module, name)


def transformers_norm(name: str, dtype=torch.float32, eps=1e-5):
    cls = transformers_class(name)
    # gate-first norms with a group_size argument normalise per GROUP columns;
    # those without one (transformers 5.17's Mamba/Bamba/GraniteMoeHybrid) over the whole row
    grouped = "group_size" in inspect.signature(cls.__init__).parameters
    norm = cls(WIDTH, group_size=GROUP, eps=eps) if grouped else cls(WIDTH, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(WIDTH, generator=torch.Generator().manual_seed(5)) * 0.5 + 1.0)
    return norm.to(dtype)


def kernel_of(norm):
    before = GATED_NORM_CLASSES[type(norm).__name__]
    return lambda x, g, w: gated_rms_norm(x, g, w, norm.variance_epsilon, gated_norm_group_size(norm), before)


def _inputs(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen) * 2).to(device=device, dtype=dtype) for _ in range(2)]


def test_every_listed_class_is_checked_below():
    """Each class in GATED_NORM_CLASSES is imported from transformers and compared with the kernel below."""
    assert MODULES.keys() == GATED_NORM_CLASSES.keys()


@pytest.mark.parametrize("name", list(GATED_NORM_CLASSES))
def test_kernel_matches_transformers_fp32(name, device):
    norm = transformers_norm(name).to(device)
    x, g = _inputs((2, 5, WIDTH), torch.float32, device)
    out, grads = outputs_and_grads(kernel_of(norm), [x, g, norm.weight.detach()])
    ref_out, ref_grads = outputs_and_grads(lambda x, g, w: torch.func.functional_call(norm, {"weight": w}, (x, g)),
                                           [x, g, norm.weight.detach()])
    for got, want in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(got, want, **FP32)


@pytest.mark.parametrize("name", [NORM_FIRST, GATE_FIRST])
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.float32])
def test_kernel_matches_transformers_fp16(name, weight_dtype, device):
    """Half-precision inputs: the output rounds where transformers rounds, so it
    is equal; gradients agree to fp16 rounding (transformers' backward rounds
    its intermediate gradients to fp16, the kernel keeps float32)."""
    norm = transformers_norm(name, weight_dtype).to(device)
    x, g = _inputs((7, WIDTH), torch.float16, device, seed=1)
    out, grads = outputs_and_grads(kernel_of(norm), [x, g, norm.weight.detach()])
    ref_out, ref_grads = outputs_and_grads(lambda x, g, w: torch.func.functional_call(norm, {"weight": w}, (x, g)),
                                           [x, g, norm.weight.detach()])
    assert out[0].dtype == ref_out[0].dtype  # Mamba-2's order returns weight * n: float32 with a float32 weight
    torch.testing.assert_close(out[0], ref_out[0], atol=0, rtol=0)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2 * want.abs().max().item(), rtol=1e-2)


def test_gate_first_order_without_a_gate_is_a_group_rms_norm(device):
    """Mamba-2-style norms are called without a gate too: then it is RMSNorm per group."""
    norm = transformers_norm(GATE_FIRST).to(device)
    x = _inputs((6, WIDTH), torch.float32, device)[0]
    out, grads = outputs_and_grads(lambda x, w: gated_rms_norm(x, None, w, norm.variance_epsilon, GROUP, False),
                                   [x, norm.weight.detach()])
    ref_out, ref_grads = outputs_and_grads(lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)),
                                           [x, norm.weight.detach()])
    for got, want in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(got, want, **FP32)


def test_reference_matches_transformers():
    """The torch backend's reference (what benchmarks compare with) is the same maths."""
    for name in (NORM_FIRST, GATE_FIRST):
        norm = transformers_norm(name)
        x, g = _inputs((4, WIDTH), torch.float32, "cpu")
        before = GATED_NORM_CLASSES[name]
        got = reference.gated_rms_norm(x, g, norm.weight, norm.variance_epsilon, gated_norm_group_size(norm), before)
        torch.testing.assert_close(got, norm(x, g), atol=0, rtol=0)


def test_bad_shapes_are_refused():
    x = torch.randn(3, 20)
    with pytest.raises(ValueError, match="width 20 is not a multiple of the group size 8"):
        gated_rms_norm(x, x, torch.ones(20), group_size=8, norm_before_gate=False)
    with pytest.raises(ValueError, match="norm-then-gate order needs a gate"):
        gated_rms_norm(x, None, torch.ones(20))


@pytest.fixture(scope="module")
def tiny_qwen3_next(tmp_path_factory):
    """A tiny Qwen3-Next: one linear-attention (Gated DeltaNet) layer, whose
    output passes through Qwen3NextRMSNormGated, and one full-attention layer."""
    from plait.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("qwen3_next") / "model", family="qwen3_next",
                           linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                           linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=32, layer_types=["linear_attention", "full_attention"])


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_liger_rms_norm_gated_swaps_qwen3_next_and_trains_the_same(tiny_qwen3_next, device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_next, dtype=torch.float32).to(device)
    model.config.use_cache = False
    patched = copy.deepcopy(model)
    cfg = SimpleNamespace(torch_compile=False, plugin_manager=None, liger_rms_norm_gated=True)
    chosen = dict.fromkeys(("rms_norm", "rope", "glu", "loss"), None) | {"rms_norm_gated": "triton"}
    report = patch(cfg, patched, chosen)
    assert report == {"Qwen3NextRMSNormGated x1": "plait triton rms_norm_gated"}
    assert [type(m) for m in patched.modules() if "NormGated" in type(m).__name__ or isinstance(m, PlaitGatedRMSNorm)] == [
        PlaitGatedRMSNorm]
    assert patched.state_dict().keys() == model.state_dict().keys()

    calls = []
    norm = next(m for m in patched.modules() if isinstance(m, PlaitGatedRMSNorm))
    kernel = norm._gated_rms_norm
    norm._gated_rms_norm = lambda *a: calls.append(1) or kernel(*a)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    loss, grads = _loss_and_grads(patched, ids)
    assert calls == [1]
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, atol=1e-4 * want.abs().max().item(), rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


def test_a_model_without_gated_norms_is_left_alone_and_says_so(tmp_path):
    from transformers import AutoModelForCausalLM

    from plait.testing import make_tiny_model

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "llama"))
    cfg = SimpleNamespace(torch_compile=False, plugin_manager=None, liger_rms_norm_gated=True)
    chosen = dict.fromkeys(("rms_norm", "rope", "glu", "loss"), None) | {"rms_norm_gated": "triton"}
    assert patch(cfg, model, chosen) == {"RMSNormGated x1": "none in this model: liger_rms_norm_gated changes "
                                                            "nothing"}


@gpu_test
@pytest.mark.parametrize("name", [NORM_FIRST, GATE_FIRST])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_transformers_bf16_gpu(name, weight_dtype):
    norm = transformers_norm(name, weight_dtype).cuda()
    x, g = _inputs((4096, WIDTH), torch.bfloat16, "cuda")
    out, grads = outputs_and_grads(kernel_of(norm), [x, g, norm.weight.detach()])
    ref_out, ref_grads = outputs_and_grads(lambda x, g, w: torch.func.functional_call(norm, {"weight": w}, (x, g)),
                                           [x, g, norm.weight.detach()])
    # the output rounds where transformers rounds: equal up to float32 summation order (one bf16 ulp at most)
    torch.testing.assert_close(out[0].float(), ref_out[0].float(), atol=2e-2, rtol=8e-3)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2 * want.abs().max().item(), rtol=2e-2)

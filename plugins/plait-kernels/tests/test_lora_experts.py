"""The routed LoRA experts path (plait_kernels.lora_experts) against peft's own.

peft's ParamWrapper adds ``s * B_e @ A_e`` to every expert's weight and runs the
experts; the routed path computes ``x @ W_e.T + s * (x @ A_e.T) @ B_e.T`` for
the routed rows only. Both are the same float32 sums in another order:
logits agree to 1e-5 absolute and every LoRA gradient to 1e-4 of its largest
entry. On the CPU, torch's grouped GEMM runs when strides are 16-byte aligned
(rank 4 in float32); rank 2 is not aligned, so its LoRA matmuls take the
per-expert reference loop: both dispatches are checked against peft.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import copy
import gc
import weakref

from plait_kernels import lora_experts, lora_experts_fold

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_qwen3_moe(seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
    return Qwen3MoeForCausalLM(config).float()


def with_lora(model, r: int = 4, targets=EXPERTS):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                                                  target_parameters=targets))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero; give it values so the LoRA term is not empty
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return peft_model


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))


def logits_and_grads(model):
    model.zero_grad()
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def count_calls(monkeypatch, name):
    calls = []
    original = getattr(lora_experts, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(lora_experts, name, counted)
    return calls


@pytest.mark.parametrize("rank, lora_matmul", [(4, "grouped_mm"), (2, "reference loop")])
def test_routed_path_equals_peft_in_logits_and_every_lora_gradient(rank, lora_matmul, monkeypatch):
    model = with_lora(tiny_qwen3_moe(), r=rank)
    assert model.base_model.model.config._experts_implementation == "grouped_mm"
    peft_logits, peft_grads = logits_and_grads(model)

    assert lora_experts.install_routed_lora_experts(model) == ["Qwen3MoeExperts"] * 2
    routed = count_calls(monkeypatch, "routed_lora_experts_forward")
    loops = count_calls(monkeypatch, "grouped_matmul_reference")
    logits, grads = logits_and_grads(model)

    assert len(routed) == 2  # both MoE layers took the routed path, not peft's
    # per projection: base + two LoRA matmuls; the base is aligned, rank 2's LoRA operands are not
    assert len(loops) == (0 if lora_matmul == "grouped_mm" else 2 * 2 * 2)
    assert torch.allclose(logits, peft_logits, atol=1e-5, rtol=0)
    expert_grads = [n for n in grads if ".experts." in n]
    assert len(expert_grads) == 2 * 2 * 2  # A and B of gate_up_proj and down_proj, two layers
    for name, grad in grads.items():
        scale = peft_grads[name].abs().max()
        assert scale > 0, name
        assert (grad - peft_grads[name]).abs().max() <= 1e-4 * scale, name
    frozen = [p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    assert frozen and all(p.grad is None for p in frozen)  # the base experts stay frozen


def test_experts_without_the_newer_flags_take_the_routed_path(monkeypatch):
    """transformers 5.17 builds experts with neither ``has_post_expert_norm``
    nor ``_is_expert_parallel`` (its grouped_mm forward has no post-expert norm
    and masks expert-parallel sentinels always): the routed path still runs
    there, and equals peft."""
    model = with_lora(tiny_qwen3_moe())
    peft_logits, _ = logits_and_grads(model)  # before: this transformers' own forward reads the flags
    for module in model.modules():
        for flag in ("has_post_expert_norm", "_is_expert_parallel"):
            if flag in vars(module):
                delattr(module, flag)
    assert not any(hasattr(m, "_is_expert_parallel") or hasattr(m, "has_post_expert_norm") for m in model.modules())
    lora_experts.install_routed_lora_experts(model)
    routed = count_calls(monkeypatch, "routed_lora_experts_forward")
    logits, _ = logits_and_grads(model)
    assert len(routed) == 2
    assert torch.allclose(logits, peft_logits, atol=1e-5, rtol=0)


def test_grouped_matmul_dispatch_and_reference_agree_with_empty_groups():
    x = torch.randn(10, 8)
    weight = torch.randn(4, 8, 12)
    offsets = torch.tensor([3, 3, 9, 10], dtype=torch.int32)  # group 1 empty
    expected = torch.cat([x[:3] @ weight[0], x[3:9] @ weight[2], x[9:] @ weight[3]])
    assert lora_experts.grouped_mm_applies(x, weight)
    assert torch.allclose(lora_experts.grouped_matmul(x, weight, offsets), expected, atol=1e-6)
    assert torch.allclose(lora_experts.grouped_matmul_reference(x, weight, offsets), expected, atol=1e-6)
    unaligned = torch.randn(4, 8, 6)  # rows of 24 bytes: torch's grouped GEMM refuses them
    assert not lora_experts.grouped_mm_applies(x, unaligned)
    assert torch.allclose(lora_experts.grouped_matmul(x, unaligned, offsets),
                          torch.cat([x[:3] @ unaligned[0], x[3:9] @ unaligned[2], x[9:] @ unaligned[3]]), atol=1e-6)


def test_cases_the_path_does_not_cover_run_peft(monkeypatch):
    model = with_lora(tiny_qwen3_moe())
    base_logits = model.base_model.model(input_ids=IDS).logits.detach()
    with model.disable_adapter():
        plain = model(input_ids=IDS).logits.detach()
    lora_experts.install_routed_lora_experts(model)
    routed = count_calls(monkeypatch, "routed_lora_experts_forward")
    with model.disable_adapter():  # disabled adapters: peft's forward, the plain experts
        assert torch.allclose(model(input_ids=IDS).logits, plain, atol=1e-6)
    model.base_model.model.config._experts_implementation = "eager"  # another experts implementation
    assert torch.allclose(model(input_ids=IDS).logits, base_logits, atol=1e-5)
    assert routed == []


def test_only_down_proj_adapted_still_equals_peft():
    model = with_lora(tiny_qwen3_moe(), targets=["mlp.experts.down_proj"])
    peft_logits, peft_grads = logits_and_grads(model)
    lora_experts.install_routed_lora_experts(model)
    logits, grads = logits_and_grads(model)
    assert torch.allclose(logits, peft_logits, atol=1e-5, rtol=0)
    for name, grad in grads.items():
        assert (grad - peft_grads[name]).abs().max() <= 1e-4 * peft_grads[name].abs().max(), name


def test_training_lowers_the_loss_and_the_adapter_reloads_in_plain_peft(tmp_path):
    from peft import PeftModel

    model = with_lora(tiny_qwen3_moe())
    lora_experts.install_routed_lora_experts(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=IDS, labels=IDS).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.1, losses
    model.save_pretrained(tmp_path / "adapter")
    trained = model(input_ids=IDS).logits.detach()

    reloaded = PeftModel.from_pretrained(tiny_qwen3_moe(), tmp_path / "adapter")  # same seed: same base
    assert torch.allclose(reloaded(input_ids=IDS).logits, trained, atol=1e-5, rtol=0)


def test_the_plugin_installs_it_when_asked_and_reports_it():
    from plait.testing import build_run_config

    from plait_kernels.plugin import patch_model
    from plait_kernels.selection import routes_expert_lora

    cfg, _ = build_run_config({"base_model": "m", "plait_kernels": "torch", "lora_experts_kernel": True})
    assert routes_expert_lora(cfg)
    model = with_lora(tiny_qwen3_moe())
    report = patch_model(cfg=cfg, model=model)
    assert report == {"Qwen3MoeExperts x2": "plait torch lora_experts (LoRA on the routed tokens, LoRA folded into the grouped "
                              "matmuls) + plait triton moe_combine (on CUDA tensors)"}
    eager = with_lora(tiny_qwen3_moe())
    eager.base_model.model.config._experts_implementation = "eager"  # a path it does not cover: said, not claimed
    assert patch_model(cfg=cfg, model=eager) == {
        "Qwen3MoeExperts x2": "peft's LoRA experts, not lora_experts_kernel: experts_implementation is 'eager', "
                              "not 'grouped_mm'"}
    default, _ = build_run_config({"base_model": "m", "plait_kernels": "torch"})
    assert routes_expert_lora(default)  # on by default
    off, _ = build_run_config({"base_model": "m", "plait_kernels": "torch", "lora_experts_kernel": False})
    assert not routes_expert_lora(off)  # peft's own path on request: nothing swapped
    kernels_off, _ = build_run_config({"base_model": "m", "plait_kernels": "off"})
    assert not routes_expert_lora(kernels_off)


def test_lora_experts_kernel_with_the_plugin_off_is_refused():
    from plait.errors import ConfigError
    from plait.testing import build_run_config

    with pytest.raises(ConfigError, match=r"'lora_experts_kernel': true .* plait_kernels is 'off'"):
        build_run_config({"base_model": "m", "plait_kernels": "off", "lora_experts_kernel": True})


def test_in_bf16_the_routed_path_is_closer_to_float32_than_peft():
    """peft rounds W + s * B @ A to bf16 before the matmul, which drops most of
    the small LoRA term; the routed path keeps the term separate. Against the
    same weights in float32, its logits are at least as close as peft's."""
    import copy

    model = with_lora(tiny_qwen3_moe().to(torch.bfloat16), r=8)
    exact = copy.deepcopy(model).float()(input_ids=IDS).logits.detach()
    peft_error = (model(input_ids=IDS).logits.float() - exact).abs().max()
    lora_experts.install_routed_lora_experts(model)
    routed_error = (model(input_ids=IDS).logits.float() - exact).abs().max()
    assert routed_error <= peft_error, (routed_error, peft_error)
    assert routed_error < 0.05 * exact.abs().max()  # bf16 rounding, not a wrong term


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (torch's grouped GEMM on CUDA)")
@pytest.mark.parametrize("fold, weight_in_gate", [(False, True), (True, True), (False, False)])
def test_on_the_gpu_in_bf16_the_routed_path_matches_float32_as_well_as_peft(fold, weight_in_gate):
    """The check above on CUDA, where ``_grouped_mm`` runs its own kernels:
    there peft's merged weights lose less (its error is bf16 rounding, 0.0031
    on an H100), so the routed path's logits must be within 1.5x of peft's
    error (0.0034-0.0040 measured), and every LoRA gradient of the routed path
    is within 5% (of its largest entry) of the float32 model's. ``fold``: the
    folded path (``lora_experts_fold``), whose transposed operands and
    row-contracting weight-gradient GEMMs only CUDA's grouped GEMM checks here;
    the SiLU gate by the Triton GLU as plait_kernels: auto runs it, with the
    routing weights in its pass (``weight_in_gate``, the default) or on the
    down projection's output."""
    import copy

    model = with_lora(tiny_qwen3_moe().to(torch.bfloat16), r=8).cuda()
    ids = IDS.cuda()
    reference = copy.deepcopy(model).float()
    exact = reference(input_ids=ids).logits.detach()
    reference(input_ids=ids, labels=ids).loss.backward()
    exact_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    peft_error = (model(input_ids=ids).logits.float() - exact).abs().max()

    assert lora_experts.install_routed_lora_experts(model, fold=fold, triton_glu=True,
                                                    weight_in_gate=weight_in_gate) == ["Qwen3MoeExperts"] * 2
    assert all(hasattr(m, lora_experts_fold.FOLDED_ATTRIBUTE) == fold for m in experts_modules(model))
    routed_error = (model(input_ids=ids).logits.float() - exact).abs().max()
    assert routed_error <= 1.5 * peft_error, (routed_error, peft_error)
    assert routed_error < 0.05 * exact.abs().max()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            scale = exact_grads[name].abs().max()
            assert (param.grad.float() - exact_grads[name]).abs().max() <= 0.05 * scale, name


def train_steps(model, steps: int = 2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_moe_combine_kernel_routes_the_combine_through_triton_and_trains_as_without(monkeypatch):
    """``combine_kernel`` (``moe_combine_kernel: true``) ends each routed
    forward with the Triton combine (here interpreted on the CPU: the tests set
    TRITON_INTERPRET=1). In float32 it is the same products and sums, so two
    AdamW steps give the same losses (1e-6) and LoRA weights (1e-5 of their
    scale) as the PyTorch combine."""
    import copy

    pytest.importorskip("triton")
    from plait_kernels.ops import moe_combine as combine_op

    plain = with_lora(tiny_qwen3_moe())
    fused = copy.deepcopy(plain)
    # the weighted combine: the routing weights multiply the down projection's output (moe_weight_in_gate: false)
    lora_experts.install_routed_lora_experts(plain, weight_in_gate=False)
    assert lora_experts.install_routed_lora_experts(fused, combine_kernel=True,
                                                    weight_in_gate=False) == ["Qwen3MoeExperts"] * 2
    reference = count_calls(monkeypatch, "combine_reference")
    forwards, backwards = [], []
    for name, calls in (("moe_combine_forward", forwards), ("moe_combine_backward", backwards)):
        original = getattr(combine_op, name)
        monkeypatch.setattr(combine_op, name, lambda *a, _f=original, _c=calls, **k: _c.append(1) or _f(*a, **k))

    plain_losses, plain_weights = train_steps(plain)
    assert (len(reference), forwards, backwards) == (2 * 2, [], [])  # both layers, two steps
    fused_losses, fused_weights = train_steps(fused)
    # no more PyTorch combines; per layer and step the combine and (unit weights) the sum of the rows' gradients
    assert (len(reference), len(forwards), len(backwards)) == (2 * 2, 2 * 2 * 2, 2 * 2)
    assert fused_losses[-1] < fused_losses[0]
    assert torch.allclose(torch.tensor(fused_losses), torch.tensor(plain_losses), atol=1e-6, rtol=0)
    for name, weight in fused_weights.items():
        assert (weight - plain_weights[name]).abs().max() <= 1e-5 * plain_weights[name].abs().max(), name


def test_moe_combine_kernel_key_reaches_the_routed_forward_and_needs_that_path():
    from plait.errors import ConfigError
    from plait.testing import build_run_config

    from plait_kernels.plugin import patch_model

    cfg, _ = build_run_config({"base_model": "m", "plait_kernels": "torch", "moe_combine_kernel": True,
                               "lora_experts_fold": False})
    model = with_lora(tiny_qwen3_moe())
    assert patch_model(cfg=cfg, model=model) == {
        "Qwen3MoeExperts x2": "plait torch lora_experts (LoRA on the routed tokens, grouped matmuls) + plait triton "
                              "moe_combine (on CUDA tensors)"}
    wrappers = lora_experts.outermost_expert_wrappers(model)
    assert len(wrappers) == 2 and all(w._plait_moe_combine for w in wrappers)
    default, _ = build_run_config({"base_model": "m", "plait_kernels": "torch"})
    unasked = with_lora(tiny_qwen3_moe())
    patch_model(cfg=default, model=unasked)
    assert all(w._plait_moe_combine for w in lora_experts.outermost_expert_wrappers(unasked))  # on by default
    off, _ = build_run_config({"base_model": "m", "plait_kernels": "torch", "moe_combine_kernel": False})
    refused = with_lora(tiny_qwen3_moe())
    patch_model(cfg=off, model=refused)
    assert not any(w._plait_moe_combine for w in lora_experts.outermost_expert_wrappers(refused))
    with pytest.raises(ConfigError, match=r"'moe_combine_kernel': true .* lora_experts_kernel is false"):
        build_run_config({"base_model": "m", "lora_experts_kernel": False, "moe_combine_kernel": True})
    with pytest.raises(ConfigError, match=r"'moe_combine_kernel': true .* plait_kernels is 'off'"):
        build_run_config({"base_model": "m", "plait_kernels": "off", "moe_combine_kernel": True})


# ---------------------------------------------------------------------------
# The folded path (plait_kernels.lora_experts_fold, ``lora_experts_fold: true``):
# each projection as ``[x | s x A^T] @ [W^T ; B^T]``, in float32 the same
# products summed in another order, so logits agree with peft's to 1e-5
# absolute and every LoRA gradient to 1e-5 of its largest entry (measured:
# below 1e-6). Rank 4 in float32 fills the 16-byte rows exactly; rank 2 is
# padded with zero columns to 4, which must change nothing.


def experts_modules(model):
    return [m for m in model.modules() if type(m).__name__ == "Qwen3MoeExperts"]


def count_fold_calls(monkeypatch, name):
    calls = []
    original = getattr(lora_experts_fold, name)

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(tuple(out.shape))
        return out

    monkeypatch.setattr(lora_experts_fold, name, counted)
    return calls


@pytest.mark.parametrize("rank, triton_glu, weight_in_gate", [(4, False, True), (2, False, True), (4, True, True),
                                                              (4, True, False)])
def test_folded_path_equals_peft_with_no_gradient_for_the_frozen_weights(rank, triton_glu, weight_in_gate,
                                                                         monkeypatch):
    """``triton_glu``: the SiLU gate by Plait's Triton GLU (interpreted on
    the CPU), writing into the folded operands; ``weight_in_gate``: the
    routing weights multiplied in the gate (by the GLU's pass), or on the
    down projection's output by the combine; float32 math, same bounds."""
    model = with_lora(tiny_qwen3_moe(), r=rank)
    peft_logits, peft_grads = logits_and_grads(model)

    assert lora_experts.install_routed_lora_experts(model, fold=True, triton_glu=triton_glu,
                                                    weight_in_gate=weight_in_gate) == ["Qwen3MoeExperts"] * 2
    assert lora_experts.not_folded(model) == []
    folded = count_calls(monkeypatch, "_unfolded_routed_rows")
    loops = count_calls(monkeypatch, "grouped_matmul_reference")
    weight_grads = count_fold_calls(monkeypatch, "_grouped_over_rows")
    glu_launches = []
    if triton_glu:
        pytest.importorskip("triton")
        from plait_kernels.ops import glu

        for name in ("glu_forward", "glu_backward"):
            original = getattr(glu, name)
            monkeypatch.setattr(glu, name, lambda *a, _f=original, _n=name, **k: glu_launches.append(_n) or _f(*a, **k))
    logits, grads = logits_and_grads(model)

    assert folded == []  # both layers took the folded path
    assert sorted(glu_launches) == (["glu_backward"] * 2 + ["glu_forward"] * 2 if triton_glu else [])
    assert loops == []  # every grouped matmul, padded rank included, ran torch's grouped GEMM
    assert torch.allclose(logits, peft_logits, atol=1e-5, rtol=0)
    assert len([n for n in grads if ".experts." in n]) == 2 * 2 * 2
    for name, grad in grads.items():
        scale = peft_grads[name].abs().max()
        assert scale > 0, name
        assert (grad - peft_grads[name]).abs().max() <= 1e-5 * scale, name
    frozen = [p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    assert len(frozen) == 4 and all(p.grad is None and not p.requires_grad for p in frozen)
    # the weight-gradient GEMMs are dA and dB of both projections, each rank-sized (padded to 4): none for W
    padded = 4
    assert len(weight_grads) == 2 * 4 and all(padded in shape[1:] for shape in weight_grads), weight_grads


def test_the_buffers_replace_the_weights_and_hold_the_current_factors():
    model = with_lora(tiny_qwen3_moe(), r=2)
    experts = experts_modules(model)[0]
    before = {name: getattr(experts, name).detach().clone() for name in ("gate_up_proj", "down_proj")}
    lora_experts.install_routed_lora_experts(model, fold=True)
    folded = getattr(experts, lora_experts_fold.FOLDED_ATTRIBUTE)
    num_experts, two_i, hidden = before["gate_up_proj"].shape
    inter, padded = before["down_proj"].shape[-1], folded.padded
    # the weights are views of the buffers: same values, and the buffers add only the rank columns
    assert experts.gate_up_proj.data_ptr() == folded.gate_up.data_ptr()
    assert experts.down_proj.data_ptr() == folded.down.data_ptr()
    assert torch.equal(experts.gate_up_proj, before["gate_up_proj"])
    assert torch.equal(experts.down_proj, before["down_proj"])
    assert folded.gate_up.shape == (num_experts, two_i + padded, hidden + padded)
    assert folded.down.shape == (num_experts, hidden, inter + padded)
    model(input_ids=IDS)  # the forward copies peft's factors in
    wrapper = lora_experts.outermost_expert_wrappers(model)[0]  # down_proj's (peft nests gate_up_proj's inside)
    a, b, _ = lora_experts.lora_factors(wrapper, "default", torch.float32)  # [E, in, r], [E, r, out]
    assert torch.equal(folded.down_a[:, :2], a.transpose(1, 2))
    assert torch.equal(folded.down[:, :, inter:inter + 2], b.transpose(1, 2))
    assert not folded.down[:, :, inter + 2:].any() and not folded.down_a[:, 2:].any()  # padding stays zero


@pytest.mark.parametrize("weight_in_gate", [False, True])
def test_in_bf16_the_folded_path_is_as_close_to_float32_as_the_unfolded_one(weight_in_gate):
    """One GEMM accumulates the base and LoRA terms in float32 and rounds once;
    the unfolded path rounds both to bf16 and adds them. Against the same
    weights in float32, the folded experts' output is no further off (with a
    little slack for bf16's rounding of the gated activations). Compared on
    one experts module with a fixed routing: through the whole model, one
    bf16 rounding can flip a later layer's top-k choice, which says nothing
    about either path's precision."""
    model = with_lora(tiny_qwen3_moe().to(torch.bfloat16), r=8)
    generator = torch.Generator().manual_seed(4)
    hidden, weights = torch.randn(64, 32, generator=generator), torch.rand(64, 2, generator=generator)
    top_k_index = torch.randint(0, 4, (64, 2), generator=generator)
    exact = lora_experts.outermost_expert_wrappers(copy.deepcopy(model).float())[0](hidden, top_k_index, weights)
    errors = {}
    for fold in (False, True):
        routed = copy.deepcopy(model)
        lora_experts.install_routed_lora_experts(routed, fold=fold, weight_in_gate=weight_in_gate)
        assert lora_experts.not_folded(routed) == []
        wrapper = lora_experts.outermost_expert_wrappers(routed)[0]
        assert hasattr(wrapper.get_base_layer(), lora_experts_fold.FOLDED_ATTRIBUTE) == fold
        out = wrapper(hidden.bfloat16(), top_k_index, weights.bfloat16())
        errors[fold] = (out.float() - exact).abs().max()
    assert errors[True] <= 1.25 * errors[False], errors
    assert errors[True] < 0.05 * exact.abs().max()


def test_training_folded_saves_an_adapter_that_reloads_and_merges_in_plain_peft(tmp_path):
    from peft import PeftModel

    model = with_lora(tiny_qwen3_moe())
    lora_experts.install_routed_lora_experts(model, fold=True)
    unfolded = with_lora(tiny_qwen3_moe())
    lora_experts.install_routed_lora_experts(unfolded)
    losses, weights = train_steps(model, steps=6)
    unfolded_losses, unfolded_weights = train_steps(unfolded, steps=6)
    assert losses[-1] < losses[0] - 0.1, losses
    # AdamW steps on the folded gradients land in peft's parameters, as the unfolded path's do
    assert torch.allclose(torch.tensor(losses), torch.tensor(unfolded_losses), atol=1e-5, rtol=0)
    for name, weight in weights.items():
        assert (weight - unfolded_weights[name]).abs().max() <= 1e-4 * weight.abs().max(), name
    model.save_pretrained(tmp_path / "adapter")
    trained = model(input_ids=IDS).logits.detach()

    reloaded = PeftModel.from_pretrained(tiny_qwen3_moe(), tmp_path / "adapter")  # same seed: same base
    assert torch.allclose(reloaded(input_ids=IDS).logits, trained, atol=1e-5, rtol=0)
    merged = reloaded.merge_and_unload()  # what `plait merge-lora` does: base + adapter
    assert torch.allclose(merged(input_ids=IDS).logits, trained, atol=1e-5, rtol=0)
    # merging the trained model in place writes W + delta into the buffers' views
    assert torch.allclose(model.merge_and_unload()(input_ids=IDS).logits, trained, atol=1e-5, rtol=0)


def test_gradient_checkpointing_recomputes_the_folded_layer_exactly(monkeypatch):
    """The recompute writes the same factors into the buffers again: the
    gradients are the same bits as without checkpointing."""
    model = with_lora(tiny_qwen3_moe())
    lora_experts.install_routed_lora_experts(model, fold=True)
    _, grads = logits_and_grads(model)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    forwards = count_calls(monkeypatch, "_folded_weights")
    _, recomputed = logits_and_grads(model)
    assert len(forwards) == 2 * 2  # each layer's experts ran again in the backward
    for name, grad in grads.items():
        assert torch.equal(recomputed[name], grad), name


def test_weights_replaced_after_folding_take_the_unfolded_path(monkeypatch):
    model = with_lora(tiny_qwen3_moe())
    lora_experts.install_routed_lora_experts(model, fold=True)
    folded_logits, _ = logits_and_grads(model)
    for experts in experts_modules(model):
        experts.gate_up_proj.data = experts.gate_up_proj.data.clone()  # no longer the buffer's view
    unfolded = count_calls(monkeypatch, "_unfolded_routed_rows")
    logits, _ = logits_and_grads(model)
    assert len(unfolded) == 2
    assert torch.allclose(logits, folded_logits, atol=1e-5, rtol=0)


def test_fold_with_the_triton_combine_trains_as_the_unfolded_path(monkeypatch):
    """``lora_experts_fold`` with ``moe_combine_kernel`` (the combine
    interpreted on the CPU): two AdamW steps give the unfolded path's losses
    and LoRA weights, with the SiLU gate by the Triton GLU too (as
    plait_kernels: auto runs it). The combine kernel also sums each token's
    row gradients in the folded backward (unit weights)."""
    pytest.importorskip("triton")
    from plait_kernels.ops import moe_combine as combine_op

    plain = with_lora(tiny_qwen3_moe())
    both = copy.deepcopy(plain)
    lora_experts.install_routed_lora_experts(plain)
    lora_experts.install_routed_lora_experts(both, combine_kernel=True, fold=True, triton_glu=True)
    launches = []
    original = combine_op.moe_combine_forward
    monkeypatch.setattr(combine_op, "moe_combine_forward", lambda *a, **k: launches.append(1) or original(*a, **k))
    plain_losses, plain_weights = train_steps(plain)
    assert launches == []
    unfolded = count_calls(monkeypatch, "_unfolded_routed_rows")
    losses, weights = train_steps(both)
    assert (len(launches), unfolded) == (2 * 2 * 2, [])  # per layer and step: the combine and the rows' sum
    assert torch.allclose(torch.tensor(losses), torch.tensor(plain_losses), atol=1e-5, rtol=0)
    for name, weight in weights.items():
        assert (weight - plain_weights[name]).abs().max() <= 1e-4 * plain_weights[name].abs().max(), name


def test_lora_experts_fold_key_folds_reports_and_needs_the_routed_path(monkeypatch):
    from plait.errors import ConfigError
    from plait.testing import build_run_config

    from plait_kernels.plugin import patch_model

    cfg, _ = build_run_config({"base_model": "m", "plait_kernels": "torch", "lora_experts_fold": True,
                               "moe_combine_kernel": True})
    model = with_lora(tiny_qwen3_moe())
    assert patch_model(cfg=cfg, model=model) == {
        "Qwen3MoeExperts x2": "plait torch lora_experts (LoRA on the routed tokens, LoRA folded into the grouped "
                              "matmuls) + plait triton moe_combine (on CUDA tensors)"}
    wrappers = lora_experts.outermost_expert_wrappers(model)
    assert all(w._plait_fold and w._plait_moe_combine and not w._plait_triton_glu for w in wrappers)
    auto, _ = build_run_config({"base_model": "m", "lora_experts_fold": True})  # Plait's kernels allowed
    with_triton = with_lora(tiny_qwen3_moe())
    assert patch_model(cfg=auto, model=with_triton) == {
        "Qwen3MoeExperts x2": "plait torch lora_experts (LoRA on the routed tokens, LoRA folded into the grouped "
                              "matmuls) + plait triton moe_combine (on CUDA tensors) + plait triton swiglu (on CUDA "
                              "tensors)"}
    assert all(w._plait_triton_glu for w in lora_experts.outermost_expert_wrappers(with_triton))
    assert all(hasattr(m, lora_experts_fold.FOLDED_ATTRIBUTE) for m in experts_modules(model))

    only_down = with_lora(tiny_qwen3_moe(), targets=["mlp.experts.down_proj"])
    assert patch_model(cfg=cfg, model=only_down) == {
        "Qwen3MoeExperts x2": "plait torch lora_experts (LoRA on the routed tokens, grouped matmuls) + plait triton "
                              "moe_combine (on CUDA tensors), LoRA not folded: only one of gate_up_proj and "
                              "down_proj is adapted"}
    assert not any(hasattr(m, lora_experts_fold.FOLDED_ATTRIBUTE) for m in experts_modules(only_down))

    default, _ = build_run_config({"base_model": "m", "plait_kernels": "torch"})
    unasked = with_lora(tiny_qwen3_moe())
    patch_model(cfg=default, model=unasked)  # on by default in one process
    assert all(hasattr(m, lora_experts_fold.FOLDED_ATTRIBUTE) for m in experts_modules(unasked))
    off, _ = build_run_config({"base_model": "m", "plait_kernels": "torch", "lora_experts_fold": False})
    refused = with_lora(tiny_qwen3_moe())
    patch_model(cfg=off, model=refused)
    assert not any(hasattr(m, lora_experts_fold.FOLDED_ATTRIBUTE) for m in experts_modules(refused))
    monkeypatch.setenv("WORLD_SIZE", "2")  # several processes: a sharding wrapper may follow, so only when asked
    several = with_lora(tiny_qwen3_moe())
    patch_model(cfg=default, model=several)
    assert not any(hasattr(m, lora_experts_fold.FOLDED_ATTRIBUTE) for m in experts_modules(several))
    asked = with_lora(tiny_qwen3_moe())
    patch_model(cfg=cfg, model=asked)
    assert all(hasattr(m, lora_experts_fold.FOLDED_ATTRIBUTE) for m in experts_modules(asked))
    with pytest.raises(ConfigError, match=r"'lora_experts_fold': true .* lora_experts_kernel is false"):
        build_run_config({"base_model": "m", "lora_experts_kernel": False, "lora_experts_fold": True})
    with pytest.raises(ConfigError, match=r"'lora_experts_fold': true .* plait_kernels is 'off'"):
        build_run_config({"base_model": "m", "plait_kernels": "off", "lora_experts_fold": True})


def test_folded_lora_gradients_without_a_hidden_state_gradient():
    """Hidden states that need no gradient (frozen layers below): the folded
    backward skips the input-gradient GEMM and still gives the unfolded path's
    LoRA gradients (float32, 1e-5 of their scale)."""
    grads = []
    for fold in (False, True):
        model = with_lora(tiny_qwen3_moe())
        lora_experts.install_routed_lora_experts(model, fold=fold)
        wrapper = lora_experts.outermost_expert_wrappers(model)[0]
        assert hasattr(wrapper.get_base_layer(), lora_experts_fold.FOLDED_ATTRIBUTE) == fold
        hidden = torch.randn(12, 32, generator=torch.Generator().manual_seed(4))
        top_k_index = torch.randint(0, 4, (12, 2), generator=torch.Generator().manual_seed(5))
        weights = torch.rand(12, 2, generator=torch.Generator().manual_seed(6))
        wrapper(hidden, top_k_index, weights).square().sum().backward()
        grads.append({n: p.grad for n, p in wrapper.named_parameters() if p.requires_grad})
    assert len(grads[1]) == 4
    for name, grad in grads[1].items():
        assert (grad - grads[0][name]).abs().max() <= 1e-5 * grads[0][name].abs().max(), name


# ---------------------------------------------------------------------------
# The routing weights in the gate (``moe_weight_in_gate``, on by default): each
# routed row's weight multiplies its gated activation, [rows, intermediate],
# instead of the down projection's output, [rows, hidden]; the rows are summed
# per token unweighted. The same float32 sums in another order.


@pytest.mark.parametrize("weight_in_gate, triton_glu", [(False, False), (True, True)])
def test_weight_placement_and_the_triton_gate_equal_peft(weight_in_gate, triton_glu, monkeypatch):
    """The weighted combine (``weight_in_gate`` false), and the default with
    its gate by the Triton GLU (interpreted on the CPU, the weight in the same
    pass), give peft's logits (1e-5) and LoRA gradients (1e-4 of their scale),
    the router's included: its weights' gradient comes from the gate's backward."""
    if triton_glu:
        pytest.importorskip("triton")
    model = with_lora(tiny_qwen3_moe())
    peft_logits, peft_grads = logits_and_grads(model)
    lora_experts.install_routed_lora_experts(model, weight_in_gate=weight_in_gate, triton_glu=triton_glu)
    gated = count_calls(monkeypatch, "scale_rows")
    combined = count_calls(monkeypatch, "combine_reference")
    logits, grads = logits_and_grads(model)
    # per layer: the weighted combine, or (Triton GLU: none) the weights multiplied in the gate
    assert (len(combined), len(gated)) == ((2, 0) if not weight_in_gate else (0, 0))
    assert torch.allclose(logits, peft_logits, atol=1e-5, rtol=0)
    for name, grad in grads.items():
        assert (grad - peft_grads[name]).abs().max() <= 1e-4 * peft_grads[name].abs().max(), name


def test_the_router_gets_the_same_gradient_with_the_weight_in_the_gate():
    """A trainable router (not frozen, as under full fine-tuning of the gate):
    its weight's gradient flows through the routing weights, which the gate's
    backward differentiates here; it equals the weighted combine's (float32)."""
    grads = []
    for weight_in_gate in (False, True):
        model = with_lora(tiny_qwen3_moe())
        lora_experts.install_routed_lora_experts(model, weight_in_gate=weight_in_gate)
        routers = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
        assert len(routers) == 2
        for router in routers:
            router.requires_grad_(True)
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append([router.grad.clone() for router in routers])
    for got, want in zip(grads[1], grads[0]):
        assert want.abs().max() > 0
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_census_the_weight_in_the_gate_moves_fewer_bytes_and_no_hidden_wide_product():
    """Counted on the CPU (plait_kernels.census), one checkpointed forward +
    backward of an experts module: with the weights in the gate no multiply
    and no index write touches a [rows, hidden] tensor (the weighted combine
    has a product there forward and backward, and an index write), the step
    moves fewer bytes, and the forward keeps fewer for the backward."""
    from torch.utils.checkpoint import checkpoint

    from plait_kernels.census import counting, saved_for_backward

    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(24, 32, generator=generator)
    top_k_index = torch.randint(0, 4, (24, 2), generator=generator)
    weights = torch.rand(24, 2, generator=generator)
    census = {}
    for weight_in_gate in (False, True):
        model = with_lora(tiny_qwen3_moe())
        lora_experts.install_routed_lora_experts(model, weight_in_gate=weight_in_gate)
        wrapper = lora_experts.outermost_expert_wrappers(model)[0]
        x, w = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
        with counting(big_rows=24 * 2) as counted:
            checkpoint(wrapper, x, top_k_index, w, use_reentrant=False).sum().backward()
        with saved_for_backward(exclude=list(model.parameters()) + [x, w]) as saved:
            wrapper(x, top_k_index, w)
        census[weight_in_gate] = counted
        counted.saved_bytes = saved["bytes"]
    before, after = census[False], census[True]
    hidden_size = 32
    assert before.big_widths[("mul", hidden_size)] >= 3 and before.big_widths[("index_put", hidden_size)] >= 1
    assert after.big_widths[("mul", hidden_size)] == 0 and after.big_widths[("index_put", hidden_size)] == 0
    assert after.total_bytes < before.total_bytes
    assert after.flops == before.flops  # the same matmuls
    # the weight's product keeps the [rows, intermediate] activation for its gradient, not the [rows, hidden] rows
    assert after.saved_bytes < before.saved_bytes


def test_moe_weight_in_gate_key_is_on_by_default_false_restores_the_weighted_combine():
    from plait.errors import ConfigError
    from plait.testing import build_run_config

    from plait_kernels.plugin import patch_model

    unfolded = {"base_model": "m", "lora_experts_fold": False, "moe_combine_kernel": False}  # the weight's own report
    default, _ = build_run_config({**unfolded, "plait_kernels": "torch"})
    model = with_lora(tiny_qwen3_moe())
    assert patch_model(cfg=default, model=model) == {
        "Qwen3MoeExperts x2": "plait torch lora_experts (LoRA on the routed tokens, grouped matmuls)"}
    assert all(w._plait_weight_in_gate and not w._plait_triton_glu
               for w in lora_experts.outermost_expert_wrappers(model))
    off, _ = build_run_config({**unfolded, "plait_kernels": "torch", "moe_weight_in_gate": False})
    weighted = with_lora(tiny_qwen3_moe())
    assert patch_model(cfg=off, model=weighted) == {
        "Qwen3MoeExperts x2": "plait torch lora_experts (LoRA on the routed tokens, grouped matmuls, routing weights "
                              "on the down projection)"}
    assert not any(w._plait_weight_in_gate for w in lora_experts.outermost_expert_wrappers(weighted))
    auto, _ = build_run_config(unfolded)  # Plait's kernels allowed: the gate by the Triton GLU
    with_triton = with_lora(tiny_qwen3_moe())
    assert patch_model(cfg=auto, model=with_triton) == {
        "Qwen3MoeExperts x2": "plait torch lora_experts (LoRA on the routed tokens, grouped matmuls) + plait triton "
                              "swiglu (on CUDA tensors)"}
    assert all(w._plait_triton_glu for w in lora_experts.outermost_expert_wrappers(with_triton))
    with pytest.raises(ConfigError, match=r"'moe_weight_in_gate': true .* lora_experts_kernel is false"):
        build_run_config({"base_model": "m", "lora_experts_kernel": False, "moe_weight_in_gate": True})


@pytest.mark.parametrize("fold, listed", [(False, True), (True, True), (True, False)])
def test_the_recompute_pass_leaves_the_discarded_output_out_and_gradients_stay_exact(fold, listed, monkeypatch):
    """Under Plait's (non-reentrant) checkpointing, the recompute pass of a
    Qwen3-MoE layer discards the experts' output (it only reaches the residual
    add): the routed forward there skips the token sum (and, folded, the down
    projection's GEMM), saving all the backward needs. The loss and every
    gradient equal the run without checkpointing (float32, 1e-6 of scale).
    A block not known to leave the output unsaved (``listed`` false) recomputes
    everything."""
    from plait.model.recompute import enable_gradient_checkpointing

    if not listed:
        monkeypatch.setattr(lora_experts, "OUTPUT_FEEDS_RESIDUAL_BLOCKS", ())

    plain, checkpointed = with_lora(tiny_qwen3_moe()), with_lora(tiny_qwen3_moe())  # the same seeds: the same model
    for model in (plain, checkpointed):
        lora_experts.install_routed_lora_experts(model, fold=fold)
        assert lora_experts.not_folded(model) == [] and all(
            hasattr(m, lora_experts_fold.FOLDED_ATTRIBUTE) == fold for m in experts_modules(model))
    assert all(w._plait_output_feeds_residual == listed for w in lora_experts.outermost_expert_wrappers(checkpointed))
    want_logits, want = logits_and_grads(plain)
    enable_gradient_checkpointing(checkpointed, True)
    checkpointed.train()
    skips, sums = [], count_calls(monkeypatch, "sum_token_rows")
    original = lora_experts.routed_lora_experts_forward
    monkeypatch.setattr(lora_experts, "routed_lora_experts_forward",
                        lambda *a, **k: skips.append(k["skip_output"]) or original(*a, **k))
    grouped = count_fold_calls(monkeypatch, "_grouped")
    logits, got = logits_and_grads(checkpointed)
    assert skips == [False, False] + [listed] * 2  # two layers' forwards, then their recomputes
    # per layer: the forward's token sum and the backward's sum of the rows' gradients (+ the recompute's unlisted)
    assert len(sums) == 2 * (2 if listed else 3)
    if fold:  # per layer, row-wise grouped GEMMs: forward 4, recompute 3 (no down projection; 4 unlisted), backward 4
        assert len(grouped) == 2 * (4 + (3 if listed else 4) + 4)
    assert torch.allclose(logits, want_logits, atol=1e-6, rtol=0)
    for name, grad in got.items():
        assert (grad - want[name]).abs().max() <= 1e-6 * want[name].abs().max(), name


class RoutedRowBytes(TorchDispatchMode):
    """The most bytes of ``[rows, c]`` tensors (``c > small``: the routed rows'
    activations and gradients, not their rank-sized bottlenecks) live at once
    among those made while the mode is on; each storage counted once, from
    the op that made it to its release (a weak reference to it)."""

    def __init__(self, rows: int, small: int):
        super().__init__()
        self.rows, self.small, self.live, self.peak = rows, small, 0, 0
        self.refs = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == self.rows and t.shape[1] > self.small:
                storage = t.untyped_storage()
                if id(storage) not in self.refs:
                    size = storage.nbytes()
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    self.refs[id(storage)] = weakref.ref(storage, lambda _, k=id(storage), n=size: self._free(k, n))
        return out

    def _free(self, key, size):
        self.refs.pop(key, None)
        self.live -= size


def test_folded_backward_frees_each_routed_tensor_after_its_last_use(monkeypatch):
    """Under checkpointing (the recompute is the backward's): the folded path with
    the Triton GLU keeps no gated activations (its backward writes them again),
    frees each recomputed tensor after its last read and the rows' gradient after
    the down projection's backward, so at most the gate/up input and output, the
    down projection's operand gradient and one of (rows' gradient, gate/up's
    operand gradient) are live at once; before, the rows' gradient, the gated
    activations and gate/up's operand and input gradients were live on top.
    The loss and gradients equal the unchecked model's (float32)."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from plait.model.recompute import enable_gradient_checkpointing
    from plait_kernels.selection import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("the CPU model's gate takes the Triton GLU only under TRITON_INTERPRET=1")
    # the interpreter leaves each launch's arguments in a reference cycle: collected at once here, so
    # that a tensor is released when the code drops it, as on a GPU
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda *a, **k: (run(*a, **k), gc.collect(1))[0])
    ids = IDS[:1]
    plain, checkpointed = with_lora(tiny_qwen3_moe()), with_lora(tiny_qwen3_moe())
    for model in (plain, checkpointed):
        lora_experts.install_routed_lora_experts(model, fold=True, triton_glu=True)
    want_loss = plain(input_ids=ids, labels=ids).loss
    want_loss.backward()
    enable_gradient_checkpointing(checkpointed, True)
    checkpointed.train()
    loss = checkpointed(input_ids=ids, labels=ids).loss
    config = checkpointed.config
    rows, p = ids.numel() * config.num_experts_per_tok, 4  # float32: the rank 4 padded to 4
    hidden, inter = config.hidden_size, config.moe_intermediate_size
    counter = RoutedRowBytes(rows, small=p)
    with counter:
        loss.backward()
    bound = rows * 4 * ((hidden + p) + 2 * inter + (inter + p) + max(hidden, 2 * inter + p))
    assert 0 < counter.peak <= bound, (counter.peak, bound)
    assert torch.allclose(loss, want_loss, atol=1e-6, rtol=0)
    plain_params = dict(plain.named_parameters())
    for name, param in checkpointed.named_parameters():
        if param.requires_grad:
            want = plain_params[name].grad
            assert (param.grad - want).abs().max() <= 1e-6 * want.abs().max(), name

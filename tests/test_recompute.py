"""``gradient_checkpointing: offload``: checkpointed layer inputs parked in pinned
host memory. The CPU tests check the wiring (every decoder layer routed through
the offloader, gradients unchanged, bad combinations refused); the GPU tests
check what it is for: the same gradients, bit for bit, with the layer inputs
off the device, and the pinned buffers reused from step to step."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest
import torch

from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model
from plait.model.recompute import ActivationOffloader, enable_gradient_checkpointing
from plait.pipeline import setup_model, setup_tokenizer

ROOT = Path(__file__).resolve().parents[1]

LAYERS = 3


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("recompute") / "model", num_hidden_layers=LAYERS)


def load(model_dir, mode, device="cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).train()
    offloader = enable_gradient_checkpointing(model, mode)
    return model, offloader


def grads_after_step(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("value", ["offload", "unsloth"])
def test_model_pipeline_routes_every_decoder_layer_through_the_offloader(tiny_model, value):
    cfg, pm = build_run_config({"base_model": str(tiny_model), "gradient_checkpointing": value})
    model = setup_model(cfg, pm, setup_tokenizer(cfg, pm), for_training=True, device=torch.device("cpu"))
    assert model.is_gradient_checkpointing
    wrapped = [m for m in model.modules() if getattr(m, "_gradient_checkpointing_func", None) is not None
               and getattr(m._gradient_checkpointing_func, "__name__", "") == "offloaded"]
    assert len(wrapped) == LAYERS


def test_plain_checkpointing_has_no_offloader(tiny_model):
    model, offloader = load(tiny_model, True)
    assert offloader is None and model.is_gradient_checkpointing


def test_on_the_cpu_offload_leaves_gradients_unchanged_and_says_why(tiny_model, caplog):
    ids = torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = grads_after_step(load(tiny_model, True)[0], ids)
    model, offloader = load(tiny_model, "offload")
    with caplog.at_level("INFO", logger="plait.recompute"):
        offloaded = grads_after_step(model, ids)
    assert plain.keys() == offloaded.keys() and len(plain) > 0
    assert all(torch.equal(plain[n], offloaded[n]) for n in plain)
    assert offloader.pool.allocated_bytes == 0  # nothing to move off a CPU
    assert "already live in host memory" in caplog.text


def test_only_the_model_pipeline_switches_checkpointing_on(tiny_model):
    """One owner: in the source of core and every plugin, transformers' switch
    is called only by ``enable_gradient_checkpointing``, that only by
    ``apply_gradient_checkpointing``, and that only by the model pipeline (and
    plait-parallel's equivalence harness, a loop of its own). A model set up
    for evaluation or inference is left alone."""
    allowed = {"gradient_checkpointing_enable": {"core/plait/model/recompute.py"},
               "activation_checkpointing_enable": {"core/plait/model/recompute.py"},
               "enable_gradient_checkpointing": {"core/plait/model/recompute.py"},
               "apply_gradient_checkpointing": {"core/plait/pipeline.py",
                                                "plugins/plait-parallel/plait_parallel/equivalence.py"}}
    sources = [*ROOT.glob("core/plait/**/*.py"), *ROOT.glob("plugins/*/plait_*/**/*.py"),
               *ROOT.glob("contrib/*/plait_*/**/*.py")]
    assert len(sources) > 50
    callers = {name: set() for name in allowed}
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
                if name in callers:
                    callers[name].add(path.relative_to(ROOT).as_posix())
    assert callers == allowed

    cfg, pm = build_run_config({"base_model": str(tiny_model), "gradient_checkpointing": True})
    tokenizer = setup_tokenizer(cfg, pm)
    assert not pm.hook.load_model(cfg=cfg, tokenizer=tokenizer).is_gradient_checkpointing
    assert not setup_model(cfg, pm, tokenizer, for_training=False, device=torch.device("cpu")).is_gradient_checkpointing
    assert setup_model(cfg, pm, tokenizer, for_training=True, device=torch.device("cpu")).is_gradient_checkpointing


def test_offload_with_reentrant_checkpointing_is_refused_before_loading(tiny_model):
    with pytest.raises(ConfigError, match="gradient_checkpointing: offload needs non-reentrant"):
        build_run_config({"base_model": str(tiny_model), "gradient_checkpointing": "offload",
                          "gradient_checkpointing_kwargs": {"use_reentrant": True}})


# ------------------------------------------------------------------ on a GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
def test_offloaded_gradients_equal_plain_checkpointing_and_buffers_are_reused(tiny_model):
    ids = torch.randint(5, 100, (4, 64), generator=torch.Generator().manual_seed(0)).cuda()
    plain = grads_after_step(load(tiny_model, True, "cuda")[0], ids)
    model, offloader = load(tiny_model, "offload", "cuda")
    first = grads_after_step(model, ids)
    hidden = model.config.hidden_size
    # exactly the layer inputs went to the host: LAYERS of [4, 64, hidden] float32
    assert offloader.pool.allocated_bytes == LAYERS * 4 * 64 * hidden * 4
    second = grads_after_step(model, ids)
    assert offloader.pool.allocated_bytes == LAYERS * 4 * 64 * hidden * 4  # reused, not pinned again
    for grads in (first, second):
        assert grads.keys() == plain.keys()
        assert all(torch.equal(plain[n], grads[n]) for n in plain)


@gpu
def test_offload_frees_the_layer_inputs_from_device_memory(tmp_path):
    """8 layers of [8, 1024, 512] float32 inputs (16 MiB each): after the forward
    (copies finished), plain checkpointing holds all of them on the device and
    offloading none. Measured once the copies are done, not as a peak: how much
    of the peak goes depends on the host link keeping up with the compute."""
    model_dir = make_tiny_model(tmp_path / "model", num_hidden_layers=8, hidden_size=512, intermediate_size=1024,
                                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    ids = torch.randint(5, 100, (8, 1024), generator=torch.Generator().manual_seed(0)).cuda()

    def held_after_forward(mode):
        model = load(model_dir, mode, "cuda")[0]
        grads_after_step(model, ids)  # warm-up: allocator pools, pinned buffers
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # the allocator retires blocks whose side-stream copies are done
        held = torch.cuda.memory_allocated() - base
        loss.backward()
        del model, loss
        torch.cuda.empty_cache()
        return held

    layer_input = 8 * 1024 * 512 * 4
    saved = held_after_forward(True) - held_after_forward("offload")
    assert saved >= 7 * layer_input, (saved / 2**20, layer_input / 2**20)


def test_offloader_passes_host_tensors_through():
    offloader = ActivationOffloader()
    t = torch.randn(3, 3)
    assert offloader.unpack(offloader.pack(t)) is t


# ------------------------------------------- outputs kept for the recompute pass


class _SquareKeepingItsOutput(torch.autograd.Function):
    """``x * x`` whose forward parks its output for the recompute pass and, in
    that pass, hands the parked values back instead of computing them."""

    computed = 0

    @staticmethod
    def forward(ctx, x):
        from plait.model.recompute import keep_for_recompute, keeps_for_recompute, take_kept

        ctx.save_for_backward(x)
        kept = take_kept()
        if kept is not None:
            return kept[0]
        _SquareKeepingItsOutput.computed += 1
        out = x * x
        if keeps_for_recompute():
            keep_for_recompute([out])
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def _keeping_layer_grad(mode, device, host_budget_bytes=None):
    """The gradient of a two-layer checkpointed stack of ``sin(square(x))`` and
    how many times the square was computed."""
    from torch.utils.checkpoint import checkpoint

    from plait.model.recompute import ActivationOffloader, mark_recompute

    offloader = ActivationOffloader(host_budget_bytes) if mode == "offload" else None
    if offloader is not None:
        offloader.layers = 2
    func = functools.partial(checkpoint, use_reentrant=False)
    if offloader is not None:
        func = offloader.wrap(func)
    func = mark_recompute(func, keeper=offloader)
    _SquareKeepingItsOutput.computed = 0
    x = torch.linspace(-1, 1, 24, dtype=torch.float64, device=device).reshape(4, 6).requires_grad_()
    h = x
    for _ in range(2):
        h = func(lambda t: torch.sin(_SquareKeepingItsOutput.apply(t)) + t, h)
    h.sum().backward()
    return x.grad, _SquareKeepingItsOutput.computed, offloader


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_outputs_kept_in_the_forward_stand_in_for_the_recompute(device):
    plain_grad, plain_computed, _ = _keeping_layer_grad(True, device)
    kept_grad, kept_computed, offloader = _keeping_layer_grad("offload", device)
    assert plain_computed == 4  # two layers, each forward and recompute
    assert kept_computed == 2  # the recompute pass took the parked outputs
    assert torch.equal(kept_grad, plain_grad)
    x = torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(4, 6)
    assert torch.allclose(plain_grad.cpu(), _chain_grad(x), atol=1e-12)
    if device == "cuda":  # the two kept [4, 6] float64 outputs went through pinned buffers too
        assert offloader.pool.allocated_bytes >= 2 * 4 * 6 * 8


# one layer's input and its kept square are each a [4, 6] float64 tensor
_TENSOR = 4 * 6 * 8


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
@pytest.mark.parametrize("budget, computed", [
    (2 * _TENSOR + 2 * _TENSOR, 3),      # both inputs, and room for the first layer's square only
    (2 * _TENSOR + 2 * _TENSOR - 1, 4),  # not even that: every square is recomputed
    (2 * _TENSOR + 4 * _TENSOR, 2),      # room for both
])
def test_kept_outputs_stop_at_the_host_budget_and_gradients_stay_the_same(device, budget, computed):
    plain_grad, _, _ = _keeping_layer_grad(True, device)
    kept_grad, kept_computed, offloader = _keeping_layer_grad("offload", device, host_budget_bytes=budget)
    assert kept_computed == computed
    assert torch.equal(kept_grad, plain_grad)
    assert offloader.input_bytes == _TENSOR
    assert offloader.kept_bytes == 0  # every kept group was taken back by the backward


def test_the_host_budget_is_shared_among_a_nodes_ranks(monkeypatch):
    from plait.model.recompute import host_budget_from_environment

    alone = host_budget_from_environment()
    assert alone is not None and alone > 0  # Linux says what it has free
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert host_budget_from_environment() == pytest.approx(alone / 4, rel=0.05)


@gpu
def test_large_pinned_buffers_are_pinned_at_their_exact_size():
    from plait.model.recompute import EXACT_PIN_MIN_BYTES, pinned_exact

    rows = EXACT_PIN_MIN_BYTES // 4096 + 3  # just over a power of two: torch's allocator would double it
    host, registered = pinned_exact((rows, 1024), torch.float32)
    assert registered and host.is_pinned() and host.nbytes == rows * 4096
    values = torch.randn(rows, 1024, device="cuda")
    host.copy_(values, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(host.cuda(), values)
    torch.cuda.cudart().cudaHostUnregister(host.data_ptr())


def _chain_grad(x):
    """d/dx of f(f(x)) with f(t) = sin(t^2) + t, f'(t) = 2t cos(t^2) + 1."""
    inner = torch.sin(x * x) + x
    return (2 * inner * torch.cos(inner * inner) + 1) * (2 * x * torch.cos(x * x) + 1)


def test_nothing_is_kept_outside_a_checkpointed_layer():
    from plait.model.recompute import keeps_for_recompute, take_kept

    assert not keeps_for_recompute() and take_kept() is None

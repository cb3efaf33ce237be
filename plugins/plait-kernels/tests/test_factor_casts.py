"""LoRA factors cast once per optimizer step: the same training, fewer casts.

A bfloat16 base with float32 adapters through core's loop (LoRA on every
linear, the fused paths under the Triton interpreter, gradient checkpointing,
two micro-batches a step): ``lora_cast_once`` on and off give bit-identical
losses, and on, each factor group is cast once per optimizer step.
"""

import pytest

pytest.importorskip("omegaconf")
pytest.importorskip("peft")

import torch  # noqa: E402

import plait_kernels.plugin as kernels_plugin  # noqa: E402
from plait.testing import make_tiny_model  # noqa: E402
from plait_kernels import factor_casts  # noqa: E402


def _train(model_dir, out_dir, monkeypatch, loop_losses, cast_once):
    """Per-step losses of two steps, and the casts ``factor_casts`` made."""
    import plait_peft.plugin as peft_plugin

    casts = []
    cast = factor_casts._cast
    monkeypatch.setattr(factor_casts, "_cast", lambda parts, dtype: casts.append(len(parts)) or cast(parts, dtype))
    losses = loop_losses(model_dir, out_dir, {
        "plait_kernels": "triton", "torch_dtype": "bfloat16", "adapter": "lora", "lora_r": 4, "lora_alpha": 8,
        "lora_dropout": 0.0, "lora_target_linear": True, "gradient_accumulation_steps": 2,
        "gradient_checkpointing": True, "max_steps": 2, "lora_cast_once": cast_once,
    }, plugins=[peft_plugin], rows=2)
    return losses, casts


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter run")
def test_casting_once_a_step_trains_bit_identically(tmp_path, monkeypatch, loop_losses):
    model_dir = make_tiny_model(tmp_path / "model")
    every_use, casts_every_use = _train(model_dir, tmp_path / "every", monkeypatch, loop_losses, False)
    once, casts_once = _train(model_dir, tmp_path / "once", monkeypatch, loop_losses, True)
    assert len(once) == 2 and once == every_use  # the same float32 values, to the bit
    assert not factor_casts._holders and not factor_casts._copies  # the run let go of the cache
    # per layer and step: the stacked q/k/v A, o's A, each B of q/k/v/o, the MLP's stacked
    # gate/up A and down's A and B (gate and up's B are read in float32 by the kernel)
    layers, steps = 2, 2
    assert len(casts_once) == 9 * layers * steps
    # every use: forward, the checkpoint's recompute, backward, for each of two micro-batches
    assert len(casts_every_use) > 2 * 2 * len(casts_once)


def test_a_factor_changed_in_place_within_a_step_is_cast_again():
    w = torch.nn.Parameter(torch.randn(4, 8))
    opt = torch.optim.SGD([w], lr=1.0)
    hold = factor_casts.hold_for_run(opt)
    try:
        with torch.no_grad():
            first = factor_casts.in_dtype(w, torch.bfloat16)
            assert factor_casts.in_dtype(w, torch.bfloat16) is first  # cached
            w.mul_(2)  # an in-place change bumps the version
            again = factor_casts.in_dtype(w, torch.bfloat16)
            assert again is not first and torch.equal(again, (w * 1).to(torch.bfloat16))
        # with gradients on the cast carries a graph: never cached
        assert factor_casts.in_dtype(w, torch.bfloat16).grad_fn is not None
        w.grad = torch.ones_like(w)
        opt.step()  # emptied by the step
        assert not factor_casts._copies
        with torch.no_grad():
            stacked = factor_casts.stacked([w, w[:2]], torch.bfloat16)
        assert stacked.dtype == torch.bfloat16 and torch.equal(stacked, torch.cat([w, w[:2]]).to(torch.bfloat16))
    finally:
        hold.remove()
    assert not factor_casts._holders and not factor_casts._copies
    with torch.no_grad():  # no run holds it: each call casts
        assert factor_casts.in_dtype(w, torch.bfloat16) is not factor_casts.in_dtype(w, torch.bfloat16)


@pytest.mark.parametrize("world_size, cast_once, held", [("1", None, True), ("1", False, False), ("2", None, False)])
def test_the_cache_is_held_by_single_process_runs_that_leave_it_on(monkeypatch, world_size, cast_once, held):
    # with several processes FSDP frees and gathers parameters within a step: no cache there
    from types import SimpleNamespace

    monkeypatch.setenv("WORLD_SIZE", world_size)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=1.0)
    cfg = SimpleNamespace(lora_cast_once=cast_once, plait_kernels="auto")
    handles = kernels_plugin.install_step_hooks(cfg=cfg, model=None, optimizer=opt, step_of=lambda: 0)
    assert bool(handles) == held and bool(factor_casts._holders) == held
    for handle in handles or ():
        handle.remove()
    assert not factor_casts._holders

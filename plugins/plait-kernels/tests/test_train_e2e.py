"""``plait``'s real training loop with the kernels: same losses as without them.

Core's loop loads the model, calls ``patch_model`` and ``build_loss``, and
trains. With ``plait_kernels: triton`` (the Triton interpreter on the CPU) the
per-step losses must match a ``plait_kernels: torch`` run of the same seed and
data, and go down.
"""

import pytest

pytest.importorskip("omegaconf")  # core's config stack (absent on bare GPU images)

import torch  # noqa: E402

from plait.testing import make_tiny_model  # noqa: E402


def _train(model_dir, out_dir, mode, loop_losses, keys=None, plugins=(), rows=1):
    """Per-step losses of three steps through core's loop with ``plait_kernels: mode``;
    ``keys`` add to (or override) the shared config, ``plugins`` to plait-kernels."""
    return loop_losses(model_dir, out_dir, {"plait_kernels": mode, **(keys or {})}, plugins, rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter run; the GPU is covered by test_model_patch")
def test_training_with_kernels_matches_without(tmp_path, loop_losses):
    model_dir = make_tiny_model(tmp_path / "model")
    with_torch = _train(model_dir, tmp_path / "torch", "torch", loop_losses, {"torch_dtype": "float32"})
    with_triton = _train(model_dir, tmp_path / "triton", "triton", loop_losses, {"torch_dtype": "float32"})
    assert len(with_triton) == len(with_torch) == 3
    # float32 both ways; three optimizer steps let rounding differences grow a little
    torch.testing.assert_close(torch.tensor(with_triton), torch.tensor(with_torch), atol=1e-4, rtol=1e-4)
    assert with_triton[-1] < with_triton[0]


def _train_qlora(model_dir, out_dir, mode, loop_losses):
    """Three QLoRA steps (NF4 + double quantization, LoRA on every linear) through core's loop."""
    import plait_bnb.plugin as bnb_plugin
    import plait_peft.plugin as peft_plugin

    return _train(model_dir, out_dir, mode, loop_losses, {
        "adapter": "qlora", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "float32", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "lora_target_linear": True,
    }, plugins=[peft_plugin, bnb_plugin])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter run")
def test_qlora_training_with_the_fused_paths_matches_bitsandbytes_and_peft(tmp_path, loop_losses):
    """QLoRA through the loop: with ``triton`` the fused LoRA MLP and q/k/v/o paths
    dequantize the 4-bit bases with Plait's NF4 kernel; with ``torch`` bitsandbytes
    and peft's modules do it. Same losses (fp32, 1e-4), and they fall."""
    pytest.importorskip("bitsandbytes")
    from plait_kernels import lora_linear, lora_mlp
    from plait_kernels.testing import CountCalls

    model_dir = make_tiny_model(tmp_path / "model")
    with_torch = _train_qlora(model_dir, tmp_path / "torch", "torch", loop_losses)
    with CountCalls(lora_mlp.LoRAGLUMLPFunction) as mlp_calls, \
            CountCalls(lora_linear.LoRASharedInputFunction) as projection_calls:
        with_triton = _train_qlora(model_dir, tmp_path / "triton", "triton", loop_losses)
    assert mlp_calls.count > 0 and projection_calls.count > 0  # the fused 4-bit paths ran
    assert len(with_triton) == len(with_torch) == 3
    torch.testing.assert_close(torch.tensor(with_triton), torch.tensor(with_torch), atol=1e-4, rtol=1e-4)
    assert with_triton[-1] < with_triton[0]


def _train_lora_offloaded(model_dir, out_dir, mode, loop_losses):
    """Three LoRA steps of two micro-batches each under ``gradient_checkpointing: offload``."""
    import plait_peft.plugin as peft_plugin

    return _train(model_dir, out_dir, mode, loop_losses, {
        "torch_dtype": "float32", "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "lora_target_linear": True, "gradient_checkpointing": "offload", "gradient_accumulation_steps": 2,
    }, plugins=[peft_plugin], rows=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter run")
def test_offloaded_lora_training_recomputes_from_the_kept_outputs(tmp_path, monkeypatch, loop_losses):
    """LoRA with offloaded checkpointing and gradient accumulation through the
    loop: with ``triton`` every layer's recompute takes the q/k/v and o outputs
    its forward kept (two groups a layer a micro-batch), and the losses equal
    the ``torch`` run's (peft's modules, plain recompute) and fall."""
    from plait.model import recompute
    from plait_kernels import lora_linear

    model_dir = make_tiny_model(tmp_path / "model")
    with_torch = _train_lora_offloaded(model_dir, tmp_path / "torch", "torch", loop_losses)
    taken = []  # per fused-projection call: whether it got kept outputs

    def recording_take_kept():
        got = recompute.take_kept()
        taken.append(got is not None)
        return got

    monkeypatch.setattr(lora_linear, "take_kept", recording_take_kept)
    with_triton = _train_lora_offloaded(model_dir, tmp_path / "triton", "triton", loop_losses)
    layers = 2  # make_tiny_model's default
    # 3 steps x 2 micro-batches x layers x (q/k/v, o): the forward finds nothing, the recompute its group
    assert taken.count(True) == 3 * 2 * layers * 2 and taken.count(False) == taken.count(True)
    assert len(with_triton) == len(with_torch) == 3
    torch.testing.assert_close(torch.tensor(with_triton), torch.tensor(with_torch), atol=1e-4, rtol=1e-4)
    assert with_triton[-1] < with_triton[0]

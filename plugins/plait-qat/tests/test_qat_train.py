"""QAT end to end: ``plait train`` with a ``qat:`` block fake-quantizes the
linear layers the training forward uses, the loss falls, and the saved model
is plain full-precision weights that transformers loads as is."""

from __future__ import annotations

import json

import pytest
import torch

from plait.hookspecs import hookimpl
from plait.testing import make_tiny_model, run_cli, write_config, write_jsonl

pytest.importorskip("torchao")

GROUP = 32


def linear_weights_seen(model, input_ids):
    """Every weight ``F.linear`` receives during one forward of ``model``:
    what the layers compute with, whatever module class does the computing."""
    seen = []

    class Capture(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.functional.linear:
                seen.append((args[1] if len(args) > 1 else kwargs["weight"]).detach().clone())
            return func(*args, **kwargs)

    with torch.no_grad(), Capture():
        model(input_ids=input_ids)
    return seen


def on_int4_grid(weight: torch.Tensor, group: int) -> bool:
    """Each group of ``group`` inputs of each output row holds at most 16
    values, evenly spaced: integers times one scale (an int4 grid)."""
    for row_group in weight.float().reshape(-1, group):
        values = torch.unique(row_group)
        if len(values) > 16:
            return False
        if len(values) > 2:
            gaps = values.diff()
            step = gaps.min()
            if not torch.allclose(gaps / step, torch.round(gaps / step), atol=1e-3):
                return False
    return True


class Spy:
    """After each step, one forward of the training model: are the weights
    the linear layers multiply by on the int4 grid?"""

    def __init__(self):
        self.on_grid = {}
        self.raw_equal = {}
        self.final_layers = None

    @hookimpl
    def on_step_end(self, run, metrics):
        ids = torch.tensor([[5, 17, 42, 9, 3, 77, 12, 8]])
        weights = linear_weights_seen(run.model, ids)
        self.on_grid[run.step] = all(on_int4_grid(w, GROUP) for w in weights)
        latent = [m.weight for m in run.model.modules() if isinstance(m, torch.nn.Linear)]
        self.raw_equal[run.step] = all(torch.equal(w, p.detach()) for w, p in zip(weights, latent))

    @hookimpl(trylast=True)  # after plait-qat's own on_train_end
    def on_train_end(self, run):
        self.final_layers = {type(m).__name__ for m in run.model.modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.slow
def test_qat_trains_fake_quantized_and_saves_plain_weights(tmp_path):
    pytest.importorskip("plait_formats")
    model_dir = make_tiny_model(tmp_path / "model")
    # one row repeated: every step sees the same batch, so the loss must fall
    data = write_jsonl(tmp_path / "data.jsonl", [{"instruction": "add 2 and 3", "input": "", "output": "5"}] * 16)
    config = write_config(
        tmp_path / "config.yml", base_model=str(model_dir), datasets=[{"path": str(data), "type": "alpaca"}],
        qat={"activation_dtype": "int8", "weight_dtype": "int4", "group_size": GROUP, "fake_quant_after_n_steps": 2},
        sequence_len=256, micro_batch_size=4, max_steps=8, learning_rate=3e-3, lr_scheduler="constant",
        output_dir=str(tmp_path / "out"))
    spy = Spy()
    result = run_cli(["train", str(config)], plugins=[spy])
    assert result.exit_code == 0, result.stderr[-3000:]
    # 2 layers x 7 projections + the LM head
    assert "15 linear layers -> torchao fake quantization, int8 activations" in result.stderr
    # fake quantization starts once 2 steps are done: before, the layers use their latent weights as they are
    assert spy.raw_equal[1] and not spy.on_grid[1]
    assert all(spy.on_grid[step] and not spy.raw_equal[step] for step in range(2, 9)), spy.on_grid
    out = tmp_path / "out"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 8 and losses[-1] < losses[2] - 0.5, losses
    # the in-memory model is converted back to plain layers at the end
    assert spy.final_layers == {"Linear"}

    # the saved model: plain weights, no quantization config, loaded by transformers as is
    from transformers import AutoModelForCausalLM

    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved
    loaded = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    trained_q, base_q = loaded.state_dict()[q_proj], base.state_dict()[q_proj]
    # full-precision latent weights, trained away from the base, not rounded to the int4 grid
    assert not torch.equal(trained_q, base_q) and not on_int4_grid(trained_q, GROUP)
    assert torch.isfinite(loaded(input_ids=torch.tensor([[5, 17, 42]])).logits).all()

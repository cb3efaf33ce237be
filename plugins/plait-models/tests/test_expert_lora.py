"""``lora_target_experts: true`` through the real ``plait train`` on a tiny Mixtral.

plait-peft passes the family's fused expert parameters (``mlp.experts.gate_up_proj``,
``mlp.experts.down_proj``, 3D ``nn.Parameter``s in transformers 5) to peft as
``target_parameters``; plait-models' ``on_train_start`` check then passes. The
test checks the expert adapters exist for every layer, are the trainable
parameters, move during training, the loss falls, and the saved adapter loads
with plain peft and reproduces the trained model's expert adapters exactly.
"""

from __future__ import annotations

import pytest

from plait.hookspecs import hookimpl
from plait.testing import make_tiny_model, run_cli, write_config, write_jsonl

EXPERT_SUFFIXES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


class Recorder:
    """Expert LoRA tensors at the start and end of training, and the losses."""

    def __init__(self):
        self.start, self.end, self.losses, self.trainable = {}, {}, [], []

    @staticmethod
    def experts(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and ".experts." in n}

    @hookimpl
    def on_train_start(self, run):
        self.start = self.experts(run.model)
        self.wrapped = {m.parameter_name for m in run.model.modules() if type(m).__name__ == "ParamWrapper"}
        self.trainable = [n for n, p in run.model.named_parameters() if p.requires_grad]

    @hookimpl
    def on_step_end(self, run, metrics):
        self.losses.append(metrics["loss"])

    @hookimpl
    def on_train_end(self, run):
        self.end = self.experts(run.model)


def _keys(tmp_path, model, data, **extra):
    return dict(base_model=str(model), datasets=[{"path": str(data), "type": "alpaca"}], sequence_len=128,
                micro_batch_size=4, gradient_accumulation_steps=1, max_steps=8, learning_rate=1e-2,
                warmup_steps=0, bf16=False, adapter="lora", lora_r=4, lora_alpha=8, lora_target_linear=True,
                lora_target_experts=True, router_aux_loss_coef=0, output_dir=str(tmp_path / "out"), **extra)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    from plait.quickstart import make_split

    root = tmp_path_factory.mktemp("experts")
    model = make_tiny_model(root / "mixtral", family="mixtral", num_local_experts=4, num_experts_per_tok=2)
    rows, _ = make_split(4, 1)
    return model, write_jsonl(root / "train.jsonl", rows)


def test_lora_target_experts_trains_and_saves_expert_adapters(tmp_path, mixtral):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, data = mixtral
    recorder = Recorder()
    cfg = write_config(tmp_path / "cfg.yml", **_keys(tmp_path, model_dir, data))
    result = run_cli(["train", str(cfg)], plugins=[recorder])
    assert result.exit_code == 0, result.stderr[-3000:]
    assert "LoRA adapts them through" in result.stderr  # describe_experts saw the adapters

    # A and B for each of the 2 fused parameters in each of the 2 layers (peft nests one
    # ParamWrapper per parameter around mlp.experts, hence no parameter name in the keys)
    assert len(recorder.start) == 2 * 2 * 2, sorted(recorder.start)
    for layer in range(2):
        assert sum(f"layers.{layer}.mlp.experts." in n for n in recorder.start) == 4, layer
    assert recorder.wrapped == {"gate_up_proj", "down_proj"}
    assert set(recorder.start) <= set(recorder.trainable)
    assert all("lora_" in n for n in recorder.trainable)  # the base (experts included) stays frozen
    # B starts at zero; training moves every expert adapter tensor
    for name, before in recorder.start.items():
        assert not torch.equal(before, recorder.end[name]), f"{name} did not change"
    assert recorder.losses[-1] < recorder.losses[0] - 0.1, recorder.losses

    # plain peft: base + saved adapter, with the trained expert tensors
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "out"))
    assert sorted(loaded.peft_config["default"].target_parameters) == sorted(EXPERT_SUFFIXES)
    reloaded = Recorder.experts(loaded)
    assert len(reloaded) == len(recorder.end)
    for name, tensor in recorder.end.items():
        assert torch.equal(reloaded[name], tensor), name


def test_lora_target_experts_with_dropout_is_a_config_error(tmp_path, mixtral):
    model_dir, data = mixtral
    cfg = write_config(tmp_path / "cfg.yml", **_keys(tmp_path, model_dir, data, lora_dropout=0.1))
    result = run_cli(["train", str(cfg)])
    assert result.exit_code != 0
    assert "'lora_dropout': 0.1 cannot be combined with lora_target_experts" in result.stderr

"""Per-parameter learning rates: embedding_lr, embedding_lr_scale, lr_groups
(core) and LoRA+ (plait-peft's loraplus_lr_ratio, loraplus_lr_embedding).

Each run takes one plain SGD step (no momentum, no decay, no clipping, a
constant schedule), so every parameter moved by exactly ``-lr x grad``; the
gradients are recorded as they are accumulated and the step's ratio is
checked parameter by parameter against the rate the keys give it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from plait import hookimpl
from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model

LR = 1e-2


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("lr_groups") / "model")


def _rows(n: int):
    from datasets import Dataset

    rows = [{"input_ids": list(range(10 + i, 22 + i)), "labels": [-100] * 3 + list(range(13 + i, 22 + i)),
             "attention_mask": [1] * 12, "length": 12} for i in range(n)]
    return Dataset.from_list(rows)


class GradRecorder:
    """Keeps a copy of every trainable parameter before the step and its gradient."""

    def __init__(self):
        self.before, self.grads = {}, {}

    @hookimpl
    def on_train_start(self, run):
        for name, param in run.model.named_parameters():
            if param.requires_grad:
                self.before[name] = param.detach().clone()
                param.register_post_accumulate_grad_hook(
                    lambda p, name=name: self.grads.__setitem__(name, p.grad.detach().clone()))


def _one_sgd_step(model_dir, tmp_path, **keys):
    from plait.train.loop import train

    recorder = GradRecorder()
    cfg, pm = build_run_config({"base_model": str(model_dir), "output_dir": str(tmp_path), "max_steps": 1,
                                "micro_batch_size": 4, "optimizer": "sgd", "optim_args": {"momentum": 0.0},
                                "learning_rate": LR, "lr_scheduler": "constant", "max_grad_norm": 0, **keys},
                               plugins=[recorder])
    run = train(cfg, pm, data=SimpleNamespace(train=_rows(4), eval=None))
    rates = {}
    for name, param in run.model.named_parameters():
        if name in recorder.grads:
            grad = recorder.grads[name]
            moved = recorder.before[name] - param.detach()
            if not grad.any():
                continue  # nothing to measure (a LoRA A matrix while B is still zero)
            # the least-squares rate over the whole tensor: float32 rounding of each
            # (param - lr x grad) averages out, a wrong rate does not
            rates[name] = float((moved.double() * grad.double()).sum() / (grad.double() ** 2).sum())
    return run, rates


def _assert_rates(rates, expected_of):
    for name, ratio in rates.items():
        expected = expected_of(name)
        assert ratio == pytest.approx(expected, rel=1e-3), name  # norm weights near 1 round most


def test_embedding_lr_and_lr_groups_set_exact_rates(tiny_model, tmp_path):
    groups = [{"name": "attention_q", "modules": ["self_attn.q_proj"], "lr": 3e-2},
              {"name": "layer1_mlp", "modules": ["layers.1.mlp."], "lr": 5e-3}]
    run, rates = _one_sgd_step(tiny_model, tmp_path, embedding_lr=1e-3, lr_groups=groups)

    def expected(name):
        if "self_attn.q_proj" in name:
            return 3e-2
        if "layers.1.mlp." in name:
            return 5e-3
        if name.startswith(("model.embed_tokens", "lm_head")):
            return 1e-3
        return LR
    _assert_rates(rates, expected)
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"} <= set(rates)
    # the loop logs the peak rate of the first group (the default one)
    assert run.last_metrics["lr"] == LR


def test_embedding_lr_scale_multiplies_learning_rate(tiny_model):
    from transformers import AutoModelForCausalLM

    from plait.model.params import optimizer_param_groups

    cfg, pm = build_run_config({"base_model": str(tiny_model), "learning_rate": 4e-4, "embedding_lr_scale": 0.25})
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    groups = optimizer_param_groups(cfg, pm, model)
    lr_of = {id(p): g.get("lr", "default") for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        expected = 1e-4 if name in ("model.embed_tokens.weight", "lm_head.weight") else "default"
        assert lr_of[id(param)] == expected, name


def test_loraplus_trains_b_matrices_at_ratio(tiny_model, tmp_path):
    _, rates = _one_sgd_step(tiny_model, tmp_path, adapter="lora", lora_target_linear=True, lora_r=4,
                             loraplus_lr_ratio=16)
    # at step 1 a fresh B is zero, so A's gradient is zero: only B (and its ratio) is measurable there
    assert sum("lora_B" in n for n in rates) == 14  # 7 linear layers x 2 decoder layers
    _assert_rates(rates, lambda name: LR * 16)


def test_loraplus_groups_follow_peft(tiny_model):
    """The groups peft's create_loraplus_optimizer builds, name by name: A at
    learning_rate, B at learning_rate x ratio, LoRA on the embedding at
    loraplus_lr_embedding."""
    from transformers import AutoModelForCausalLM

    from plait.model.params import optimizer_param_groups

    cfg, pm = build_run_config({"base_model": str(tiny_model), "adapter": "lora", "learning_rate": 2e-4,
                                "lora_target_modules": ["q_proj", "embed_tokens"], "loraplus_lr_ratio": 8,
                                "loraplus_lr_embedding": 3e-6})
    model = pm.hook.load_adapter(cfg=cfg, model=AutoModelForCausalLM.from_pretrained(tiny_model))
    groups = optimizer_param_groups(cfg, pm, model)
    lr_of = {id(p): g.get("lr", "default") for g in groups for p in g["params"]}
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        expected = 3e-6 if "lora_embedding" in name else 2e-4 * 8 if "lora_B" in name else "default"
        assert lr_of[id(param)] == expected, name
        seen.add(expected)
    assert seen == {3e-6, 2e-4 * 8, "default"}
    assert "lr" not in groups[0]  # group 0 trains at the optimizer's learning_rate (the logged one)


def test_bad_learning_rate_keys_are_refused(tiny_model, tmp_path):
    base = {"base_model": str(tiny_model)}
    with pytest.raises(ConfigError, match="embedding_lr .* and embedding_lr_scale .* are both set"):
        build_run_config({**base, "embedding_lr": 1e-4, "embedding_lr_scale": 0.5})
    with pytest.raises(ConfigError, match="lr_groups"):
        build_run_config({**base, "lr_groups": [{"name": "a", "modules": ["q_proj"]}]})  # no lr
    with pytest.raises(ConfigError, match="used twice"):
        build_run_config({**base, "lr_groups": [{"name": "a", "modules": ["q_proj"], "lr": 1e-4},
                                                {"name": "a", "modules": ["k_proj"], "lr": 1e-4}]})
    with pytest.raises(ConfigError, match="loraplus_lr_ratio is not set"):
        build_run_config({**base, "adapter": "lora", "lora_target_linear": True, "loraplus_lr_embedding": 1e-5})
    # Axolotl's default, restated without LoRA+ (or without any adapter): asks for nothing
    build_run_config({**base, "loraplus_lr_embedding": 1e-6})
    from transformers import AutoModelForCausalLM

    from plait.model.params import optimizer_param_groups

    cfg, pm = build_run_config({**base, "adapter": "lora", "lora_target_linear": True, "embedding_lr": 1e-5})
    model = pm.hook.load_adapter(cfg=cfg, model=AutoModelForCausalLM.from_pretrained(tiny_model))
    with pytest.raises(ConfigError, match="'embedding_lr': the input embeddings and the head do not train"):
        optimizer_param_groups(cfg, pm, model)
    with pytest.raises(ConfigError, match="match no trainable parameter"):
        _one_sgd_step(tiny_model, tmp_path, lr_groups=[{"name": "x", "modules": ["no_such"], "lr": 1e-3}])


def test_hook_parameter_learning_rates():
    """A plugin's answer puts its parameters into a group with that lr; two
    plugins giving one parameter different rates is an error naming both."""
    from plait.model.params import optimizer_param_groups

    class BiasFaster:
        @hookimpl
        def parameter_learning_rates(self, cfg, model):
            return {"bias": cfg.learning_rate * 10}

    class BiasSlower:
        @hookimpl
        def parameter_learning_rates(self, cfg, model):
            return {"bias": 1e-9}

    model = torch.nn.Linear(3, 2)
    cfg, pm = build_run_config({"base_model": "m", "learning_rate": 0.5}, plugins=[BiasFaster()])
    groups = optimizer_param_groups(cfg, pm, model)
    assert [(g.get("lr"), [p.shape for p in g["params"]]) for g in groups] == \
        [(None, [torch.Size([2, 3])]), (5.0, [torch.Size([2])])]
    optimizer = pm.hook.build_optimizer(cfg=cfg, params=groups)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 5.0]
    cfg, pm = build_run_config({"base_model": "m"}, plugins=[BiasFaster(), BiasSlower()])
    with pytest.raises(ConfigError, match="parameter 'bias' is given two learning rates"):
        optimizer_param_groups(cfg, pm, model)

"""tiled_mlp (ALST's tiled MLP): each decoder layer's MLP runs over sequence
shards and is recomputed per shard in backward. Loss and every gradient equal
the untiled model's (float32: the weight gradients are sums in another order)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from plait.errors import ConfigError
from plait.model.tiled_mlp import shard_count, tile_mlps
from plait.testing import build_run_config, make_tiny_model

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiled_mlp") / "model")


def _load(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model.train()  # checkpointing applies in training mode only (the tiny Llama has no dropout)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want):
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


def _ids(model, length=13):
    return torch.randint(3, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))


class CountShards:
    """The tokens of each MLP call (forward shards and backward recomputations),
    read at the gate projection."""

    def __init__(self, model):
        self.calls = []
        for layer in model.model.layers:
            layer.mlp.gate_proj.register_forward_hook(lambda m, args, out: self.calls.append(args[0].shape[-2]))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_llama_has_the_untiled_loss_and_gradients(tiny_model, checkpointing):
    model = _load(tiny_model)
    if checkpointing:
        from plait.model.recompute import enable_gradient_checkpointing

        enable_gradient_checkpointing(model, True)  # what the model pipeline does for gradient_checkpointing: true
    tiled = copy.deepcopy(model)
    report = tile_mlps(tiled, num_shards=3, layer_class="LlamaDecoderLayer")
    assert report == {"LlamaMLP x2": "tiled over the sequence (3 shards)"}
    assert tiled.state_dict().keys() == model.state_dict().keys()
    ids = _ids(model)
    want = _loss_and_grads(model, ids)
    counter = CountShards(tiled)
    _assert_same(_loss_and_grads(tiled, ids), want)
    # 13 tokens in shards of 5, 5, 3, in each layer: the forward, (the checkpoint's recompute,) the backward's
    assert counter.calls == [5, 5, 3] * 2 * (3 if checkpointing else 2)


def test_llama_layout_forward_gives_the_same_and_needs_its_parts(tiny_model):
    """tiled_mlp_use_original_mlp: false runs down(act(gate(x)) * up(x)) with the
    MLP's own modules; an MLP without them is refused by name."""
    model = _load(tiny_model)
    tiled = copy.deepcopy(model)
    assert tile_mlps(tiled, 2, use_original_mlp=False) == {
        "LlamaMLP x2": "tiled over the sequence (2 shards, llama MLP forward)"}
    ids = _ids(model)
    _assert_same(_loss_and_grads(tiled, ids), _loss_and_grads(model, ids))

    class FusedMLP(nn.Module):  # what a kernel plugin puts in place: no act_fn
        def __init__(self):
            super().__init__()
            self.gate_up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 4)

    class ToyDecoderLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = FusedMLP()

    with pytest.raises(ValueError, match="FusedMLP has no gate_proj, up_proj, down_proj, act_fn"):
        tile_mlps(ToyDecoderLayer(), use_original_mlp=False)


class DropoutMLP(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (nn.Linear(width, width) for _ in range(3))
        self.act_fn, self.dropout = nn.SiLU(), nn.Dropout(0.5)

    def forward(self, x):
        return self.down_proj(self.dropout(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


class ToyDecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = DropoutMLP()

    def forward(self, x):
        return x + self.mlp(x)


def test_dropout_draws_the_same_masks_in_the_recomputation():
    """The backward recomputes each shard with the random state of the forward:
    the gradients are those of the output the forward returned."""
    torch.manual_seed(0)
    layer = ToyDecoderLayer()
    x = torch.randn(2, 12, 8)
    reference = copy.deepcopy(layer)
    tile_mlps(layer, num_shards=4)

    torch.manual_seed(7)  # the reference draws shard by shard too, in the same order, with grad kept
    ref_x = x.clone().requires_grad_()
    ref_out = ref_x + torch.cat([reference.mlp(chunk) for chunk in ref_x.chunk(4, dim=-2)], dim=-2)
    (ref_out * torch.linspace(-1, 1, 8)).sum().backward()

    torch.manual_seed(7)
    tiled_x = x.clone().requires_grad_()
    out = layer(tiled_x)
    (out * torch.linspace(-1, 1, 8)).sum().backward()
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(tiled_x.grad, ref_x.grad, **TOL)
    for (name, p), ref_p in zip(layer.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, ref_p.grad, **TOL, msg=lambda m: f"{name}: {m}")


def test_weights_get_gradients_when_the_input_needs_none():
    """The MLP's parameters are inputs of the autograd Function: their gradients
    arrive even when nothing before the MLP trains (x needs no gradient)."""
    torch.manual_seed(0)
    layer = ToyDecoderLayer()
    layer.mlp.dropout.p = 0.0
    reference = copy.deepcopy(layer)
    tile_mlps(layer, num_shards=3)
    x = torch.randn(1, 9, 8)
    layer(x).square().sum().backward()
    reference(x).square().sum().backward()
    for p, ref_p in zip(layer.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, ref_p.grad, **TOL)


def test_moe_blocks_are_left_alone():
    class SparseMoeBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.experts = nn.Linear(4, 2), nn.ModuleList([nn.Linear(4, 4)])

    class MoeDecoderLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = SparseMoeBlock()

    model = nn.Sequential(MoeDecoderLayer(), ToyDecoderLayer())
    assert tile_mlps(model, 2) == {"SparseMoeBlock x1": "not tiled (a mixture-of-experts block)",
                                   "DropoutMLP x1": "tiled over the sequence (2 shards)"}
    assert type(model[0].mlp) is SparseMoeBlock


def test_shard_count():
    assert shard_count(100_000, None) == 4  # one per 32768 tokens, Axolotl's default
    assert shard_count(512, None) == 1
    assert shard_count(10, 4) == 4 and shard_count(3, 8) == 3


def test_config_keys_are_validated():
    cfg, _ = build_run_config({"base_model": "m", "tiled_mlp": True, "tiled_mlp_num_shards": 4})
    assert cfg.tiled_mlp and cfg.tiled_mlp_num_shards == 4 and cfg.tiled_mlp_use_original_mlp is True
    with pytest.raises(ConfigError, match="tiled_mlp_num_shards"):
        build_run_config({"base_model": "m", "tiled_mlp": True, "tiled_mlp_num_shards": 0})
    with pytest.raises(ConfigError, match="'tiled_mlp_num_shards': 4 sets how tiled_mlp tiles the MLP, and tiled_mlp "
                                          "is off"):
        build_run_config({"base_model": "m", "tiled_mlp_num_shards": 4})


@pytest.mark.slow
def test_a_run_with_tiled_mlp_trains_like_the_untiled_run(tiny_model, tmp_path):
    """Through the real loop (core's patch_model hook tiles the MLPs): the same
    losses step by step, and the loss goes down."""
    from datasets import Dataset

    from plait.train.loop import train

    rows = [{"input_ids": list(range(s, s + 24)), "labels": [-100] * 4 + list(range(s + 4, s + 24)),
             "attention_mask": [1] * 24, "length": 24} for s in range(10, 42, 2)]
    data = SimpleNamespace(train=Dataset.from_list(rows), eval=None)
    losses = {}
    for tiled in (False, True):
        keys = {"base_model": str(tiny_model), "output_dir": str(tmp_path / str(tiled)), "max_steps": 4,
                "micro_batch_size": 4, "learning_rate": 3e-3, "lr_scheduler": "constant", "seed": 1}
        if tiled:
            keys.update(tiled_mlp=True, tiled_mlp_num_shards=5)
        cfg, pm = build_run_config(keys)
        run = train(cfg, pm, data=data)
        losses[tiled] = [r["loss"] for r in run.metrics_log.read() if "loss" in r]
    assert len(losses[True]) == 4 and losses[True][-1] < losses[True][0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)

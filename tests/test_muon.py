"""optimizer: muon -- Muon on the weight matrices, AdamW on the embeddings and 1-D parameters."""

import sys
from pathlib import Path

import pytest
import torch

from plait.builtin.muon import MuonWithAdamW
from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model

# the loop tests' rows and runner (pytest's importlib mode does not put tests/ on sys.path)
sys.path.insert(0, str(Path(__file__).parent))
from test_train_loop import data, losses, run_train  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("muon") / "model")


def _steps(optimizer, params, grads):
    for grad in grads:
        for param, g in zip(params, grad):
            param.grad = g.clone()
        optimizer.step()


def test_each_kind_of_parameter_steps_as_torchs_muon_and_adamw():
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (8, 24), (8,)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    embedding = [torch.nn.Parameter(torch.randn(10, 8, generator=gen))]
    emb_grads = [[torch.randn(10, 8, generator=gen)] for _ in range(3)]
    settings = dict(lr=0.02, weight_decay=0.01)
    optimizer = MuonWithAdamW([{"params": ours[:2]}, {"params": ours[2:], "weight_decay": 0.0},
                               {"params": embedding, "embeddings": True}], betas=(0.9, 0.95), eps=1e-8, **settings)
    _steps(optimizer, ours + embedding, [g + e for g, e in zip(grads, emb_grads)])

    muon_ref = [torch.nn.Parameter(t.clone()) for t in start[:2]]
    _steps(torch.optim.Muon(muon_ref, adjust_lr_fn="match_rms_adamw", **settings), muon_ref, [g[:2] for g in grads])
    for got, want in zip(ours[:2], muon_ref):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-6, atol=1e-7)
    adam_ref = [torch.nn.Parameter(start[2].clone())]
    _steps(torch.optim.AdamW(adam_ref, lr=0.02, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8), adam_ref,
           [g[2:] for g in grads])
    torch.testing.assert_close(ours[2].detach(), adam_ref[0].detach(), rtol=1e-6, atol=1e-7)
    assert "exp_avg" in optimizer.state[embedding[0]]  # a 2-D embedding takes the AdamW path
    assert "momentum_buffer" in optimizer.state[ours[0]]


def test_a_run_groups_the_embeddings_apart_and_resumes_to_the_uninterrupted_runs_weights(tiny_model, tmp_path):
    keys = {"base_model": str(tiny_model), "optimizer": "muon", "learning_rate": 0.02, "weight_decay": 0.01,
            "micro_batch_size": 4, "max_steps": 6, "save_steps": 3, "warmup_steps": 0, "logging_steps": 1}
    rows = data(16, 4)
    whole = run_train({**keys, "output_dir": str(tmp_path / "whole")}, rows)
    groups = whole.optimizer.param_groups
    model = whole.model
    embedded = {id(p) for g in groups if g["embeddings"] for p in g["params"]}
    assert id(model.get_input_embeddings().weight) in embedded
    assert not any(g["embeddings"] and p.ndim == 2 and id(p) not in embedded for g in groups for p in g["params"])
    curve = losses(whole)
    assert curve[-1] < curve[0]
    resumed = run_train({**keys, "output_dir": str(tmp_path / "resumed"),
                         "resume_from_checkpoint": str(tmp_path / "whole" / "checkpoint-3")}, rows)
    assert resumed.step == 6
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_muon_takes_its_own_optim_args_only():
    with pytest.raises(ConfigError, match=r"'optim_args': \['amsgrad'\] are not settings of optimizer 'muon'"):
        build_run_config({"base_model": "m", "optimizer": "muon", "optim_args": {"amsgrad": True}})

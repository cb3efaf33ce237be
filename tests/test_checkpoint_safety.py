"""Checkpoints run no code and a damaged one falls back to the one before.

One short real run (a tiny Llama, LoRA with dropout, ``save_steps: 1``)
writes checkpoints 1 to 3; each test copies its output directory, damages it
the way a crash, a full disk or a planted file would, and resumes through the
real loader.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model

KEYS = {"adapter": "lora", "lora_target_linear": True, "lora_dropout": 0.2, "learning_rate": 1e-2,
        "micro_batch_size": 4, "max_steps": 3, "save_steps": 1}


def rows(n: int = 12):
    from datasets import Dataset

    data = []
    for i in range(n):
        ids = list(range(10 + i, 22 + i))
        data.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:], "attention_mask": [1] * len(ids),
                     "length": len(ids)})
    return SimpleNamespace(train=Dataset.from_list(data), eval=None)


def run_train(keys: dict):
    from plait.train.loop import train

    cfg, pm = build_run_config(keys)
    return train(cfg, pm, data=rows())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = make_tiny_model(root / "model")
    keys = {**KEYS, "base_model": str(model), "output_dir": str(root / "run")}
    run_train(keys)
    assert sorted(p.name for p in (root / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2",
                                                                          "checkpoint-3"]
    return root, keys


@pytest.fixture
def copy(trained, tmp_path):
    root, keys = trained
    out = tmp_path / "run"
    shutil.copytree(root / "run", out)
    return out, {**keys, "output_dir": str(out)}


def test_a_checkpoint_holds_no_pickle_and_lists_every_file_in_its_manifest(trained):
    root, _ = trained
    ckpt = root / "run" / "checkpoint-3"
    files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pt", ".pkl", ".bin"))], files
    for name in ("optimizer", "scheduler", "rng-0"):
        assert {f"{name}.safetensors", f"{name}.json"} <= files
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert set(manifest["files"]) == files - {"manifest.json"}
    assert manifest["files"]["trainer_state.json"]["size"] == (ckpt / "trainer_state.json").stat().st_size


def test_state_io_round_trips_optimizer_and_rng_state_exactly(tmp_path):
    import random

    import numpy as np

    from plait.train.state_io import load_state, save_state

    param = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([param], lr=0.1, betas=(0.8, 0.95))
    param.grad = torch.randn(3, 2)
    opt.step()
    state = {"opt": opt.state_dict(), "python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    save_state(state, tmp_path, "s")
    back = load_state(tmp_path, "s")
    assert back["opt"]["param_groups"] == state["opt"]["param_groups"]  # betas stay a tuple, floats exact
    assert isinstance(back["opt"]["param_groups"][0]["betas"], tuple)
    assert list(back["opt"]["state"]) == [0]  # an int key stays an int
    assert all(torch.equal(back["opt"]["state"][0][k], v) for k, v in state["opt"]["state"][0].items())
    assert back["python"] == state["python"] and torch.equal(back["torch"], state["torch"])
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: what a crafted checkpoint file does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["resume_from_checkpoint", "auto_resume_from_checkpoints"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_never_runs(copy, tmp_path, how):
    out, keys = copy
    marker = tmp_path / "payload-ran"
    ckpt = out / "checkpoint-3"
    # the files an older Plait loaded with torch.load(weights_only=False)
    (ckpt / "scheduler.pt").write_bytes(pickle.dumps({"payload": Payload(marker)}))
    torch.save({"payload": Payload(marker)}, ckpt / "optimizer.pt")
    resume = {"resume_from_checkpoint": str(ckpt)} if how == "resume_from_checkpoint" else \
        {"auto_resume_from_checkpoints": True}
    with pytest.raises(ConfigError, match=r"holds optimizer.pt, scheduler.pt: pickle files, which can run code"):
        run_train({**keys, **resume})
    assert not marker.exists(), "the pickle payload ran"


def damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    # name: (what to do to checkpoint-3 of the copy, a phrase of the reason given)
    "truncated weights": (lambda c: damage_truncate(c / "trainable.safetensors"), "trainable.safetensors is"),
    "truncated optimizer": (lambda c: damage_truncate(c / "optimizer.safetensors"), "truncated"),
    "truncated scheduler": (lambda c: damage_truncate(c / "scheduler.json"), "scheduler.json is"),
    "empty trainer_state": (lambda c: (c / "trainer_state.json").write_text(""), "trainer_state.json is 0 bytes"),
    "deleted weights": (lambda c: (c / "model" / "adapter_model.safetensors").unlink(),
                        "model/adapter_model.safetensors is missing"),
    "empty rng file": (lambda c: (c / "rng-0.safetensors").write_bytes(b""), "rng-0.safetensors is 0 bytes"),
    "same size, other bytes": (lambda c: (c / "rng-0.json").write_text(
        (c / "rng-0.json").read_text().replace("1", "2", 1)), "has changed since it was saved"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(copy, case):
    from plait.train.checkpoint import resume_path

    out, keys = copy
    damage, reason = DAMAGE[case]
    damage(out / "checkpoint-3")
    cfg, _ = build_run_config({**keys, "auto_resume_from_checkpoints": True})
    said = []
    assert resume_path(cfg, say=said.append) == out / "checkpoint-2"
    assert len(said) == 1 and f"skipping {out / 'checkpoint-3'}" in said[0] and reason in said[0], said


def test_a_stray_empty_checkpoint_directory_is_skipped_and_never_pruned_in_place_of_a_good_one(copy):
    from plait.train.checkpoint import prune, resume_path

    out, keys = copy
    (out / "checkpoint-99").mkdir()
    cfg, _ = build_run_config({**keys, "auto_resume_from_checkpoints": True})
    said = []
    assert resume_path(cfg, say=said.append) == out / "checkpoint-3"
    assert "checkpoint-99: empty: not a complete Plait checkpoint" in said[0]
    prune(out, 1)  # save_total_limit: 1 keeps the newest complete checkpoint, not the stray directory
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-99"]


def test_a_damaged_resume_from_checkpoint_is_an_error_naming_the_damage_and_a_good_one(copy):
    out, keys = copy
    damage_truncate(out / "checkpoint-3" / "optimizer.safetensors")
    with pytest.raises(ConfigError, match=r"(?s)'resume_from_checkpoint': .*checkpoint-3' is not a complete Plait "
                                          r"checkpoint: optimizer.safetensors is .* bytes.*truncated.*checkpoint-2 "
                                          r"verifies: resume from it instead"):
        run_train({**keys, "resume_from_checkpoint": str(out / "checkpoint-3")})


@pytest.mark.slow
def test_a_run_whose_latest_checkpoint_is_damaged_resumes_from_the_one_before_and_finishes(trained, copy, capfd):
    """End to end: the adapter equals the uninterrupted run's (resuming from checkpoint-2 is exact)."""
    from safetensors.torch import load_file

    root, _ = trained
    out, keys = copy
    (out / "checkpoint-3" / "trainer_state.json").write_text("")
    (out / "checkpoint-99").mkdir()
    (out / ".checkpoint-4.tmp").mkdir()  # a save killed half way
    (out / "adapter_model.safetensors").unlink()
    run = run_train({**keys, "auto_resume_from_checkpoints": True})
    err = capfd.readouterr().err
    assert f"skipping {out / 'checkpoint-99'}" in err and f"skipping {out / 'checkpoint-3'}" in err
    assert f"removed {out / '.checkpoint-4.tmp'}" in err
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in err
    assert run.step == 3
    reference = load_file(str(root / "run" / "adapter_model.safetensors"))
    final = load_file(str(out / "adapter_model.safetensors"))
    assert reference.keys() == final.keys()
    assert all(torch.equal(reference[k], final[k]) for k in final), "resuming from checkpoint-2 changed the result"

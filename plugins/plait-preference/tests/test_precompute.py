"""precompute_ref_log_probs: true against the frozen-copy reference.

Full fine-tuning of a tiny Llama, 3 DPO steps and an eval: the per-step loss,
rewards and eval metrics equal the frozen-copy run's within 1e-5 relative
(the reference sums come from batches of other shapes, so float sums may
differ in the last bits), no copy of the model is made, and the stored file
sits beside the prepared dataset.
"""

from __future__ import annotations

import json

import pytest

from plait.hookspecs import hookimpl
from plait_preference.testing import pair_rows

pytestmark = pytest.mark.slow
TOL = dict(rel=1e-5, abs=1e-6)


class SeeObjective:
    def __init__(self):
        self.reference = None

    @hookimpl
    def on_train_start(self, run):
        self.reference = run.objective.reference


def run_dpo(tmp_path, tiny_model, data, name, plugins=(), **extra):
    from plait.testing import run_cli, write_config

    out = tmp_path / name
    config = write_config(tmp_path / f"{name}.yml", base_model=str(tiny_model), rl="dpo", sequence_len=256,
                          datasets=[{"path": str(data), "type": "chat_template.default",
                                     "field_messages": "conversations"}],
                          dataset_prepared_path=str(tmp_path / "prep"), micro_batch_size=4, max_steps=3,
                          val_set_size=0.25, eval_steps=3, learning_rate=1e-3, lr_scheduler="constant",
                          warmup_steps=0, logging_steps=1, output_dir=str(out), **extra)
    result = run_cli(["train", str(config)], plugins=list(plugins))
    assert result.exit_code == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, result.stderr


def test_precomputed_reference_equals_the_frozen_copy(tmp_path, tiny_model):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(pair_rows(16, seed=4)))
    frozen, _ = run_dpo(tmp_path, tiny_model, data, "frozen")
    seen = SeeObjective()
    ours, log = run_dpo(tmp_path, tiny_model, data, "precomputed", plugins=[seen], precompute_ref_log_probs=True)
    assert seen.reference == "precomputed"  # not a frozen nn.Module copy, not the adapter switched off
    stored = list((tmp_path / "prep").rglob("ref_log_probs/*.safetensors"))
    assert len(stored) == 1 and "stored in" in log
    steps = [r for r in frozen if "loss" in r]
    assert len(steps) == 3 and steps[1]["loss"] != steps[0]["loss"]
    assert len(ours) == len(frozen)
    for step, (a, b) in enumerate(zip(frozen, ours), start=1):
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith(("loss", "rewards/", "logps/", "eval_")) and isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], **TOL), f"record {step} {key}"
    assert any("eval_rewards/margins" in r for r in ours)



def test_precompute_refused_without_a_reference(tmp_path, tiny_model):
    from plait.testing import build_run_config

    from plait.config.problems import ConfigProblems
    from plait.errors import ConfigError

    with pytest.raises((ConfigError, ConfigProblems), match="precompute_ref_log_probs.*orpo has no reference"):
        build_run_config({"base_model": str(tiny_model), "rl": "orpo", "precompute_ref_log_probs": True,
                          "datasets": [{"path": "x.json", "type": "chat_template.default"}]})

"""Kill a packed ``plait train`` run mid-epoch and resume it: bit-identical;
a changed packing setting on resume is refused (plait.train.checkpoint)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from plait.testing import make_tiny_model, run_cli, write_config, write_jsonl

# reuse the unpacked resume test's helpers (pytest's importlib mode does not put tests/ on sys.path)
sys.path.insert(0, str(Path(__file__).parent))
from test_train_resume import assert_same_as_reference, plait_train, sigkill_once_written  # noqa: E402

pytestmark = pytest.mark.slow

MAX_STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from plait.quickstart import make_split

    root = tmp_path_factory.mktemp("resume_packed")
    model = make_tiny_model(root / "model", attention_dropout=0.1)
    train_rows, _ = make_split(32, 4)
    data = write_jsonl(root / "train.jsonl", train_rows)

    def config(name: str, **extra) -> Path:
        settings = dict(base_model=str(model), datasets=[{"path": str(data), "type": "alpaca"}],
                        dataset_prepared_path=str(root / "prepared"), sequence_len=128, micro_batch_size=1,
                        sample_packing=True, max_steps=MAX_STEPS, learning_rate=1e-3, warmup_steps=2,
                        save_steps=2, output_dir=str(root / name))
        settings.update(extra)
        return write_config(root / f"{name}.yml", **settings)

    result = plait_train(config("reference"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root, config


def test_packed_sigkill_then_resume_is_bit_identical(setup):
    root, config = setup
    cfg = config("killed", auto_resume_from_checkpoints=True)
    sigkill_once_written(plait_train(cfg, wait=False), root / "killed" / "checkpoint-2")
    assert (root / "killed" / "checkpoint-2" / "batch_plan.json").is_file()
    resumed = plait_train(cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert_same_as_reference(root, "killed")


def test_changed_packing_setting_on_resume_is_refused(setup):
    root, config = setup
    checkpoint = root / "reference" / "checkpoint-2"
    # in this process: a refusal needs no new interpreter (the test above runs real ones)
    result = run_cli(["train", str(config("changed", sequence_len=256)), f"resume_from_checkpoint={checkpoint}"])
    assert result.exit_code != 0
    assert "would not continue the same epoch" in result.stderr
    assert "sequence_len: 128 -> 256" in result.stderr


def test_the_plan_identity_is_the_same_on_every_data_parallel_rank(tmp_path):
    """Rank 0 writes batch_plan.json for all ranks: its identity must not depend
    on the rank reading it, and a change in the number of data-parallel ranks
    mid-epoch is refused by name (at an epoch boundary it is fine)."""
    import json
    from types import SimpleNamespace

    from plait.errors import TrainingError
    from plait.testing import build_run_config
    from plait.train.checkpoint import check_batch_plan, plan_identity

    cfg, _ = build_run_config({"base_model": "m", "sample_packing": True, "sequence_len": 64, "micro_batch_size": 2})
    lengths = [5 + (i * 37) % 50 for i in range(120)]

    def run(rank, size, step_in_epoch=3):
        return SimpleNamespace(cfg=cfg, train_lengths=lengths, epoch=0, step_in_epoch=step_in_epoch,
                               dp_rank=rank, dp_size=size)

    assert plan_identity(run(0, 2)) == plan_identity(run(1, 2))
    (tmp_path / "batch_plan.json").write_text(json.dumps(plan_identity(run(0, 2))))
    position = {"epoch": 0, "step_in_epoch": 3}
    check_batch_plan(run(1, 2), tmp_path, position)  # rank 1 accepts rank 0's file
    with pytest.raises(TrainingError, match="data-parallel ranks: 2 -> 4"):
        check_batch_plan(run(0, 4), tmp_path, position)
    check_batch_plan(run(0, 4), tmp_path, {"epoch": 1, "step_in_epoch": 0})

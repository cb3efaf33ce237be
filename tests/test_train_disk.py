"""No run is lost to a full or unwritable disk.

A full disk is injected where bytes meet the filesystem: the safetensors
writer (checkpoints) or the ``save_model`` hook (final save) writes part of
its file and raises ``OSError(ENOSPC)``, as a write on a full disk does; the
free-space query reports a nearly full disk. Everything else is the real
loop, the real checkpoint code and real files.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path

import pytest

from plait import hookimpl
from plait.errors import TrainingError
from plait.testing import make_tiny_model, run_cli, write_config, write_jsonl

# reuse the checkpoint tests' run (pytest's importlib mode does not put tests/ on sys.path)
sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint_safety import KEYS, rows, run_train  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("disk") / "model")


def full_disk_while_writing(monkeypatch, fragment: str) -> None:
    """safetensors files written under a path containing ``fragment`` get half
    their bytes, then ENOSPC."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata)
        if fragment in str(filename):
            path = Path(filename)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_a_full_disk_during_a_checkpoint_removes_its_partial_files_and_keeps_the_one_before(tiny_model, tmp_path,
                                                                                          monkeypatch):
    from plait.train.manifest import verify

    out = tmp_path / "run"
    # this run's own path: a library importing save_file while the patch is on keeps it after the test
    full_disk_while_writing(monkeypatch, str(out / ".checkpoint-2.tmp"))
    with pytest.raises(TrainingError) as caught:
        run_train({**KEYS, "base_model": str(tiny_model), "output_dir": str(out)})
    message = str(caught.value)
    assert f"could not write {out / 'checkpoint-2'}: the disk is full (" in message
    assert f"free on {out}); its partial files were removed" in message
    assert f"the last complete checkpoint, {out / 'checkpoint-1'}, is intact" in message
    assert not list(out.glob(".checkpoint-*")), "the partial save was left behind"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert verify(out / "checkpoint-1") == []


class FullDiskAtFinalSave:
    """A ``save_model`` whose write of the final model hits a full disk half way."""

    @hookimpl(tryfirst=True)
    def save_model(self, cfg, model, tokenizer, path):
        if not path.endswith(".final-save.tmp"):
            return None  # checkpoints save as usual
        (Path(path) / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_a_full_disk_at_the_final_save_leaves_the_last_checkpoint_to_resume_from(tiny_model, tmp_path):
    from plait.testing import build_run_config
    from plait.train.loop import train
    from plait.train.manifest import verify

    out = tmp_path / "run"
    keys = {**KEYS, "base_model": str(tiny_model), "output_dir": str(out)}
    cfg, pm = build_run_config(keys, plugins=[FullDiskAtFinalSave()])
    with pytest.raises(TrainingError) as caught:
        train(cfg, pm, data=rows())
    message = str(caught.value)
    assert f"could not write the final model to {out}: the disk is full" in message
    assert f"the last complete checkpoint, {out / 'checkpoint-3'}, is intact" in message
    assert "auto_resume_from_checkpoints: true" in message
    assert not (out / ".final-save.tmp").exists() and not (out / "adapter_model.safetensors").exists()
    assert verify(out / "checkpoint-3") == []

    # space freed: the rerun resumes at the last step and writes the final model, the checkpoint's weights
    resumed = run_train({**keys, "auto_resume_from_checkpoints": True})
    assert resumed.step == 3
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (out / "checkpoint-3" / "model" / "adapter_model.safetensors").read_bytes()


def test_a_disk_without_room_for_a_checkpoint_stops_the_run_before_its_first_step(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10_000))
    with pytest.raises(TrainingError, match=r"output_dir .* has 9.8 KiB free; one checkpoint of this run needs about "
                                            r"[\d.]+ KiB"):
        run_train({**KEYS, "base_model": str(tiny_model), "output_dir": str(out)})
    assert not list(out.glob("checkpoint-*")) and not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("key", ["output_dir", "dataset_prepared_path"])
@pytest.mark.parametrize("where", ["a file", "under /proc"])
def test_output_directories_that_cannot_be_written_fail_validate_and_train_before_any_model_loads(tmp_path, key,
                                                                                                  where):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    bad = str(tmp_path / "a-file") if where == "a file" else "/proc/plait-run"
    (tmp_path / "a-file").write_text("not a directory")
    keys = {"base_model": "org/not-looked-up", "datasets": [{"path": str(data), "type": "alpaca"}],
            "output_dir": str(tmp_path / "out"), key: bad}
    cfg = write_config(tmp_path / "c.yml", **keys)
    why = "is a file, not a directory" if where == "a file" else "is under /proc, a virtual filesystem"
    for command in ("config", "validate"), ("train",):
        # base_model is a hub name and there is no network: the check must come before anything loads
        result = run_cli([*command, str(cfg)])
        assert result.exit_code == 2, result.stderr
        assert f"config key {key!r}: {bad!r} {why}" in result.stderr, result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_output_dir_fails_validate(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    cfg = write_config(tmp_path / "c.yml", base_model="m", datasets=[{"path": str(data), "type": "alpaca"}],
                       output_dir=str(locked / "out"))
    result = run_cli(["config", "validate", str(cfg)])
    assert result.exit_code == 2 and f"cannot be created: {locked} is not writable" in result.stderr


def test_validate_refuses_a_full_fine_tune_whose_checkpoint_cannot_fit(tiny_model, tmp_path, monkeypatch):
    """Before any model loads: the size comes from the base model's safetensors headers."""
    from plait.train.preflight import safetensors_size

    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    keys = {"base_model": str(tiny_model), "datasets": [{"path": str(data), "type": "alpaca"}],
            "output_dir": str(tmp_path / "out")}
    weight_bytes, values = safetensors_size(Path(tiny_model))
    assert values > 100_000 and weight_bytes == 4 * values  # the tiny model is float32
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=weight_bytes))
    result = run_cli(["config", "validate", str(write_config(tmp_path / "full.yml", **keys))])
    assert result.exit_code == 2
    assert f"a checkpoint of a full fine-tune of {tiny_model} needs about" in result.stderr
    # LoRA's checkpoint is small: checked precisely once the adapter is known (the loop's room check)
    lora = {**keys, "adapter": "lora", "lora_target_linear": True}
    assert run_cli(["config", "validate", str(write_config(tmp_path / "lora.yml", **lora))]).exit_code == 0

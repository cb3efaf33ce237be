"""``use_ray: true``: Ray Train starts the processes of the run.

The validation tests run without Ray. The training test (slow, skipped where
``ray[train]`` is absent) starts two Ray Train CPU workers (gloo) with
micro_batch_size 2 each; every optimizer step then sees the four rows one
process with micro_batch_size 4 sees (the plan deals rows round robin over
ranks, the loss is divided by the global trained-token count), so each step's
logged loss and the saved weights match one process within float32 tolerance
(1e-5 relative on the losses, 1e-5 absolute on the weights: the two layouts
only reorder reductions).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plait.testing import build_run_config, make_tiny_model, run_cli, write_config, write_jsonl

HAVE_RAY = importlib.util.find_spec("ray") is not None
#: Axolotl's Ray example, in ../shared next to the repository (or next to a worktree's parent)
EXAMPLE = next((path for path in (Path(__file__).resolve().parents[n] / "shared" / "axolotl-examples" / "configs" /
                                  "examples" / "llama-3" / "lora-1b-ray.yml" for n in (2, 3)) if path.is_file()),
               Path("lora-1b-ray.yml-absent"))


def base_keys(tmp_path, **keys):
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "hi", "output": "there"}] * 4)
    return {"base_model": "some/model", "datasets": [{"path": str(data), "type": "alpaca"}],
            "output_dir": str(tmp_path / "out"), **keys}


def test_ray_keys_validate_with_axolotls_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if not HAVE_RAY:
        pytest.skip("ray is not installed: the missing-ray test covers this machine")
    cfg, _ = build_run_config(base_keys(tmp_path, use_ray=True, ray_num_workers=4,
                                        resources_per_worker={"GPU": 1, "CPU": 2}, ray_run_name="lora"))
    assert (cfg.use_ray, cfg.ray_num_workers, cfg.resources_per_worker, cfg.ray_run_name) == \
        (True, 4, {"GPU": 1.0, "CPU": 2.0}, "lora")


@pytest.mark.parametrize("keys,named", [
    ({"ray_num_workers": 2}, "'ray_num_workers' configures Ray training, and use_ray is off"),
    ({"use_ray": True, "ray_num_workers": 0}, "ray_num_workers"),
    ({"use_ray": True, "resources_per_worker": {"GPU": -1}}, "'resources_per_worker': {'GPU': -1"),
    ({"use_ray": True, "ray_num_workers": 2, "device_map": "auto"}, "'device_map' places the model within one"),
])
def test_bad_ray_values_are_refused_by_key(tmp_path, monkeypatch, keys, named):
    from plait.errors import ConfigError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError) as info:
        build_run_config(base_keys(tmp_path, **keys))
    assert named in str(info.value)


@pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed: the config is refused for that first")
def test_parallel_sizes_are_checked_against_ray_num_workers(tmp_path, monkeypatch):
    """On the driver (one process) plait-parallel's mesh must fit the workers Ray will start."""
    pytest.importorskip("plait_parallel")
    from plait.errors import ConfigError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg, _ = build_run_config(base_keys(tmp_path, use_ray=True, ray_num_workers=4, tensor_parallel_size=2))
    assert cfg.tensor_parallel_size == 2
    with pytest.raises(ConfigError) as info:
        build_run_config(base_keys(tmp_path, use_ray=True, ray_num_workers=3, tensor_parallel_size=2))
    assert "does not divide the world size 3" in str(info.value)


def test_use_ray_under_torchrun_is_refused(tmp_path, monkeypatch):
    from plait.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as info:
        build_run_config(base_keys(tmp_path, use_ray=True, ray_num_workers=2))
    assert "already one of 2 (WORLD_SIZE" in str(info.value)


def test_missing_ray_is_a_note_for_validate_and_a_refusal_for_train(tmp_path, monkeypatch):
    """Without Ray (hidden here when it is installed) validate passes with a note,
    train exits 2 naming the package before any model work."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "ray" else real_find_spec(name, *a, **k))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = write_config(tmp_path / "ray.yml", **base_keys(tmp_path, use_ray=True, ray_num_workers=2))
    validate = run_cli(["config", "validate", str(config)])
    assert validate.exit_code == 0, validate.stderr
    assert "pip install 'plait[ray]'" in validate.stdout + validate.stderr
    train = run_cli(["train", str(config)])
    assert train.exit_code == 2
    assert "config key 'use_ray': true needs Ray Train" in train.stderr


def test_axolotl_ray_example_resolves_its_ray_keys(monkeypatch):
    """Axolotl's lora-1b-ray example: no problem names a Ray key."""
    if not EXAMPLE.is_file():
        pytest.skip("the shared Axolotl examples are absent")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = run_cli(["config", "validate", str(EXAMPLE)])
    output = result.stdout + result.stderr
    about_ray = [line for line in output.splitlines() if "use_ray" in line or "ray_num_workers" in line]
    # at most the machine's note that Ray is not installed
    assert all(line.startswith("note: config key 'use_ray': true needs Ray Train") for line in about_ray), output


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster of 2 CPUs for the module (starting one takes seconds);
    its address, for a plait train that joins it through RAY_ADDRESS."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False)
    yield context.address_info["address"]
    ray.shutdown()


def losses(output_dir):
    return [r["loss"] for r in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not HAVE_RAY, reason="ray[train] is not installed (pip install 'plait[ray]')")
def test_two_ray_workers_train_as_one_process(tmp_path, ray_cluster):
    from safetensors.torch import load_file

    from plait.quickstart import make_split

    model = make_tiny_model(tmp_path / "model")
    rows, _ = make_split(16, 4)
    data = write_jsonl(tmp_path / "train.jsonl", rows)

    def config(name, **keys):
        return write_config(tmp_path / f"{name}.yml", base_model=str(model),
                            datasets=[{"path": str(data), "type": "alpaca"}],
                            dataset_prepared_path=str(tmp_path / "prepared"), sequence_len=256,
                            gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-3, bf16=False,
                            output_dir=str(tmp_path / name), **keys)

    single = run_cli(["train", str(config("single", micro_batch_size=4))])
    assert single.exit_code == 0, single.stderr[-3000:]
    env = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", RAY_ADDRESS=ray_cluster)  # this module's cluster, never a shared one
    result = subprocess.run([sys.executable, "-m", "plait.cli", "train",
                             str(config("ray", micro_batch_size=2, use_ray=True, ray_num_workers=2,
                                        ray_run_name="tiny"))],
                            capture_output=True, text=True, env=env, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "ray: training on 2 Ray Train worker(s) (CPU, gloo" in output
    assert json.loads((tmp_path / "ray" / "environment.json").read_text())["world_size"] == 2
    expected = losses(tmp_path / "single")
    assert len(expected) == 3 and losses(tmp_path / "ray") == pytest.approx(expected, rel=1e-5)
    one = load_file(str(tmp_path / "single" / "model.safetensors"))
    two = load_file(str(tmp_path / "ray" / "model.safetensors"))
    assert one.keys() == two.keys()
    for name in one:
        assert (one[name] - two[name]).abs().max().item() < 1e-5, name
    assert (tmp_path / "ray" / "ray" / "tiny").is_dir()  # Ray's run state, under output_dir/ray/<ray_run_name>


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_RAY, reason="ray[train] is not installed (pip install 'plait[ray]')")
def test_workers_a_local_cluster_cannot_hold_are_refused(monkeypatch, ray_cluster):
    """Ray Train would wait forever for resources a local cluster lacks: refused, naming the keys."""
    from plait.errors import MachineFactError
    from plait.train.ray_launch import check_cluster_room

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    check_cluster_room({"CPU": 2.0})
    with pytest.raises(MachineFactError) as info:
        check_cluster_room({"CPU": 3.0, "GPU": 2.0})
    assert "the workers need CPU 3, GPU 2 in all, and the local Ray cluster has CPU 2, GPU 0" in str(info.value)


@pytest.mark.skipif(not HAVE_RAY, reason="ray[train] is not installed (pip install 'plait[ray]')")
def test_a_workers_plait_error_is_what_plait_train_says():
    """Ray's WorkerGroupError carries each rank's exception; the lowest rank's
    Plait error (found through the causes Ray wraps it in) is raised as is, so the
    message and exit status are those of plait train without Ray."""
    from ray.train import WorkerGroupError

    from plait.errors import ConfigError
    from plait.train.ray_launch import worker_plait_error

    bad = ConfigError("config key 'base_model': cannot load the model")
    wrapped = RuntimeError("worker failed")
    wrapped.__cause__ = bad
    found = worker_plait_error(WorkerGroupError("snippet", {1: ValueError("other"), 0: wrapped}))
    assert found is bad
    assert worker_plait_error(WorkerGroupError("snippet", {0: ValueError("no plait error")})) is None
    assert worker_plait_error(ValueError("not Ray's")) is None

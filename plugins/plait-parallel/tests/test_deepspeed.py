"""``deepspeed:``: Axolotl's ZeRO files become FSDP2 keys; the rest is refused by name."""

import json

import pytest

import plait_parallel.plugin as plugin
from plait.config import build_config
from plait.errors import ConfigError
from plait.testing import plugin_manager
from plait_parallel.config import fsdp_options


def make_cfg(monkeypatch, **keys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    return build_config(plugin_manager(plugin, entry_points=False), {"base_model": "unused", **keys})


@pytest.mark.parametrize("name, reshard, offload, bf16", [
    ("deepspeed_configs/zero1.json", False, False, "auto"),
    ("deepspeed_configs/zero2.json", False, True, "auto"),  # zero2.json offloads the optimizer to the CPU
    ("deepspeed_configs/zero3.json", True, False, "auto"),
    ("deepspeed_configs/zero3_bf16.json", True, False, True),
    ("deepspeed_configs/zero3_bf16_cpuoffload_all.json", True, True, True),
    ("deepspeed_configs/zero3_bf16_cpuoffload_params.json", True, True, True),
])
def test_axolotl_zero_files_translate_by_name(monkeypatch, name, reshard, offload, bf16):
    cfg = make_cfg(monkeypatch, deepspeed=name)
    options = fsdp_options(cfg)
    assert options.enabled and options.reshard_after_forward is reshard and options.offload_params is offload
    assert cfg.bf16 == bf16
    assert any(note.startswith(f"deepspeed: {name}") and "FSDP2" in note for note in cfg.notes), cfg.notes


def test_a_json_file_translates_and_unknown_parts_are_refused_by_name(monkeypatch, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                                                      "overlap_comm": True}, "train_batch_size": "auto"}))
    options = fsdp_options(make_cfg(monkeypatch, deepspeed=str(path)))
    assert options.reshard_after_forward and options.offload_params

    bad = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}, "mystery_knob": 1},
           "optimizer": {"type": "AdamW"}, "train_micro_batch_size_per_gpu": 4}
    with pytest.raises(ConfigError) as info:
        make_cfg(monkeypatch, deepspeed=json.dumps(bad))
    message = str(info.value)
    for part in ("deepspeed 'optimizer'", "zero_optimization.mystery_knob", "offload to ['nvme']",
                 "'train_micro_batch_size_per_gpu': 4; only \"auto\" is accepted (set micro_batch_size"):
        assert part in message, (part, message)
    with pytest.raises(ConfigError, match="stage.*0.*stage 0 is plain data parallelism"):
        make_cfg(monkeypatch, deepspeed={"zero_optimization": {"stage": 0}})
    with pytest.raises(ConfigError, match="deepspeed and fsdp are both set"):
        make_cfg(monkeypatch, deepspeed="deepspeed_configs/zero3.json", fsdp=["shard_grad_op"])
    with pytest.raises(ConfigError, match="'missing.json' is not a file here"):
        make_cfg(monkeypatch, deepspeed="missing.json")

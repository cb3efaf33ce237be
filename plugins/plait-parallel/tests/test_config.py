"""Config keys of plait-parallel: accepted shapes and the errors for bad ones."""

import subprocess
import sys

import pytest

import plait_parallel.plugin as plugin
from plait.config import build_config
from plait.errors import ConfigError
from plait.testing import plugin_manager
from plait_parallel.config import fsdp_options, mesh_sizes


def make_cfg(monkeypatch, world_size=1, **keys):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    pm = plugin_manager(plugin, entry_points=False)
    return build_config(pm, {"base_model": "unused", **keys})


def test_sizes_must_multiply_to_world_size(monkeypatch):
    with pytest.raises(ConfigError) as err:
        make_cfg(monkeypatch, 2, tensor_parallel_size=2, context_parallel_size=2)
    message = str(err.value)
    assert "tensor_parallel_size=2" in message and "context_parallel_size=2" in message
    assert "world size 2" in message


def test_explicit_dp_shard_size_must_match(monkeypatch):
    with pytest.raises(ConfigError, match=r"dp_shard_size=3 .* = 3, but the world size is 4"):
        make_cfg(monkeypatch, 4, dp_shard_size=3)


def test_mesh_sizes_fill_dp_shard(monkeypatch):
    cfg = make_cfg(monkeypatch, 8, tensor_parallel_size=2, context_parallel_size=2)
    assert mesh_sizes(cfg, 8) == {"dp_replicate": 1, "dp_shard": 2, "cp": 2, "tp": 2}
    assert mesh_sizes(cfg, 4) == {"dp_replicate": 1, "dp_shard": 1, "cp": 2, "tp": 2}


def test_world_size_absent_means_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    pm = plugin_manager(plugin, entry_points=False)
    with pytest.raises(ConfigError, match="world size 1"):
        build_config(pm, {"base_model": "unused", "tensor_parallel_size": 2})


def test_fsdp_words_with_suggestion(monkeypatch):
    with pytest.raises(ConfigError, match=r"'auto_wrapp' is not accepted; did you mean 'auto_wrap'"):
        make_cfg(monkeypatch, fsdp=["full_shard", "auto_wrapp"])


def test_fsdp_config_unknown_key_with_suggestion(monkeypatch):
    with pytest.raises(ConfigError, match=r"fsdp_config.fsdp_offload_param' is not known; did you mean 'fsdp_offload_params'"):
        make_cfg(monkeypatch, fsdp=True, fsdp_config={"fsdp_offload_param": True})


def test_fsdp_config_bad_value(monkeypatch):
    with pytest.raises(ConfigError, match=r"fsdp_state_dict_type': 'LOCAL' is not accepted.*SHARDED_STATE_DICT"):
        make_cfg(monkeypatch, fsdp=True, fsdp_config={"fsdp_state_dict_type": "LOCAL"})
    with pytest.raises(ConfigError, match=r"fsdp_version': 1 is not accepted"):
        make_cfg(monkeypatch, fsdp_version=1)
    # the final model's form: always whole (Hugging Face format), under either of Axolotl's spellings
    with pytest.raises(ConfigError, match=r"'fsdp_final_state_dict_type': 'SHARDED_STATE_DICT' is not accepted; "
                                          r"accepted: FULL_STATE_DICT"):
        make_cfg(monkeypatch, fsdp=True, fsdp_final_state_dict_type="SHARDED_STATE_DICT")
    with pytest.raises(ConfigError, match=r"fsdp_final_state_dict_type': 'SHARDED_STATE_DICT' is not accepted; "
                                          r"accepted: \['FULL_STATE_DICT'\]"):
        make_cfg(monkeypatch, fsdp=True, fsdp_config={"fsdp_final_state_dict_type": "SHARDED_STATE_DICT"})
    assert make_cfg(monkeypatch, fsdp=True, fsdp_final_state_dict_type="full_state_dict",
                    fsdp_config={"final_state_dict_type": "FULL_STATE_DICT"}).fsdp_version is None


def test_axolotl_fsdp_config_is_normalised(monkeypatch):
    cfg = make_cfg(monkeypatch, fsdp="shard_grad_op auto_wrap offload", fsdp_config={
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "activation_checkpointing": True,  # newer Axolotl drops the prefix
        "fsdp_state_dict_type": "sharded_state_dict",
    })
    options = fsdp_options(cfg)
    assert options.enabled and not options.reshard_after_forward and options.offload_params
    assert options.layer_cls == "LlamaDecoderLayer" and options.activation_checkpointing
    assert options.state_dict_type == "SHARDED_STATE_DICT"


def test_axolotls_older_context_parallel_names(monkeypatch):
    # Axolotl maps sequence_parallel_degree to context_parallel_size itself; ring_attn_func names the ring kernel
    cfg = make_cfg(monkeypatch, 2, sequence_parallel_degree=2, ring_attn_func="batch_zigzag")
    assert (cfg.context_parallel_size, cfg.ring_attn) == (2, "batch_zigzag")
    with pytest.raises(ConfigError, match="sequence_parallel_degree .Axolotl's name of context_parallel_size. and "
                                          "context_parallel_size are both set, to 2 and 4"):
        make_cfg(monkeypatch, 4, sequence_parallel_degree=2, context_parallel_size=4)
    with pytest.raises(ConfigError, match="ring_attn': 'batch_stripe' is not accepted"):
        make_cfg(monkeypatch, 2, context_parallel_size=2, ring_attn_func="batch_stripe")


def test_ring_attn_values(monkeypatch):
    with pytest.raises(ConfigError, match=r"ring_attn': 'zigzagg' is not accepted; did you mean 'zigzag'"):
        make_cfg(monkeypatch, ring_attn="zigzagg")
    with pytest.raises(ConfigError, match="ring_attn: false"):
        make_cfg(monkeypatch, 2, context_parallel_size=2, ring_attn=False)
    with pytest.raises(ConfigError, match="flash_attention"):
        make_cfg(monkeypatch, 2, context_parallel_size=2, flash_attention=True)


def test_hybrid_shard_needs_replicas(monkeypatch):
    with pytest.raises(ConfigError, match="dp_replicate_size"):
        make_cfg(monkeypatch, 2, fsdp=["hybrid_shard"])
    make_cfg(monkeypatch, 4, fsdp=["hybrid_shard"], dp_replicate_size=2)


def test_tensor_parallel_must_divide_heads():
    from transformers import LlamaConfig, LlamaForCausalLM

    from plait_parallel.tensor_parallel import check_divisible

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    check_divisible(model, 2)
    with pytest.raises(ConfigError, match=r"'tensor_parallel_size': 3 does not divide .*num_attention_heads = 4"):
        check_divisible(model, 3)
    with pytest.raises(ConfigError, match=r"num_key_value_heads = 2"):
        check_divisible(model, 4)


def test_single_process_wrap_is_identity(monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(monkeypatch, fsdp=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert cfg.plugin_manager.hook.wrap_parallel(cfg=cfg, model=model, mesh=None) is model


def test_entry_point_loads_without_torch():
    code = ("import sys, plait_parallel.plugin as p; p.config_schema(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_mesh_size_errors_name_where_the_world_size_came_from(monkeypatch):
    # on a Ray driver the processes are ray_num_workers, not WORLD_SIZE: the message names that key
    # (the config is built without use_ray, which needs ray installed, then given the Ray keys)
    from plait_parallel.config import validate

    cfg = make_cfg(monkeypatch, 1)
    monkeypatch.delenv("WORLD_SIZE")
    ray_cfg = cfg.model_copy(update={"use_ray": True, "ray_num_workers": 3, "tensor_parallel_size": 2})
    with pytest.raises(ConfigError, match=r"does not divide the world size 3 \(ray_num_workers\)"):
        validate(ray_cfg)
    fixed = cfg.model_copy(update={"use_ray": True, "ray_num_workers": 4, "tensor_parallel_size": 2,
                                   "dp_shard_size": 3})
    with pytest.raises(ConfigError, match=r"= 6, but the world size is 4 \(ray_num_workers\)"):
        validate(fixed)
    # under torchrun (WORLD_SIZE set) the same keys are checked against WORLD_SIZE, use_ray or not
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"world size 3 \(WORLD_SIZE\)"):
        validate(cfg.model_copy(update={"tensor_parallel_size": 2}))

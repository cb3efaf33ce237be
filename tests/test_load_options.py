"""Axolotl's keys about how the base model is loaded: a transformers
quantization config (model_quantization_config), a GPTQ base (gptq),
placement (device_map / max_memory), hub attention kernels
(attn_implementation: kernels-community/...) and the old flash_optimum /
max_packed_sequence_len / gptq_* keys.

The MXFP4 test writes a real pre-quantized checkpoint (gpt-oss's layout: FP4
nibbles in ``*_blocks``, power-of-two exponents in ``*_scales``), decodes it
independently here, and checks that loading with Mxfp4Config(dequantize=True)
gives exactly those weights (every MXFP4 value is exact in float32).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model, run_cli, write_config, write_jsonl

#: MXFP4's E2M1 values by nibble (the OCP microscaling spec's table)
FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def rows(n: int = 8):
    from datasets import Dataset

    data = []
    for i in range(n):
        ids = list(range(10 + i, 22 + i))
        data.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:], "attention_mask": [1] * len(ids),
                     "length": len(ids)})
    return SimpleNamespace(train=Dataset.from_list(data), eval=None)


def train_steps(keys: dict, steps: int = 2):
    from plait.train.loop import train

    cfg, pm = build_run_config({"learning_rate": 1e-2, "micro_batch_size": 4, "max_steps": steps, "bf16": False,
                                **keys})
    return cfg, train(cfg, pm, data=rows())


def losses(run) -> list[float]:
    lines = (Path(run.output_dir) / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record and "eval_loss" not in record]


# ----------------------------------------------------------------- model_quantization_config


def encode_mxfp4(generator, experts: int, rows_: int, columns: int):
    """Random MXFP4 blocks ``[E, rows, columns/32, 16]`` and scales ``[E, rows, columns/32]``
    and their float value ``[E, rows, columns]``, decoded here: byte j of a
    group holds element 2j in its low nibble and 2j+1 in its high one."""
    groups = columns // 32
    nibbles = torch.randint(0, 16, (experts, rows_, groups, 32), generator=generator, dtype=torch.uint8)
    exponents = torch.randint(-4, 0, (experts, rows_, groups), generator=generator)
    blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    values = torch.tensor(FP4)[nibbles.long()] * (2.0 ** exponents)[..., None]
    return blocks, (exponents + 127).to(torch.uint8), values.reshape(experts, rows_, columns)


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    """A tiny gpt-oss whose expert weights are stored as MXFP4, as openai/gpt-oss-20b is;
    returns the directory and each expert weight as the model holds it ([E, in, out])."""
    from safetensors.torch import load_file, save_file

    path = make_tiny_model(tmp_path_factory.mktemp("mxfp4") / "model", family="gpt_oss", num_local_experts=4,
                           num_experts_per_tok=2, head_dim=16, hidden_size=64, intermediate_size=64)
    config = json.loads((path / "config.json").read_text())
    hidden, inter, experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    tensors = load_file(path / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    expected = {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        out_features, in_features = (2 * inter, hidden) if name.endswith("gate_up_proj") else (hidden, inter)
        blocks, scales, values = encode_mxfp4(generator, experts, out_features, in_features)
        del tensors[name]
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        expected[name] = values.transpose(1, 2)  # the model multiplies x @ W[e]: [in, out]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config["quantization_config"] = {"quant_method": "mxfp4",
                                     "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config))
    return path, expected


@pytest.mark.slow  # ~12 s: gpt-oss and the quantizers imported, a load and two steps
def test_mxfp4_checkpoint_loads_dequantized_exactly_and_trains(mxfp4_checkpoint, tmp_path):
    from transformers import Mxfp4Config

    from plait.model.loading import pretrained_kwargs

    path, expected = mxfp4_checkpoint
    keys = {"base_model": str(path), "model_quantization_config": "Mxfp4Config",
            "model_quantization_config_kwargs": {"dequantize": True}, "output_dir": str(tmp_path / "out")}
    cfg, pm = build_run_config(keys)
    passed = pretrained_kwargs(cfg)["quantization_config"]
    assert isinstance(passed, Mxfp4Config) and passed.dequantize is True
    model = pm.hook.load_model(cfg=cfg, tokenizer=None)
    state = model.state_dict()
    for name, values in expected.items():
        assert state[name].dtype == torch.float32
        torch.testing.assert_close(state[name], values, rtol=0, atol=0)
    # the dequantized experts are ordinary float weights: a full fine-tune updates them
    _, run = train_steps(keys, steps=2)
    trained = run.model.state_dict()
    assert all(torch.isfinite(torch.tensor(losses(run))))
    assert any(not torch.equal(trained[name], values) for name, values in expected.items())


def test_model_quantization_config_names_the_accepted_classes():
    with pytest.raises(ConfigError, match=r"'model_quantization_config': 'Mxfp4' is not a transformers quantization "
                                          r"config class; did you mean 'Mxfp4Config'\?; accepted: .*BitsAndBytesConfig, "
                                          r".*FineGrainedFP8Config, .*GPTQConfig, .*Mxfp4Config"):
        build_run_config({"base_model": "m", "model_quantization_config": "Mxfp4"})
    with pytest.raises(ConfigError, match=r"'model_quantization_config_kwargs': .* is not accepted by "
                                          r"BitsAndBytesConfig: .*load_in_4bit and load_in_8bit"):
        build_run_config({"base_model": "m", "model_quantization_config": "BitsAndBytesConfig",
                          "model_quantization_config_kwargs": {"load_in_4bit": True, "load_in_8bit": True}})
    with pytest.raises(ConfigError, match="'model_quantization_config_kwargs' is set without model_quantization"):
        build_run_config({"base_model": "m", "model_quantization_config_kwargs": {"dequantize": True}})


def test_model_quantization_config_excludes_load_in_4bit():
    with pytest.raises(ConfigError, match="config keys 'model_quantization_config' and 'load_in_4bit' each choose how "
                                          "the base model is quantized; keep one"):
        build_run_config({"base_model": "m", "model_quantization_config": "Mxfp4Config", "adapter": "qlora",
                          "load_in_4bit": True})


# ----------------------------------------------------------------- gptq


def gptq_checkpoint(tmp_path, **settings) -> Path:
    """A tiny checkpoint whose config.json declares GPTQ quantization (what
    transformers' GPTQ integration reads; its packed weights need gptqmodel)."""
    path = make_tiny_model(tmp_path / "gptq")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                     "sym": True, **settings}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_gptq_passes_the_checkpoints_gptq_config_with_a_trainable_backend(tmp_path):
    from transformers import GPTQConfig

    from plait.model.load_options import gptq_config
    from plait.model.loading import pretrained_kwargs

    path = gptq_checkpoint(tmp_path)
    cfg, _ = build_run_config({"base_model": str(path)})
    cfg.gptq, cfg.gptq_disable_exllama = True, True  # past validation, which needs optimum and gptqmodel
    passed = pretrained_kwargs(cfg)["quantization_config"]
    assert isinstance(passed, GPTQConfig)
    assert (passed.bits, passed.group_size, passed.backend) == (4, 32, "auto_trainable")
    cfg.gptq_disable_exllama = False  # the checkpoint's backend (unset: gptqmodel's auto)
    assert gptq_config(cfg).backend == "auto"
    # a backend the checkpoint names wins
    cfg.base_model = str(gptq_checkpoint(tmp_path / "named", backend="torch"))
    cfg.gptq_disable_exllama = True
    assert gptq_config(cfg).backend == "torch"


def test_gptq_refusals(tmp_path):
    plain = make_tiny_model(tmp_path / "plain")
    with pytest.raises(ConfigError, match=r"'gptq': true, but .* is not a GPTQ checkpoint \(its config.json has no "
                                          r"quantization_config\)"):
        build_run_config({"base_model": str(plain), "gptq": True})
    with pytest.raises(ConfigError, match="'gptq_disable_exllama' chooses the kernels of a GPTQ base, and gptq is off"):
        build_run_config({"base_model": "m", "gptq_disable_exllama": True})
    with pytest.raises(ConfigError, match="config keys 'gptq' and 'load_in_8bit' each choose"):
        build_run_config({"base_model": "m", "gptq": True, "adapter": "lora", "load_in_8bit": True})


def test_gptq_without_its_packages_is_a_note_for_validate_and_refused_by_train(tmp_path):
    import importlib.util

    if importlib.util.find_spec("optimum") and importlib.util.find_spec("gptqmodel"):
        pytest.skip("a fact of machines without optimum / gptqmodel")
    path = gptq_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "a", "output": "b"}])
    config = write_config(tmp_path / "c.yml", base_model=str(path), gptq=True, gptq_disable_exllama=True,
                          adapter="lora", lora_target_linear=True, datasets=[{"path": str(data), "type": "alpaca"}],
                          output_dir=str(tmp_path / "out"))
    result = run_cli(["config", "validate", str(config)])
    assert result.exit_code == 0 and "note: config key 'gptq': GPTQConfig cannot load on this machine" in result.stdout
    with pytest.raises(ConfigError, match="requires (optimum|gptqmodel)"):
        build_run_config({"base_model": str(path), "gptq": True, "adapter": "lora", "lora_target_linear": True})


# ----------------------------------------------------------------- device_map / max_memory


@pytest.mark.parametrize("placement", [{"device_map": {"": "cpu"}}, {"max_memory": {"cpu": "2GiB"}}])
def test_device_map_places_the_model_and_trains(tmp_path, placement):
    from plait.model.loading import pretrained_kwargs

    model = make_tiny_model(tmp_path / "model")
    cfg, run = train_steps({"base_model": str(model), "output_dir": str(tmp_path / "out"), **placement})
    kwargs = pretrained_kwargs(cfg)
    assert kwargs["device_map"] == placement.get("device_map", "auto")
    assert kwargs.get("max_memory") == placement.get("max_memory")
    assert run.input_device == torch.device("cpu")  # batches go to the embeddings' device
    assert len(losses(run)) == 2 and all(loss == loss for loss in losses(run))


def test_gpu_memory_limit_is_max_memory_for_every_gpu(tmp_path):
    """Axolotl's gpu_memory_limit: the same limit for each GPU, the rest in host memory, placed as auto."""
    from plait.model.loading import pretrained_kwargs

    cfg, _ = build_run_config({"base_model": "m", "gpu_memory_limit": 20})
    gpus = {index: "20GiB" for index in range(torch.cuda.device_count())}  # none on CI: the host entry alone
    assert pretrained_kwargs(cfg)["max_memory"] == {**gpus, "cpu": "256GiB"}
    model = make_tiny_model(tmp_path / "model")
    cfg, run = train_steps({"base_model": str(model), "output_dir": str(tmp_path / "out"), "gpu_memory_limit": "1GiB"})
    kwargs = pretrained_kwargs(cfg)
    assert kwargs["device_map"] == "auto" and kwargs["max_memory"]["cpu"] == "256GiB"
    assert len(losses(run)) == 2 and all(loss == loss for loss in losses(run))
    with pytest.raises(ConfigError, match="'gpu_memory_limit' and 'max_memory' both set the memory per device"):
        build_run_config({"base_model": "m", "gpu_memory_limit": 20, "max_memory": {0: "10GiB"}})


def test_device_map_refusals(monkeypatch):
    with pytest.raises(ConfigError, match="'device_map' places the model within one process, and fsdp_config, "
                                          "fsdp_version shard it over processes; remove device_map"):
        build_run_config({"base_model": "m", "device_map": "auto", "fsdp_version": 2,
                          "fsdp_config": {"reshard_after_forward": True}})
    with pytest.raises(ConfigError, match=r"'device_map': 'gpu' is neither a placement strategy nor a device; "
                                          r"accepted: auto, balanced, balanced_low_0, sequential"):
        build_run_config({"base_model": "m", "device_map": "gpu"})
    with pytest.raises(ConfigError, match="'max_memory' and 'device_map' \\(a map\\) are both set"):
        build_run_config({"base_model": "m", "device_map": {"": 0}, "max_memory": {0: "10GiB"}})
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"config keys 'device_map' and 'max_memory' split the model over one "
                                          r"process's devices .* runs 2 processes \(WORLD_SIZE\)"):
        build_run_config({"base_model": "m", "device_map": "auto", "max_memory": {"cpu": "1GiB"}})


# ----------------------------------------------------------------- hub attention kernels


def test_a_hub_attention_kernel_is_accepted_with_its_machine_facts(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "a", "output": "b"}])
    config = write_config(tmp_path / "c.yml", base_model="m", attn_implementation="kernels-community/vllm-flash-attn3",
                          sample_packing=True, datasets=[{"path": str(data), "type": "alpaca"}],
                          output_dir=str(tmp_path / "out"))
    result = run_cli(["config", "validate", str(config)])
    assert result.exit_code == 0, result.stderr
    if not torch.cuda.is_available():
        assert "note: config key 'attn_implementation': the hub kernel 'kernels-community/vllm-flash-attn3'" in \
            result.stdout
        with pytest.raises(ConfigError, match="runs on a GPU"):
            build_run_config({"base_model": "m", "attn_implementation": "kernels-community/vllm-flash-attn3"})
    with pytest.raises(ConfigError, match="is the hub kernel 'kernels-community/flash-attn3' but flash_attention is"):
        build_run_config({"base_model": "m", "attn_implementation": "kernels-community/flash-attn3",
                          "flash_attention": True})


def test_packed_rows_reach_a_hub_flash_kernel_as_flash_attention_2s_offsets():
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from plait.data.packing import check_hub_kernel_packing, packed_attention_inputs

    hub = packed_attention_inputs([[3, 4], [5]], 8, "kernels-community/flash-attn3")
    flash = packed_attention_inputs([[3, 4], [5]], 8, "flash_attention_2")
    assert hub.keys() == flash.keys() and all(torch.equal(torch.as_tensor(hub[k]), torch.as_tensor(flash[k]))
                                              for k in hub)
    assert hub["cu_seq_lens_q"].tolist() == [0, 3, 7, 8, 13, 16]
    # what transformers registered for the name decides: its flash wrapper reads the offsets, another does not
    ALL_ATTENTION_FUNCTIONS.register("test-owner/flash-like", flash_attention_forward)
    ALL_ATTENTION_FUNCTIONS.register("test-owner/sparse", sdpa_attention_forward)
    check_hub_kernel_packing("sample_packing", "test-owner/flash-like")
    with pytest.raises(ConfigError, match="'test-owner/sparse' is not a flash-attention varlen kernel"):
        check_hub_kernel_packing("sample_packing", "test-owner/sparse")


# ----------------------------------------------------------------- old keys


def test_flash_optimum_is_sdpa_and_the_old_keys_are_classified(tmp_path):
    cfg, _ = build_run_config({"base_model": "m", "flash_optimum": True})
    assert cfg.attn_implementation == "sdpa" and cfg.sdp_attention is True
    with pytest.raises(ConfigError, match="'flash_optimum': true .* and attn_implementation: eager choose different"):
        build_run_config({"base_model": "m", "flash_optimum": True, "attn_implementation": "eager"})
    data = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "a", "output": "b"}])
    common = {"base_model": "m", "datasets": [{"path": str(data), "type": "alpaca"}], "output_dir": str(tmp_path)}
    refused = run_cli(["config", "validate", str(write_config(tmp_path / "a.yml", **common,
                                                              max_packed_sequence_len=2048))])
    assert refused.exit_code == 2 and "max_packed_sequence_len: Axolotl itself refuses it" in refused.stderr
    blank = run_cli(["config", "validate", str(write_config(tmp_path / "b.yml", **common, max_packed_sequence_len=None,
                                                            gptq_groupsize=128, gptq_model_v1=False))])
    assert blank.exit_code == 0, blank.stderr


def test_merge_lora_refuses_a_gptq_base(tmp_path):
    from plait.commands.merge_lora import merge

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    cfg, pm = build_run_config({"base_model": str(make_tiny_model(tmp_path / "model"))})
    cfg.gptq = True  # past validation, which needs optimum and gptqmodel
    with pytest.raises(ConfigError, match="'gptq': true; .* is a GPTQ checkpoint, whose packed 4-bit weights cannot"):
        merge(cfg, pm, adapter, tmp_path / "merged")


@pytest.mark.parametrize("key", ["rope_scaling", "overrides_of_model_config"])
def test_rope_scaling_is_laid_over_the_base_rotary_parameters(tmp_path, key):
    """Axolotl's rope_scaling (or model_config: {rope_scaling: ...}): linear scaling by 2 halves
    every rotary frequency, and the base's rope_theta stays (transformers 5 would drop it if the
    dict replaced the model's rope_parameters)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from plait.model.loading import pretrained_kwargs

    model_dir = make_tiny_model(tmp_path / "model")
    scaling = {"type": "linear", "factor": 2.0}
    keys = {"rope_scaling": scaling} if key == "rope_scaling" else {key: {"rope_scaling": scaling}}
    cfg, _ = build_run_config({"base_model": str(model_dir), **keys})
    kwargs = {k: v for k, v in pretrained_kwargs(cfg).items() if k in ("rope_parameters", "rope_scaling")}
    theta = AutoConfig.from_pretrained(model_dir).rope_parameters["rope_theta"]
    assert kwargs == {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": theta}}
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    scaled = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    torch.testing.assert_close(scaled.model.rotary_emb.inv_freq * 2, base.model.rotary_emb.inv_freq)


def test_rope_scaling_refusals_name_the_key():
    # refused when the config is read, before any model work
    with pytest.raises(ConfigError, match="'rope_scaling': rope type 'stretchy' is not accepted.*linear"):
        build_run_config({"base_model": "m", "rope_scaling": {"type": "stretchy", "factor": 2}})
    with pytest.raises(ConfigError, match="both set"):
        build_run_config({"base_model": "m", "rope_scaling": {"type": "linear"},
                          "overrides_of_model_config": {"rope_scaling": {"type": "yarn"}}})

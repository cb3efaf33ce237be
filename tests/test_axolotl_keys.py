"""Axolotl keys as Plait reads them: every problem in one message, blank means
unset, no-op keys named once, Axolotl integrations resolved or refused,
attn_implementation and the other keys with Axolotl's meaning."""

from __future__ import annotations

import inspect

import pytest

from plait.errors import ConfigError
from plait.testing import build_run_config, run_cli, write_config


def _cfg(**keys):
    return build_run_config({"base_model": "m", **keys})[0]


def _validate(tmp_path, **keys):
    # a real data file and output_dir, so the pre-flight passes unless a test's keys say otherwise
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    keys = {"datasets": [{"path": str(data), "type": "alpaca"}], "output_dir": str(tmp_path / "out"), **keys}
    path = write_config(tmp_path / "c.yml", base_model="m", **keys)
    return run_cli(["config", "validate", str(path)])


def test_every_problem_is_named_in_one_grouped_message(tmp_path):
    result = _validate(
        tmp_path, lerning_rate=1e-4, micro_bach_size=2,                      # two typos
        relora=True, s2_attention=True,                                      # Axolotl features Plait lacks
        plugins=["axolotl.integrations.spectrum.SpectrumPlugin", "no_such.plugin_module"],
        sequence_len="long", excess_length_strategy="chop",                  # two bad values
        datasets=[{"path": "a.jsonl", "type": "alpaca", "feild": "x", "tpye": "y"}])
    assert result.exit_code == 2
    message = result.stderr
    for expected in ["unknown keys:", "unknown config key 'lerning_rate'; did you mean 'learning_rate'?",
                     "unknown config key 'micro_bach_size'; did you mean 'micro_batch_size'?",
                     "Axolotl features Plait does not have:", "relora: ReLoRA",
                     "s2_attention:", "'plugins:' entries:", "SpectrumPlugin: Spectrum",
                     "no_such.plugin_module: no module of this name", "bad values:", "'sequence_len': 'long'",
                     "'excess_length_strategy': 'chop'", "dataset entries:", "unknown key 'feild' in datasets.0",
                     "unknown key 'tpye' in datasets.0"]:
        assert expected in message, (expected, message)
    assert message.startswith("error: 10 problems in the config:")
    assert "Traceback" not in message


@pytest.mark.parametrize("optimizer", ["came_pytorch", "dion", "q_galore_adamw8bit", "sinkgd"])
def test_the_settings_of_axolotls_own_optimizers_change_nothing_and_the_optimizers_are_refused(optimizer):
    cfg = _cfg(adam_beta3=0.9999, dion_lr=0.01)
    assert {"adam_beta3", "dion_lr"} <= set(cfg.ignored_keys)
    with pytest.raises(ConfigError, match=f"'optimizer': '{optimizer}' is one of Axolotl's own optimizers"):
        _cfg(optimizer=optimizer)


def test_a_key_near_no_known_key_is_noted_and_ignored_as_axolotl_ignores_it(tmp_path):
    """Axolotl drops keys it does not know (its examples carry a test marker, test_value); a key near a known
    one stays an error, since it is most likely a misspelling whose value would otherwise be lost."""
    cfg = _cfg(test_value=True)
    assert not hasattr(cfg, "test_value")
    assert any("config key 'test_value' is not a key of Plait or of Axolotl" in note for note in cfg.notes)
    result = _validate(tmp_path, test_value=True)
    assert result.exit_code == 0 and "'test_value' is not a key of Plait or of Axolotl" in result.stdout + result.stderr
    with pytest.raises(ConfigError, match="unknown config key 'lerning_rate'"):
        _cfg(lerning_rate=1e-4)


def test_preflight_problems_join_the_grouped_message(tmp_path):
    import importlib.util

    missing = tmp_path / "missing.jsonl"
    result = _validate(tmp_path, relora=True, attn_implementation="flash_attention_2",
                       datasets=[{"path": str(missing), "type": "alpaca"}])
    assert result.exit_code == 2
    message = result.stderr
    assert message.startswith("error: 2 problems in the config:"), message
    assert "Axolotl features Plait does not have:\n  - relora" in message
    assert f"files and directories (pre-flight):\n  - config key 'datasets.0.path': '{missing}' not found" in message
    if importlib.util.find_spec("flash_attn") is None:  # a fact of this machine: a note, not a problem
        assert "notes:" in message and "needs the flash-attn package" in message.split("notes:")[1]


def test_blank_values_mean_unset():
    cfg = _cfg(fp16=None, special_tokens=None, wandb_watch=None, wandb_log_model=None, lora_r=None,
               evals_per_epoch=0, max_grad_norm=None, gptq=False, gptq_groupsize=None, torchdistx_path=None)
    assert cfg.fp16 is False and cfg.special_tokens == {} and cfg.max_grad_norm == 1.0
    assert not cfg.evals_per_epoch and cfg.wandb_watch is None
    assert cfg.ignored_keys == []  # a blank no-op key asks for nothing, so nothing is reported
    assert cfg.source_of("lora_r") == "default"  # blank is not "given": plait-peft does not ask for an adapter


@pytest.mark.slow
def test_no_op_keys_are_accepted_and_named_once_by_train(tmp_path):
    from plait.testing import make_tiny_model, write_jsonl

    cfg = _cfg(low_cpu_mem_usage=True, ddp_find_unused_parameters=True, dataloader_num_workers=4)
    assert sorted(cfg.ignored_keys) == ["dataloader_num_workers", "ddp_find_unused_parameters", "low_cpu_mem_usage"]
    model = make_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i} " * 5} for i in range(8)])
    config = write_config(tmp_path / "t.yml", base_model=str(model), output_dir=str(tmp_path / "out"),
                          datasets=[{"path": str(data), "type": "completion"}], max_steps=1, sequence_len=32,
                          low_cpu_mem_usage=True, dataloader_num_workers=4)
    result = run_cli(["train", str(config)])
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "change nothing in Plait" in line]
    assert len(lines) == 1 and "low_cpu_mem_usage (" in lines[0] and "dataloader_num_workers (" in lines[0]


def test_renamed_keys_and_conflicts():
    cfg = _cfg(model_revision="abc123", dataset_num_proc=2, model_config={"rms_norm_eps": 1e-3})
    assert cfg.revision_of_model == "abc123" and cfg.dataset_processes == 2
    assert cfg.overrides_of_model_config == {"rms_norm_eps": 1e-3}
    with pytest.raises(ConfigError, match="model_revision .* and revision_of_model are both set"):
        _cfg(model_revision="a", revision_of_model="b")


@pytest.mark.parametrize("keys, expected", [
    ({}, "sdpa"),
    ({"attn_implementation": "flash_attention_2"}, "flash_attention_2"),
    ({"attn_implementation": "eager"}, "eager"),
    ({"attn_implementation": "flex_attention"}, "flex_attention"),
    ({"attn_implementation": "sdpa"}, "sdpa"),
    ({"flash_attention": True}, "flash_attention_2"),  # Axolotl's deprecated booleans
    ({"sdp_attention": True}, "sdpa"),
    ({"eager_attention": True}, "eager"),
    ({"attn_implementation": "flash_attention_2", "flash_attention": True}, "flash_attention_2"),
])
def test_attn_implementation_maps_onto_plaits_backends(keys, expected):
    cfg = _cfg(**keys)
    assert cfg.attn_implementation == expected
    assert cfg.attention_chosen == bool(keys)
    # the boolean and the name agree whichever was written
    flag = {"sdpa": "sdp_attention", "eager": "eager_attention", "flash_attention_2": "flash_attention",
            "flex_attention": "flex_attention"}[expected]
    assert getattr(cfg, flag) is bool(keys)


@pytest.mark.parametrize("value, message", [
    ("sage", "'sage' is not available in Plait: SageAttention"),
    ("someone/fast-attn", "is a kernel of another publisher than kernels-community"),
    ("sdpaa", "'sdpaa' is not accepted; did you mean 'sdpa'"),
])
def test_attn_implementation_refusals_name_the_key(value, message):
    with pytest.raises(ConfigError, match="config key 'attn_implementation'") as info:
        _cfg(attn_implementation=value)
    assert message in str(info.value)
    with pytest.raises(ConfigError, match="'eager' but flash_attention is true"):
        _cfg(attn_implementation="eager", flash_attention=True)


def test_exact_backends_plait_lacks_are_substituted_with_a_note(tmp_path):
    assert _cfg(attn_implementation="xformers").attn_implementation == "sdpa"
    assert _cfg(attn_implementation="flash_attention_3").attn_implementation == "flash_attention_2"
    result = _validate(tmp_path, attn_implementation="xformers")
    assert result.exit_code == 0 and "note: attn_implementation: xformers -> sdpa" in result.stdout


def test_xformers_attention_switch_is_sdpa_with_a_note(tmp_path):
    """Axolotl's boolean xformers_attention asks for the same exact attention as attn_implementation:
    xformers; together with another backend it is one choice too many."""
    assert _cfg(xformers_attention=True).attn_implementation == "sdpa"
    assert _cfg(xformers_attention=False).attn_implementation == "sdpa"  # the default: nothing asked
    result = _validate(tmp_path, xformers_attention=True)
    assert result.exit_code == 0 and "note: attn_implementation: xformers -> sdpa" in result.stdout
    with pytest.raises(ConfigError, match="xformers_attention: true and flash_attention both choose"):
        _cfg(xformers_attention=True, flash_attention=True)


def test_chunked_cross_entropy_is_accepted_as_what_plait_always_does(tmp_path):
    cfg = _cfg(chunked_cross_entropy=True, chunked_cross_entropy_num_chunks=8)
    assert sorted(cfg.ignored_keys) == ["chunked_cross_entropy", "chunked_cross_entropy_num_chunks"]
    result = _validate(tmp_path, chunked_cross_entropy=True)
    assert result.exit_code == 0, result.stderr


def test_axolotl_hints_and_launcher_keys_are_named_no_ops_and_type_of_model_is_model_type():
    keys = {"is_llama_derived_model": True, "is_mistral_derived_model": False, "gradio_title": "demo",
            "gradio_server_port": 7860, "world_size": 2, "ddp": True, "sample_packing_eff_est": 0.9,
            "pad_to_multiple_of": 8, "torch_empty_cache_steps": 10, "gc_steps": 5, "gc_collect_steps": 5,
            "dataset_keep_in_memory": True, "lr_div_factor": 10.0, "max_prompt_len": 512,
            "streaming_multipack_buffer_size": 1000, "pretrain_multipack_buffer_size": 1000,
            "adam_beta3": 0.9999, "dion_lr": 0.01, "qgalore_rank": 256, "optim_target_modules": ["attn"],
            "merge_method": "legacy", "merge_lora": True, "device": "cuda:0",
            "is_preprocess": True, "axolotl_config_path": "c.yml", "dpo_use_logits_to_keep": True,
            "dpo_use_liger_kernel": True, "total_num_tokens": 1000, "total_supervised_tokens": 500,
            "batch_flattening": "auto", "sample_packing_mp_start_method": "spawn", "lora_embedding_kernel": True}
    cfg = _cfg(**keys, type_of_model="AutoModelForCausalLM")
    assert sorted(cfg.ignored_keys) == sorted(keys)
    assert cfg.model_type == "AutoModelForCausalLM"
    with pytest.raises(ConfigError, match="type_of_model .*model_type.* both set"):
        _cfg(type_of_model="AutoModelForCausalLM", model_type="LlamaForCausalLM")


def test_dtype_switches_set_torch_dtype():
    assert _cfg(bfloat16=True).torch_dtype == "bfloat16"
    assert _cfg(float16=True).torch_dtype == "float16"
    assert _cfg(bfloat16=False).torch_dtype is None
    with pytest.raises(ConfigError, match="bfloat16: true and torch_dtype: float16 disagree"):
        _cfg(bfloat16=True, torch_dtype="float16")


def test_gemma2_falls_back_to_eager_when_sdpa_is_refused(tmp_path, caplog):
    # transformers refuses SDPA for Gemma 2 (it cannot soft-cap scores); core's loader takes the next backend
    from plait.builtin.model import load_model
    from plait.testing import make_tiny_model

    model = make_tiny_model(tmp_path / "gemma2", family="gemma2", head_dim=16, attn_logit_softcapping=50.0)
    cfg = build_run_config({"base_model": str(model)})[0]
    with caplog.at_level("WARNING", logger="plait.model"):
        loaded = load_model(cfg=cfg, tokenizer=None)
    assert cfg.attn_implementation == "eager" and loaded.config._attn_implementation == "eager"
    assert "using 'eager'" in caplog.text
    llama = make_tiny_model(tmp_path / "llama")
    cfg = build_run_config({"base_model": str(llama)})[0]
    assert load_model(cfg=cfg, tokenizer=None).config._attn_implementation == "sdpa"


def test_flash_attention_without_flash_attn_is_a_note_for_validate(tmp_path):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    result = _validate(tmp_path, attn_implementation="flash_attention_2", sample_packing=True)
    assert result.exit_code == 0, result.stderr
    assert "note: attn_implementation: flash_attention_2" in result.stdout and "flash-attn" in result.stdout
    with pytest.raises(ConfigError, match="needs the flash-attn package"):  # train refuses it
        _cfg(attn_implementation="flash_attention_2", sample_packing=True)


def test_axolotl_integrations_resolve_or_are_refused(tmp_path):
    ok = _validate(tmp_path, plugins=["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin",
                                      "axolotl.integrations.liger.LigerPlugin"],
                   cut_cross_entropy=True, liger_rms_norm=True, liger_layer_norm=True)
    assert ok.exit_code == 0, ok.stderr
    assert "CutCrossEntropyPlugin -> Plait's loss step" in ok.stdout and "LigerPlugin -> plait-kernels" in ok.stdout
    one = _validate(tmp_path, plugins="axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin")
    assert one.exit_code == 0 and "CutCrossEntropyPlugin -> " in one.stdout  # one string is one entry
    refused = _validate(tmp_path, plugins=["axolotl.integrations.kd.KDPlugin",
                                           "axolotl.integrations.grokfast.GrokfastPlugin"], grokfast_lamb=3.0)
    assert refused.exit_code == 2
    assert "KDPlugin: knowledge distillation" in refused.stderr and "GrokfastPlugin: the Grokfast" in refused.stderr
    assert "grokfast_lamb: a key of Axolotl's grokfast integration" in refused.stderr


def test_keys_of_a_disabled_plugin_are_derived_from_its_schema(tmp_path):
    # plait-kernels declares liger_layer_norm; disabled, the key names it (no hand-kept table)
    result = _validate(tmp_path, disable_plugins=["kernels"], liger_layer_norm=True, lora_r=8)
    assert result.exit_code == 2
    assert "liger_layer_norm: declared by plugin 'kernels' (plait-kernels), which is installed but not loaded" \
        in result.stderr


def test_activation_offloading_is_gradient_checkpointing_offload():
    assert _cfg(activation_offloading=True).gradient_checkpointing == "offload"
    assert _cfg(activation_offloading="legacy", gradient_checkpointing=True).gradient_checkpointing == "offload"
    assert _cfg(activation_offloading=False, gradient_checkpointing=True).gradient_checkpointing is True
    with pytest.raises(ConfigError, match="activation_offloading.*needs gradient_checkpointing"):
        _cfg(activation_offloading=True, gradient_checkpointing=False)
    with pytest.raises(ConfigError, match="'activation_offloading': 'disk' .* is not available"):
        _cfg(activation_offloading="disk")


def test_hub_model_id_is_checked_without_network():
    assert _cfg(hub_model_id="me/my-model").hub_model_id == "me/my-model"
    with pytest.raises(ConfigError, match="'hub_model_id': 'me/bad name' is not a hub repository id"):
        _cfg(hub_model_id="me/bad name")
    with pytest.raises(ConfigError, match="needs its owner"):
        _cfg(hub_model_id="model")
    with pytest.raises(ConfigError, match="'hub_strategy': 'every_save' is not accepted"):
        _cfg(hub_model_id="me/m", hub_strategy="every_save")


def test_push_output_uploads_the_run_without_checkpoints(tmp_path):
    """The hub is out of reach in tests; a recorder stands in for its API."""
    from plait.builtin.hub import push_output

    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload", kwargs))
            return "https://hub/commit/1"

        def create_branch(self, repo_id, **kwargs):
            calls.append(("branch", repo_id, kwargs))

    cfg = _cfg(hub_model_id="me/m", hub_private_repo=True)
    assert push_output(cfg, str(tmp_path), api=RecordingApi()) == "https://hub/commit/1"
    assert calls[0] == ("create", "me/m", {"private": True, "exist_ok": True})
    assert calls[1][1]["repo_id"] == "me/m" and "checkpoint-*" in calls[1][1]["ignore_patterns"]
    assert calls[1][1]["revision"] is None and len(calls) == 2  # main: no branch made
    # hub_revision (Axolotl's and transformers' key): the branch is made if missing, and the upload goes there
    calls.clear()
    push_output(_cfg(hub_model_id="me/m", hub_revision="run-7"), str(tmp_path), api=RecordingApi())
    assert calls[1] == ("branch", "me/m", {"branch": "run-7", "exist_ok": True})
    assert calls[2][0] == "upload" and calls[2][1]["revision"] == "run-7"
    # the recorder was called as huggingface_hub's own API takes its arguments
    from huggingface_hub import HfApi

    inspect.signature(HfApi.create_branch).bind(None, calls[1][1], **calls[1][2])
    inspect.signature(HfApi.upload_folder).bind(None, **calls[2][1])


def test_tracker_keys():
    """Read from the typed config (W&B and trackio themselves are not installed for tests)."""
    from plait.builtin.tracking import wandb_init_kwargs, wandb_model_uploads, wants_trackio, wants_wandb
    from plait.builtin.tracking import validate_config as tracking_checks
    from plait.config import config_class
    from plait.testing import plugin_manager

    cls = config_class(plugin_manager())

    def _cfg(**keys):  # the schema alone: validate_config would ask for the packages
        return cls.model_validate({"base_model": "m", **keys})

    cfg = _cfg(wandb_project="p", wandb_run_id="run-7", wandb_log_model="checkpoint", wandb_watch="gradients")
    kwargs = wandb_init_kwargs(cfg)
    assert kwargs["id"] == "run-7" and kwargs["name"] == "run-7" and kwargs["project"] == "p"
    assert wandb_model_uploads(cfg) == (True, True)
    assert wandb_model_uploads(_cfg(wandb_project="p", wandb_log_model="end")) == (False, True)
    assert not wants_wandb(_cfg(wandb_project="p", use_wandb=False))
    assert wants_trackio(_cfg(trackio_project_name="t")) and not wants_trackio(_cfg(trackio_project_name="t",
                                                                                  use_trackio=False))
    assert _cfg(wandb_watch=False).wandb_watch == "false"
    with pytest.raises(ConfigError, match="'wandb_watch': 'all' needs W&B on"):
        tracking_checks(_cfg(wandb_watch="all"))


def test_machine_facts_are_notes_for_validate_and_refusals_for_train(tmp_path):
    import importlib.util

    if importlib.util.find_spec("mistral_common") is not None:
        pytest.skip("mistral-common is installed here")
    result = _validate(tmp_path, tokenizer_use_mistral_common=True)
    assert result.exit_code == 0 and "note: config key 'tokenizer_use_mistral_common'" in result.stdout
    with pytest.raises(ConfigError, match="needs the mistral-common package, which is not installed here"):
        _cfg(tokenizer_use_mistral_common=True)


def test_unfrozen_parameters_rules():
    assert _cfg(unfrozen_parameters=["^lm_head.weight$"]).unfrozen_parameters == ["^lm_head.weight$"]
    with pytest.raises(ConfigError, match="row range"):
        _cfg(unfrozen_parameters=["^model.embed_tokens.weight$[:32000]"])
    with pytest.raises(ConfigError, match="not a regular expression"):
        _cfg(unfrozen_parameters=["model.(layers"])


def test_unfrozen_parameters_match_as_axolotl_does():
    # axolotl.utils.freeze.LayerNamePattern: re.match (at the start of the name), every dot not followed by +
    # literal; a dot the user escaped is literal here too (Axolotl escapes it again and matches nothing)
    import torch

    from plait.model.unfreeze import can_match_adapted_names, freeze_except

    def trained(patterns):
        model = torch.nn.Module()
        model.model = torch.nn.Module()
        model.model.layers = torch.nn.ModuleList(torch.nn.Linear(1, 1, bias=False) for _ in range(12))
        model.register_parameter("lm_headXweight", torch.nn.Parameter(torch.zeros(1)))
        model.lm_head = torch.nn.Linear(1, 1, bias=False)
        return set(freeze_except(model, patterns))

    assert trained(["model.layers.1."]) == {"model.layers.1.weight"}
    assert trained(["model.layers.1"]) == {"model.layers.1.weight", "model.layers.10.weight", "model.layers.11.weight"}
    assert trained(["lm_head.weight"]) == {"lm_head.weight"}  # the dot is literal: not lm_headXweight
    assert trained(["lm_head.+"]) == {"lm_head.weight", "lm_headXweight"}  # .+ is any text
    assert trained([r"model\.layers\.2\.weight$"]) == {"model.layers.2.weight"}
    assert trained(["model.layers.1[01].weight$"]) == {"model.layers.10.weight", "model.layers.11.weight"}
    with pytest.raises(ConfigError, match="match no parameter"):
        trained(["layers.1.weight"])  # not at the start of a name: re.search would have matched
    # under an adapter every name starts with base_model.model.: a pattern must start that way to match
    assert not can_match_adapted_names("model.layers.1.+lora_")
    assert can_match_adapted_names("base_model.model.model.layers.1.+lora_")
    assert can_match_adapted_names("[a-z_]+.model.+lora_")


def test_early_stopping_needs_evaluations():
    with pytest.raises(ConfigError, match="early_stopping_patience' watches the eval loss"):
        _cfg(early_stopping_patience=2)
    with pytest.raises(ConfigError, match="set eval_steps or evals_per_epoch"):
        _cfg(early_stopping_patience=2, val_set_size=0.1)

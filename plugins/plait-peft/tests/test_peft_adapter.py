"""plait-peft: config rules, target selection, adapter dtypes, continuing from an adapter."""

from __future__ import annotations

import pytest
import torch

from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model, run_cli

ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("peft") / "model")


def adapted(keys: dict):
    cfg, pm = build_run_config(keys)
    model = pm.hook.load_model(cfg=cfg, tokenizer=None)
    return cfg, pm.hook.load_adapter(cfg=cfg, model=model)


def adapted_modules(model) -> set[str]:
    return {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if ".lora_A." in name}


def test_lora_keys_without_adapter_are_ignored_with_a_note_and_every_weight_trains(tiny_model):
    """Axolotl's meaning (e.g. its falcon example sets lora_r with a blank adapter): a full fine-tune."""
    cfg, model = adapted({"base_model": str(tiny_model), "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True})
    assert model is None  # no adapter: core trains every weight
    assert [note for note in cfg.notes if "adapter" in note] == [
        "lora_r, lora_alpha, lora_target_linear ignored: 'adapter' is not set, so every weight trains (as in "
        "Axolotl); set adapter: lora (or qlora) to train LoRA adapters instead"]


def test_adapter_without_targets_is_an_error():
    with pytest.raises(ConfigError, match=r"'adapter': 'lora' needs targets; set lora_target_linear: true"):
        build_run_config({"base_model": "m", "adapter": "lora"})


def test_qlora_needs_a_4bit_base():
    with pytest.raises(ConfigError, match=r"'qlora' trains LoRA on a 4-bit base; set load_in_4bit: true"):
        build_run_config({"base_model": "m", "adapter": "qlora", "lora_target_linear": True})


def test_no_adapter_means_no_answer(tiny_model):
    cfg, model = adapted({"base_model": str(tiny_model)})
    assert model is None  # core then trains every weight


def test_target_linear_adapts_every_decoder_linear_but_not_the_head(tiny_model):
    _, model = adapted({"base_model": str(tiny_model), "adapter": "lora", "lora_target_linear": True, "lora_r": 4})
    assert adapted_modules(model) == ALL_LINEAR
    assert not any("lm_head" in n and "lora" in n for n, _ in model.named_parameters())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    assert lora_a.shape[0] == 4


def test_target_linear_without_model_families_falls_back_to_every_linear(tiny_model, monkeypatch):
    monkeypatch.setenv("PLAIT_DISABLE_PLUGINS", "models")
    _, model = adapted({"base_model": str(tiny_model), "adapter": "lora", "lora_target_linear": True})
    assert adapted_modules(model) == ALL_LINEAR


def test_unknown_target_module_names_the_modules_there_are(tiny_model):
    with pytest.raises(ConfigError, match=r"\['qkv_proj'\] match no module of this llama model.*q_proj"):
        adapted({"base_model": str(tiny_model), "adapter": "lora", "lora_target_modules": ["q_proj", "qkv_proj"]})


def test_dora_rslora_dropout_and_modules_to_save_reach_peft(tiny_model):
    _, model = adapted({"base_model": str(tiny_model), "adapter": "lora", "lora_target_modules": ["q_proj", "v_proj"],
                        "peft_use_dora": True, "peft_use_rslora": True, "lora_r": 4, "lora_alpha": 8,
                        "lora_dropout": 0.1, "lora_modules_to_save": ["lm_head"]})
    config = model.peft_config["default"]
    assert config.use_dora and config.use_rslora and config.lora_dropout == 0.1
    assert adapted_modules(model) == {"q_proj", "v_proj"}
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # rsLoRA: alpha / sqrt(r)
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())  # DoRA
    assert any("modules_to_save" in n and p.requires_grad for n, p in model.named_parameters())


def test_rank_and_alpha_patterns_layers_pattern_and_init_reach_peft(tiny_model):
    """Axolotl's lora_rank_pattern / lora_alpha_pattern, peft_layers_pattern with
    peft_layers_to_transform, and peft_init_lora_weights: false (B random, so the
    adapter changes the model from the start)."""
    _, model = adapted({"base_model": str(tiny_model), "adapter": "lora", "lora_target_linear": True, "lora_r": 4,
                        "lora_alpha": 8, "lora_rank_pattern": {"down_proj": 2}, "lora_alpha_pattern": {"q_proj": 2},
                        "peft_layers_to_transform": [1], "peft_layers_pattern": "layers",
                        "peft_init_lora_weights": False})
    layers = model.base_model.model.model.layers
    assert not any("lora_" in n for n, _ in layers[0].named_parameters())  # layer 0 not transformed
    down, q, v = layers[1].mlp.down_proj, layers[1].self_attn.q_proj, layers[1].self_attn.v_proj
    assert down.r["default"] == 2 and down.scaling["default"] == pytest.approx(8 / 2)
    assert q.r["default"] == 4 and q.scaling["default"] == pytest.approx(2 / 4)
    assert v.r["default"] == 4 and v.scaling["default"] == pytest.approx(8 / 4)
    assert q.lora_B["default"].weight.abs().sum() > 0  # not peft's zero start


def test_trainable_token_indices_train_those_embedding_rows_beside_the_adapter(tiny_model):
    _, model = adapted({"base_model": str(tiny_model), "adapter": "lora", "lora_target_modules": ["q_proj"],
                        "peft_trainable_token_indices": [5, 7, 9]})
    rows = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    hidden = model.config.hidden_size
    assert [tuple(p.shape) for p in rows] == [(3, hidden)]  # three rows of the input embeddings, nothing else
    assert model.peft_config["default"].trainable_token_indices == [5, 7, 9]


def test_init_lora_weights_that_rewrite_the_base_are_refused():
    with pytest.raises(ConfigError, match="peft_init_lora_weights"):
        build_run_config({"base_model": "m", "adapter": "lora", "lora_target_linear": True,
                          "peft_init_lora_weights": "pissa"})


@pytest.mark.parametrize("bf16,autocast,adapter_dtype", [(True, None, torch.float32), ("full", None, torch.bfloat16),
                                                          (True, False, torch.bfloat16), ("full", True, torch.float32)])
def test_adapter_dtype_follows_bf16(tiny_model, bf16, autocast, adapter_dtype):
    """float32 adapters under autocast, the base's dtype with bf16: full; Axolotl's
    peft_autocast_adapter_dtype, where set, decides."""
    _, model = adapted({"base_model": str(tiny_model), "adapter": "lora", "lora_target_modules": ["q_proj"],
                        "bf16": bf16, "peft_autocast_adapter_dtype": autocast})
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    assert base.dtype == torch.bfloat16 and lora_a.dtype == adapter_dtype


def test_lora_model_dir_continues_from_a_saved_adapter(tiny_model, tmp_path):
    keys = {"base_model": str(tiny_model), "adapter": "lora", "lora_target_modules": ["q_proj", "v_proj"]}
    _, first = adapted(keys)
    with torch.no_grad():
        for name, param in first.named_parameters():
            if "lora_B" in name:
                param.normal_()  # B starts at zero; make the adapter do something
    first.save_pretrained(tmp_path / "adapter")
    _, again = adapted({**keys, "lora_model_dir": str(tmp_path / "adapter")})
    ids = torch.tensor([[3, 4, 5, 6]])
    first.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, first(ids).logits)
    assert any(p.requires_grad for n, p in again.named_parameters() if "lora_" in n)  # trainable again


@pytest.mark.parametrize("tie", [True, False])
def test_ensure_weight_tying_trains_one_copy_for_tied_embeddings_and_head(tmp_path, tie):
    """peft_ensure_weight_tying (Axolotl's key for peft's ensure_weight_tying): with tied embeddings and
    embed_tokens in lora_modules_to_save, the head trains the same copy, so the saved adapter keeps the model
    tied; without it only the embeddings train and the head stays the base's."""
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from plait.testing import write_jsonl

    base = make_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    rows = write_jsonl(tmp_path / "d.jsonl", [{"text": " ".join(["one two three four five"] * 6)}] * 8)
    out = tmp_path / "out"
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({
        "base_model": str(base), "datasets": [{"path": str(rows), "type": "completion"}], "output_dir": str(out),
        "adapter": "lora", "lora_target_modules": ["q_proj"], "lora_modules_to_save": ["embed_tokens"],
        "peft_ensure_weight_tying": tie, "learning_rate": 1e-2, "micro_batch_size": 2, "max_steps": 3,
        "sequence_len": 64, "warmup_steps": 0}))
    result = run_cli(["train", str(config)])
    assert result.exit_code == 0, result.stderr
    original = AutoModelForCausalLM.from_pretrained(base)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).merge_and_unload()
    embed, head = trained.get_input_embeddings().weight, trained.get_output_embeddings().weight
    assert not torch.equal(embed, original.get_input_embeddings().weight)  # the embeddings trained
    if tie:
        assert torch.equal(head, embed)
    else:
        assert torch.equal(head, original.get_output_embeddings().weight)

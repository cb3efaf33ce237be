"""The plugin's keys through core's real config validation."""

from __future__ import annotations

import json
import logging

import pytest

from plait.errors import ConfigError

import plait_models


def _model_dir(tmp_path, model_type):
    # validate_config reads config.json only: no weights needed
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(tmp_path)


def _build(keys, *others):
    """Validate with plait-models (and ``others``) only, so rules of other
    installed plugins (peft's target checks, say) do not mask ours."""
    from plait.config import build_config
    from plait.testing import plugin_manager

    pm = plugin_manager(plait_models, *others, entry_points=False)
    return build_config(pm, keys)


def test_moe_keys_accepted_for_an_moe_model(tmp_path):
    cfg = _build({"base_model": _model_dir(tmp_path, "mixtral"), "router_aux_loss_coef": 0.02,
                  "adapter": "lora", "lora_target_experts": True})
    assert cfg.router_aux_loss_coef == 0.02 and cfg.lora_target_experts is True


@pytest.mark.parametrize("key, value", [("router_aux_loss_coef", 0.01), ("lora_target_experts", True)])
def test_moe_keys_on_a_dense_model_are_an_error(tmp_path, key, value):
    keys = {"base_model": _model_dir(tmp_path, "llama"), key: value, "adapter": "lora"}
    with pytest.raises(ConfigError, match=rf"'{key}'.*mixture-of-experts.*'llama'"):
        _build(keys)


def test_negative_coefficient_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="router_aux_loss_coef"):
        _build({"base_model": _model_dir(tmp_path, "mixtral"), "router_aux_loss_coef": -1})


def test_lora_target_experts_needs_lora(tmp_path):
    with pytest.raises(ConfigError, match="lora_target_experts.*adapter: lora or qlora"):
        _build({"base_model": _model_dir(tmp_path, "mixtral"), "lora_target_experts": True})


def test_lora_on_moe_without_experts_is_logged(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="plait.models"):
        _build({"base_model": _model_dir(tmp_path, "qwen3_moe"), "adapter": "lora"})
    assert "lora_target_experts: true" in caplog.text


def test_model_config_type_picks_the_family_for_an_unreadable_checkpoint():
    # a hub id with no local copy: the family is unknown unless model_config_type says it
    _build({"base_model": "org/some-model", "router_aux_loss_coef": 0.1})
    with pytest.raises(ConfigError, match="router_aux_loss_coef"):
        _build({"base_model": "org/some-model", "model_config_type": "qwen2", "router_aux_loss_coef": 0.1})


def test_tensor_parallel_on_a_family_without_plan_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # plait-parallel checks the sizes against the world
    parallel = pytest.importorskip("plait_parallel.plugin", reason="plait-parallel owns tensor_parallel_size")
    with pytest.raises(ConfigError, match=r"'tensor_parallel_size': 2 .*'phi3'.*accepted: 1"):
        _build({"base_model": _model_dir(tmp_path, "phi3"), "tensor_parallel_size": 2}, parallel)
    _build({"base_model": _model_dir(tmp_path, "llama"), "tensor_parallel_size": 2}, parallel)


def _tokenizer_model_dir(tmp_path, model_type, *, chat_template=None, pad=True, extra_tokens=()):
    """A local model dir: config.json plus a real saved tokenizer."""
    from transformers import AutoTokenizer

    from plait.testing import make_tiny_tokenizer

    make_tiny_tokenizer(tmp_path, vocab_size=300, chat_template=chat_template)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    if extra_tokens:
        tokenizer.add_tokens(list(extra_tokens), special_tokens=True)
    if not pad:
        tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    return _model_dir(tmp_path, model_type)


def test_family_template_filled_in_when_the_tokenizer_has_none(tmp_path):
    from plait.families import find_family

    formats = pytest.importorskip("plait_formats.plugin")  # knows the dataset types below
    model = _tokenizer_model_dir(tmp_path, "gemma2")
    chat = [{"path": "chat.jsonl", "type": "chat_template"}]
    cfg = _build({"base_model": model, "datasets": chat}, formats)
    assert cfg.chat_template_jinja == find_family(cfg.plugin_manager, "gemma2").default_chat_template
    assert cfg.source_of("chat_template_jinja") == "plugin:models"
    assert cfg.tokens == ["<start_of_turn>", "<end_of_turn>"]  # the tiny vocabulary lacks both markers
    # a run that renders no chat (alpaca here) gets no template and no new tokens: nothing to resize
    plain = _build({"base_model": model, "datasets": [{"path": "rows.jsonl", "type": "alpaca"}]}, formats)
    assert plain.chat_template_jinja is None and plain.tokens == []


def test_tokenizer_or_config_template_is_kept(tmp_path):
    from plait.testing import CHATML_TEMPLATE

    model = _tokenizer_model_dir(tmp_path, "gemma2", chat_template=CHATML_TEMPLATE)
    assert _build({"base_model": model}).chat_template_jinja is None
    assert _build({"base_model": model, "chat_template": "chatml"}).chat_template_jinja is None


def test_family_pad_token_filled_in_when_the_tokenizer_has_none(tmp_path):
    model = _tokenizer_model_dir(tmp_path, "qwen2", pad=False, extra_tokens=["<|endoftext|>"])
    cfg = _build({"base_model": model})
    assert cfg.special_tokens == {"pad_token": "<|endoftext|>"}
    assert cfg.source_of("special_tokens") == "plugin:models"
    # the user's own choice wins
    assert _build({"base_model": model, "special_tokens": {"pad_token": "<unk>"}}).special_tokens == {
        "pad_token": "<unk>"}


def test_pad_token_left_alone_when_the_tokenizer_has_a_dedicated_one(tmp_path):
    model = _tokenizer_model_dir(tmp_path, "qwen2", extra_tokens=["<|endoftext|>"])  # pads with <|pad|>
    assert _build({"base_model": model}).special_tokens == {}

"""cls_model_config: base_model's config.json read with a named transformers config class."""

import pytest

from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model


def test_the_named_config_class_decides_the_model_built(tmp_path):
    """A Llama checkpoint read as a MistralConfig (the same weight layout) loads as a Mistral model, with the
    model_config overrides applied to that config."""
    model_dir = make_tiny_model(tmp_path / "llama")
    cfg, pm = build_run_config({"base_model": str(model_dir), "cls_model_config": "MistralConfig",
                                "model_config": {"use_cache": False}})
    model = pm.hook.load_model(cfg=cfg, tokenizer=None)
    assert type(model).__name__ == "MistralForCausalLM" and model.config.use_cache is False
    plain = pm.hook.load_model(cfg=build_run_config({"base_model": str(model_dir)})[0], tokenizer=None)
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert (model.model.layers[0].self_attn.q_proj.weight == plain.model.layers[0].self_attn.q_proj.weight).all()


def test_a_name_that_is_no_config_class_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"'cls_model_config': 'Gemma3TextConfg' is not a config class.*"
                                          r"Gemma3TextConfig"):
        build_run_config({"base_model": "m", "cls_model_config": "Gemma3TextConfg"})

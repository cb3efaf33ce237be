"""Packing is refused for models that cannot isolate packed rows, whatever
``base_model`` names: the check reads a local ``config.json`` (or
``base_model_config``) at validation, and runs again on the loaded model's
``config`` right after ``load_model``, so a hub name cannot skip it.

Two kinds of model are refused: windowed attention under SDPA/eager (a
sliding window shorter than ``sequence_len``), and models that cannot take
Plait's packed inputs at all (ALiBi attention, or a forward without
``position_ids``; transformers otherwise fails deep inside with ``too many
values to unpack``).
"""

from __future__ import annotations

import pytest

from plait import hookimpl
from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model, make_tiny_tokenizer

#: a hub id with no local copy: validation can read nothing about it
HUB_NAME = "mistralai/Mistral-7B-v0.1"
UNPACKABLE = r"sample_packing: the model cannot take packed rows \(.*\).*set sample_packing: false"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub lookups for HUB_NAME (a plugin may ask AutoConfig about it): fail at once, no retries."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": make_tiny_model(root / "llama", tokenizer_dir),
        "windowed": make_tiny_model(root / "windowed", tokenizer_dir, family="mistral", sliding_window=16),
        "bloom": make_tiny_model(root / "bloom", tokenizer_dir, family="bloom"),
        "falcon": make_tiny_model(root / "falcon", tokenizer_dir, family="falcon", alibi=True),
    }


class LoadFrom:
    """A ``load_model`` plugin loading a local tiny model whatever ``base_model`` says
    (stands in for a hub download)."""

    def __init__(self, path):
        self.path = path
        self.loaded = 0
        self.steps = 0

    @hookimpl(tryfirst=True)
    def load_model(self, cfg, tokenizer):
        from transformers import AutoModelForCausalLM

        self.loaded += 1
        return AutoModelForCausalLM.from_pretrained(self.path, attn_implementation=cfg.attn_implementation)

    @hookimpl
    def on_step_end(self, run, metrics):
        self.steps += 1


def train_hub_name(path, tokenizer_dir, output_dir, **keys):
    """``plait train`` on ``base_model: HUB_NAME``, the model coming from ``path``."""
    from types import SimpleNamespace

    from datasets import Dataset

    from plait.train.loop import train

    loader = LoadFrom(path)
    cfg, pm = build_run_config({"base_model": HUB_NAME, "tokenizer_config": str(tokenizer_dir),
                                "output_dir": str(output_dir), "sequence_len": 64, "sample_packing": True,
                                "micro_batch_size": 4, "max_steps": 1, "bf16": False, **keys}, plugins=[loader])
    rows = [{"input_ids": list(range(10 + i, 20 + 2 * i)), "labels": list(range(10 + i, 20 + 2 * i))}
            for i in range(8)]
    data = SimpleNamespace(train=Dataset.from_list(rows), eval=None)
    return loader, lambda: train(cfg, pm, data=data)


def test_hub_name_with_a_sliding_window_is_refused_after_load_before_any_step(models, tokenizer_dir, tmp_path):
    loader, run = train_hub_name(models["windowed"], tokenizer_dir, tmp_path / "out")  # validation passed
    with pytest.raises(ConfigError, match=r"sample_packing with sdpa attention.*sliding_window=16 < "
                                          r"sequence_len=64.*flash_attention: true.*sample_packing: false"):
        run()
    assert loader.loaded == 1 and loader.steps == 0


@pytest.mark.parametrize("family", ["bloom", "falcon"])
def test_alibi_models_are_refused_after_load(models, tokenizer_dir, tmp_path, family):
    # eager: bloom has no SDPA path in transformers
    loader, run = train_hub_name(models[family], tokenizer_dir, tmp_path / "out", eager_attention=True)
    with pytest.raises(ConfigError, match=UNPACKABLE):
        run()
    assert loader.loaded == 1 and loader.steps == 0


def test_a_plain_llama_trains_packed_under_a_hub_name(models, tokenizer_dir, tmp_path):
    loader, run = train_hub_name(models["llama"], tokenizer_dir, tmp_path / "out")
    run()
    assert loader.steps == 1


@pytest.mark.parametrize("family", ["bloom", "falcon"])
def test_alibi_models_in_a_local_dir_are_refused_at_validation(models, family):
    with pytest.raises(ConfigError, match=UNPACKABLE):
        build_run_config({"base_model": str(models[family]), "sample_packing": True})
    build_run_config({"base_model": str(models[family])})  # fine without packing


def test_eval_packing_names_both_keys(models):
    with pytest.raises(ConfigError, match="set sample_packing: false and eval_sample_packing: false"):
        build_run_config({"base_model": str(models["bloom"]), "sample_packing": True, "eval_sample_packing": True})


def test_base_model_config_is_read_at_validation(models):
    with pytest.raises(ConfigError, match=r"sliding_window=16 < sequence_len=64"):
        build_run_config({"base_model": HUB_NAME, "base_model_config": str(models["windowed"]),
                          "tokenizer_config": str(models["windowed"]), "sample_packing": True,
                          "sequence_len": 64})


def test_a_forward_without_position_ids_is_refused(models):
    """The generic rule: no ALiBi in the config, but the forward cannot take position_ids."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from plait.data.packing import check_loaded_model

    class NoPositions(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    cfg, _ = build_run_config({"base_model": HUB_NAME, "sample_packing": True})
    check_loaded_model(cfg, AutoModelForCausalLM.from_pretrained(models["llama"]))
    with pytest.raises(ConfigError, match=r"NoPositions.forward takes no position_ids.*set sample_packing: false"):
        check_loaded_model(cfg, NoPositions.from_pretrained(models["llama"]))
    # without packing nothing is checked
    cfg, _ = build_run_config({"base_model": HUB_NAME})
    check_loaded_model(cfg, NoPositions.from_pretrained(models["llama"]))


def test_a_window_no_shorter_than_sequence_len_is_exact(models):
    from plait.data.packing import windowed_attention

    assert windowed_attention({"sliding_window": 64}, 64) is None
    assert windowed_attention({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4096},
                              2048) is None
    assert windowed_attention({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 512},
                              2048) == "sliding_window=512 < sequence_len=2048"
    assert windowed_attention({"layer_types": ["chunked_attention"]}, 64).startswith("layer_types")
    assert windowed_attention({"sliding_window": 16, "use_sliding_window": False}, 64) is None

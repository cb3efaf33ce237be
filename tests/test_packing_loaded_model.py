"""Packing is refused for models that cannot isolate packed rows, whatever
``base_model`` names: the check reads a local ``config.json`` (or
``base_model_config``) at validation, and runs again on the loaded model's
``config`` right after ``load_model``, so a hub name cannot skip it.

Refused: layers that mix tokens across rows whatever the mask (linear
attention, convolutions) in a model without recurrent modules that could run
one packed row at a time, and models that cannot take Plait's packed inputs at
all (Falcon's ALiBi folded into its mask, or a forward without ``position_ids``
and no position module to give them to; transformers otherwise fails deep
inside with ``too many values to unpack``). BLOOM, whose ALiBi comes from the
2-D padding mask, packs with the packed mask handed to its layers. A sliding or
chunked window shorter than ``sequence_len`` packs under SDPA/eager through
transformers' own masks, built from the restarting ``position_ids``.
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
        "windowed": make_tiny_model(root / "windowed", tokenizer_dir, family="mistral", sliding_window=4),
        "chunked": make_tiny_model(root / "chunked", tokenizer_dir, family="llama4_text", attention_chunk_size=4,
                                   layer_types=["chunked_attention", "full_attention"], num_experts_per_tok=1,
                                   num_local_experts=2, intermediate_size_mlp=64),
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
        self.model = AutoModelForCausalLM.from_pretrained(self.path, attn_implementation=cfg.attn_implementation)
        return self.model

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


@pytest.mark.parametrize("kind", ["windowed", "chunked"])
def test_a_window_shorter_than_the_rows_packs_through_transformers_masks(models, tokenizer_dir, tmp_path, kind):
    """Windows of 4 tokens, packed test rows of 5-7: after load, the isolation
    check (packed logits == each row alone) passes only with transformers' own
    per-row window; Plait's block-diagonal mask in its place widens the window
    inside each row, and the check sees it."""
    import torch
    from transformers import AutoModelForCausalLM

    from plait.data.packing import check_loaded_model, packed_rows_leak
    from plait.model.forward import masks_from_positions_marked

    if kind == "chunked":
        from transformers import masking_utils

        if not hasattr(masking_utils, "remap_positions_for_packed_sequence"):
            pytest.skip("this transformers counts chunks over the packed sequence (refused at validation)")
    if kind == "windowed":  # and a run trains on it end to end (one is enough for the time it takes)
        loader, run = train_hub_name(models[kind], tokenizer_dir, tmp_path / "out")
        run()
        assert loader.loaded == 1 and loader.steps == 1
    cfg, _ = build_run_config({"base_model": HUB_NAME, "sample_packing": True, "sequence_len": 64, "bf16": False})
    model = AutoModelForCausalLM.from_pretrained(models[kind], attn_implementation="sdpa", dtype=torch.float32)
    assert packed_rows_leak(cfg, model) is not None  # Plait's mask: the window is lost
    check_loaded_model(cfg, model)  # marks the model, then the same check passes
    assert masks_from_positions_marked(model) and packed_rows_leak(cfg, model) is None


def test_a_window_under_flex_attention_is_refused(models):
    from plait.data.packing import masks_from_positions

    assert masks_from_positions("sdpa", "sliding_window=4 < sequence_len=64") is None
    assert "replace the window" in masks_from_positions("flex_attention", "sliding_window=4 < sequence_len=64")


def test_layers_that_mix_across_rows_are_refused_with_their_cause():
    from plait.data.packing import crossing_layers

    assert "recurrent state" in crossing_layers({"layer_types": ["full_attention", "linear_attention"]})
    assert "short convolution" in crossing_layers({"text_config": {"layer_types": ["hybrid", "hybrid_sliding"]}})
    assert "'mystery'" in crossing_layers({"layer_types": ["mystery"]})
    big_bird = {"model_type": "big_bird", "attention_type": "block_sparse", "block_size": 64, "num_random_blocks": 3}
    assert "ignores the packed mask" in crossing_layers(big_bird)
    # BigBird attends in full up to (5 + 2 * 3) * 64 tokens, so packed rows that short keep the mask
    assert crossing_layers(big_bird, sequence_len=704) is None
    assert "longer than 704 tokens" in crossing_layers(big_bird, sequence_len=705)
    # DeepSeek sparse attention's indexer scores keys under the packed mask: exact (the sweep checks it)
    assert crossing_layers({"layer_types": ["full_attention", "indexed_attention", "sliding_attention"]}) is None


def test_falcon_alibi_is_refused_after_load(models, tokenizer_dir, tmp_path):
    loader, run = train_hub_name(models["falcon"], tokenizer_dir, tmp_path / "out", eager_attention=True)
    with pytest.raises(ConfigError, match=UNPACKABLE):
        run()
    assert loader.loaded == 1 and loader.steps == 0


def test_bloom_trains_packed_with_the_mask_at_its_layers(models, tokenizer_dir, tmp_path):
    """BLOOM builds its ALiBi bias from a 2-D padding mask, so its forward gets
    no mask and its layers get the packed one (isolation proved at load)."""
    from plait.model.forward import _LAYER_MASKS

    # eager: bloom has no SDPA path in transformers
    loader, run = train_hub_name(models["bloom"], tokenizer_dir, tmp_path / "out", eager_attention=True)
    run()
    assert loader.loaded == 1 and loader.steps == 1
    layers = getattr(loader.model, _LAYER_MASKS)
    assert layers and all(name.startswith("transformer.h.") for name in layers)
    build_run_config({"base_model": str(models["bloom"]), "sample_packing": True})  # nothing refused at validation


def test_a_plain_llama_trains_packed_under_a_hub_name(models, tokenizer_dir, tmp_path):
    loader, run = train_hub_name(models["llama"], tokenizer_dir, tmp_path / "out")
    run()
    assert loader.steps == 1


def test_falcon_alibi_in_a_local_dir_is_refused_at_validation(models):
    with pytest.raises(ConfigError, match=UNPACKABLE):
        build_run_config({"base_model": str(models["falcon"]), "sample_packing": True})
    build_run_config({"base_model": str(models["falcon"])})  # fine without packing


def test_eval_packing_names_both_keys(models):
    with pytest.raises(ConfigError, match="set sample_packing: false and eval_sample_packing: false"):
        build_run_config({"base_model": str(models["falcon"]), "sample_packing": True, "eval_sample_packing": True})


def test_base_model_config_is_read_at_validation(models):
    with pytest.raises(ConfigError, match=UNPACKABLE):
        build_run_config({"base_model": HUB_NAME, "base_model_config": str(models["falcon"]),
                          "tokenizer_config": str(models["falcon"]), "sample_packing": True,
                          "sequence_len": 64})


def test_a_forward_without_position_ids_packs_only_where_its_positions_are_relative(models, tmp_path,
                                                                                     tokenizer_dir):
    """The generic rule: no ALiBi in the config, and the forward cannot take
    position_ids. A model whose positions are only relative (Llama's rotary,
    as RoFormer's) gives each packed row's logits under the packed mask as
    they are, which the packed test batch shows: it packs. One that embeds
    absolute positions (GPT-2's learned table) is refused."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM

    from plait.data.packing import check_loaded_model, packed_rows_leak

    def without_position_ids(base):
        class NoPositions(base):
            def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
                kwargs.pop("position_ids", None)  # the model counts its own positions, as RoFormer's does
                return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        return NoPositions

    cfg, _ = build_run_config({"base_model": HUB_NAME, "sample_packing": True})
    check_loaded_model(cfg, AutoModelForCausalLM.from_pretrained(models["llama"]))
    rotary = without_position_ids(LlamaForCausalLM).from_pretrained(models["llama"])
    check_loaded_model(cfg, rotary)
    assert packed_rows_leak(cfg, rotary) is None
    gpt2 = without_position_ids(GPT2LMHeadModel).from_pretrained(
        make_tiny_model(tmp_path / "gpt2", tokenizer_dir, family="gpt2"))
    with pytest.raises(ConfigError, match=r"NoPositions.forward takes no position_ids.*set sample_packing: false"):
        check_loaded_model(cfg, gpt2)
    # without packing nothing is checked
    cfg, _ = build_run_config({"base_model": HUB_NAME})
    check_loaded_model(cfg, gpt2)


def test_a_window_no_shorter_than_sequence_len_is_exact(models):
    from plait.data.packing import windowed_attention

    assert windowed_attention({"sliding_window": 64}, 64) is None
    assert windowed_attention({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4096},
                              2048) is None
    assert windowed_attention({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 512},
                              2048) == "sliding_window=512 < sequence_len=2048"
    assert windowed_attention({"layer_types": ["chunked_attention"]}, 64).startswith("layer_types")
    assert windowed_attention({"sliding_window": 16, "use_sliding_window": False}, 64) is None

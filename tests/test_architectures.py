"""Architectures through the generic path: a sample of the sweep (``bench/architectures.py``)
and the mechanisms behind it, on tiny random models of transformers' own classes.

* the sample: LoRA on every linear layer trains, reloads in peft and merges;
  full fine-tuning trains and reloads; Plait's loss equals the loss of the
  model's own logits (rel 1e-4); packed rows give exactly the rows' losses
  run alone (rel 1e-4), or packing is refused with a message that says why;
* attention: a model that refuses SDPA loads with eager and the config says so;
* the head: the module feeding it is found by looking (OPT, BERT), and a model
  that scales its logits (Cohere) trains on its own logits;
* LoRA targets: GPT-2's ``Conv1D`` is adapted, an MoE router subclassing
  ``nn.Linear`` is not, nor a Mamba ``out_proj`` peft refuses, nor a layer whose
  saved adapter peft's load-time renaming would drop (Laguna's shared experts);
* packing: recurrent state is found by a packed test batch, and recurrent layers then run one
  packed row at a time (refused where that is not exact);
  RoBERTa's position offset is found by a probe and packed rows get it (a pad id of 0 counts too);
  BART-style decoders, whose forward takes no position_ids, get them through
  the position-embedding module a probe finds;
* BERT-style causal LMs load as decoders (causal attention).
"""

from __future__ import annotations

import pytest

from plait.errors import ConfigError


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from plait.testing import make_tiny_tokenizer

    return make_tiny_tokenizer(tmp_path_factory.mktemp("arch-tokenizer"))


def tiny(model_type, tmp_path, tokenizer_dir):
    from plait.conformance import build_tiny_model

    return build_tiny_model(model_type, tmp_path / model_type, tokenizer_dir)


def loaded(model_dir, **keys):
    """A config and the model as training builds it (``build_model``), in eval mode."""
    from plait.conformance import _keys, _run_for

    return _run_for(_keys(model_dir, model_dir.parent / "out", **keys))


#: types of the CI sample and the packing outcome each must have
SAMPLE = {
    "llama": "pass", "gpt2": "pass", "opt": "pass", "cohere": "pass", "gemma2": "pass", "bert": "pass",
    "phi": "pass", "qwen3": "pass", "qwen3_moe": "pass", "jamba": "pass",
}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(SAMPLE))
def test_sample_of_the_sweep(model_type, tmp_path, tokenizer_dir):
    from plait.conformance import check_architecture

    result = check_architecture(model_type, tmp_path, tokenizer_dir=tokenizer_dir)
    statuses = {name: result.get(name, {}).get("status") for name in ("built", "lora", "full", "logits", "packing")}
    assert statuses == {"built": "pass", "lora": "pass", "full": "pass", "logits": "pass",
                        "packing": SAMPLE[model_type]}, result
    if SAMPLE[model_type] == "refused":
        assert "sample_packing" in result["packing"]["detail"] and "false" in result["packing"]["detail"]


def test_attention_falls_back_to_one_the_model_supports(tmp_path, tokenizer_dir):
    model_dir = tiny("bloom", tmp_path, tokenizer_dir)  # BLOOM has no SDPA path in transformers
    run = loaded(model_dir)
    assert run.model.config._attn_implementation == "eager"
    assert run.cfg.attn_implementation == "eager" and run.cfg.source_of("eager_attention") == "plugin:core"


def test_attention_refusal_is_recognised_and_other_errors_are_not():
    from plait.model.choice import attention_fallbacks, is_attention_refusal

    assert attention_fallbacks("flash_attention_2") == ["flash_attention_2", "sdpa", "eager"]
    assert attention_fallbacks("sdpa") == ["sdpa", "eager"]
    assert is_attention_refusal(ValueError("X does not support an attention implementation through "
                                           "torch.nn.functional.scaled_dot_product_attention yet"))
    assert not is_attention_refusal(ValueError("vocab_size must be positive"))


@pytest.mark.parametrize("model_type, feeder, fused", [
    ("opt", "model.decoder", True),               # the decoder is called directly, not model.model
    ("bert", "cls.predictions.transform", True),  # the head transform runs before the output layer
    ("cohere", "model", False),                   # logit_scale multiplies the logits after the head
])
def test_head_plan_finds_the_module_feeding_the_head(model_type, feeder, fused, tmp_path, tokenizer_dir):
    import torch

    from plait.model.forward import head_plan
    from plait.train.loop import loss_of

    run = loaded(tiny(model_type, tmp_path, tokenizer_dir))
    plan = head_plan(run.model)
    assert (plan.feeder, plan.fused) == (feeder, fused)
    if model_type == "bert":
        assert not plan.logits_to_keep  # its head slices positions before the transform
    ids = torch.arange(10, 30).reshape(2, 10)
    batch = {"input_ids": ids, "labels": ids.clone()}
    with torch.no_grad():
        got, n = loss_of(run, batch)
        logits = run.model(input_ids=ids).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum")
    assert n == 18 and torch.allclose(got, expected, rtol=1e-5), (float(got), float(expected))


def adapted(model_type, tmp_path, tokenizer_dir):
    from plait_peft.adapter import attach_lora
    from transformers import AutoModelForCausalLM

    from plait.testing import build_run_config

    model_dir = tiny(model_type, tmp_path, tokenizer_dir)
    cfg, _ = build_run_config({"base_model": str(model_dir), "adapter": "lora", "lora_target_linear": True})
    peft_model = attach_lora(cfg, AutoModelForCausalLM.from_pretrained(model_dir))
    return {name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}


def test_generic_lora_targets_adapt_conv1d_but_not_routers_or_refused_mixers(tmp_path, tokenizer_dir):
    gpt2 = adapted("gpt2", tmp_path, tokenizer_dir)
    assert {n.rsplit(".", 1)[-1] for n in gpt2} == {"c_attn", "c_proj", "c_fc"}
    phimoe = adapted("phimoe", tmp_path, tokenizer_dir)  # PhimoeTopKRouter subclasses nn.Linear
    assert phimoe and not any("router" in n or n.endswith(".gate") for n in phimoe), sorted(phimoe)
    falcon_h1 = adapted("falcon_h1", tmp_path, tokenizer_dir)
    assert any(n.endswith("mamba.in_proj") for n in falcon_h1)
    assert not any(n.endswith("mamba.out_proj") for n in falcon_h1), sorted(falcon_h1)
    # peft's load-time renaming (transformers' laguna conversion) would drop shared_experts' saved LoRA weights
    laguna = adapted("laguna", tmp_path, tokenizer_dir)
    assert any(n.endswith("self_attn.q_proj") for n in laguna) and not any("shared_experts" in n for n in laguna)


def three_packed_bins(pad_id: int, attn_implementation):
    """Five rows of token ids and a batch (no labels) of three packed bins of
    different layouts: rows 0+1, rows 2+3, and row 4 alone (padded)."""
    from plait.data.packing import collate_packed

    rows = [list(range(10 + n, 10 + 2 * n)) for n in (5, 7, 6, 3, 9)]
    bins = [{"input_ids": rows[0] + rows[1], "labels": rows[0] + rows[1], "seq_lens": [5, 7]},
            {"input_ids": rows[2] + rows[3], "labels": rows[2] + rows[3], "seq_lens": [6, 3]},
            {"input_ids": rows[4], "labels": rows[4], "seq_lens": [9]}]
    batch = collate_packed(bins, pad_id, attn_implementation)
    del batch["labels"]
    return rows, batch


def assert_each_bin_is_its_rows_alone(model, together, rows):
    """Every bin of :func:`three_packed_bins`' logits equals its rows' logits
    with each row run alone."""
    import torch

    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([row])).logits[0] for row in rows]
    for b, expected in enumerate([torch.cat(alone[:2]), torch.cat(alone[2:4]), alone[4]]):
        torch.testing.assert_close(together[b, :len(expected)].detach(), expected, rtol=1e-4, atol=1e-5)


def test_recurrent_layers_run_one_packed_row_at_a_time(tmp_path, tokenizer_dir):
    """Jamba's Mamba state runs across packed rows; Plait runs its mixers one
    packed row at a time (right-padded, gathered back into packed order). Three
    bins of different layouts (one padded) give every row's logits as run
    alone, gradients reach the mixers, and without the route the load-time
    probe finds the leak and packing is refused."""
    from plait.data.packing import packed_rows_leak
    from plait.model.forward import _SEGMENT_MIXERS, forward_logits, segment_mixers

    run = loaded(tiny("jamba", tmp_path, tokenizer_dir), sample_packing=True)
    mixers = segment_mixers(run.model)
    assert mixers and all(type(run.model.get_submodule(n)).__name__ == "JambaMambaMixer" for n in mixers), mixers
    rows, batch = three_packed_bins(0, run.cfg.attn_implementation)
    together = forward_logits(run.model, batch).logits
    assert_each_bin_is_its_rows_alone(run.model, together, rows)
    together.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n in mixers for p in run.model.get_submodule(n).parameters() if p.requires_grad)
    setattr(run.model, _SEGMENT_MIXERS, None)
    assert "carry state along the sequence" in packed_rows_leak(run.cfg, run.model)


def test_packed_rows_for_recurrent_layers_are_found_on_the_host_copy():
    """On a GPU, finding the packed rows from the position ids reads the
    device three times a forward (nonzero, a maximum, repeat_interleave).
    ``to_device`` keeps the batch's host position ids on the moved tensor, and
    :func:`packed_segments` runs on that copy: here the "device" is ``meta``,
    which holds no values, so any read of it would fail."""
    import torch

    from plait.data.batching import to_device
    from plait.model.forward import packed_segments

    host = {"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])}
    moved = to_device(host, "meta")
    expected = packed_segments(host["position_ids"])
    got = packed_segments(moved["position_ids"])
    assert (got.batch, got.seq) == (expected.batch, expected.seq) == (2, 6)
    for name in ("bin_index", "pos_index", "real", "seg_of", "slot_of"):
        want, have = getattr(expected, name), getattr(got, name)
        assert have.device.type == "meta" and have.shape == want.shape and have.dtype == want.dtype, name
    assert expected.real.shape == (5, 4)  # five packed rows, the longest 4 tokens
    with pytest.raises((NotImplementedError, RuntimeError)):
        packed_segments(torch.zeros(2, 6, dtype=torch.long, device="meta"))  # no host copy: it must read the device


def test_roberta_loads_as_a_decoder_and_packs_with_its_position_offset(tmp_path, tokenizer_dir):
    """RobertaForCausalLM attends both ways unless ``is_decoder``; its positions
    start at ``pad_token_id + 1``. Packed rows restarting at 0 would leak (the
    probe finds a difference without the offset)."""
    import torch

    from plait.data.packing import packed_rows_leak
    from plait.model.forward import _POSITION_OFFSET

    run = loaded(tiny("roberta", tmp_path, tokenizer_dir), sample_packing=True)
    assert run.model.config.is_decoder
    ids = torch.tensor([[9, 10, 11, 12, 13, 14]])
    changed = ids.clone()
    changed[0, -1] = 20
    with torch.no_grad():  # causal: the last token changes nothing before it
        torch.testing.assert_close(run.model(input_ids=ids).logits[0, :-1], run.model(input_ids=changed).logits[0, :-1])
    assert getattr(run.model, _POSITION_OFFSET) == run.model.config.pad_token_id + 1
    assert packed_rows_leak(run.cfg, run.model) is None
    setattr(run.model, _POSITION_OFFSET, 0)
    assert "do not restart per row" in packed_rows_leak(run.cfg, run.model)


def test_a_pad_id_of_0_is_a_padding_idx_to_both_position_probes():
    """A RoBERTa-style model with ``pad_token_id`` 0 numbers its tokens from 1.
    Both probes try ``pad_token_id + 1`` for it: the position_ids one on a
    real RobertaForCausalLM, and the position-module one on a minimal decoder
    whose forward takes no position_ids and hands the module positions counted
    from the pad id + 1, as XGLM's and RoBERTa's embeddings count them (no
    transformers class of the BART family does with pad 0 today; the module
    probe once skipped a pad id of 0 and found no module)."""
    from types import SimpleNamespace

    import torch
    from transformers import RobertaConfig, RobertaForCausalLM

    from plait.model.forward import PositionModule, record_position_module, record_position_offset

    class PositionEmbedding(torch.nn.Embedding):
        def forward(self, position_ids):  # the argument name the probe looks for
            return super().forward(position_ids)

    class CountsFromPad(torch.nn.Module):
        def __init__(self, pad):
            super().__init__()
            self.config = SimpleNamespace(pad_token_id=pad)
            self.embed, self.positions = torch.nn.Embedding(32, 8), PositionEmbedding(16, 8)
            self.head = torch.nn.Linear(8, 32)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids, use_cache=None):
            own = torch.arange(input_ids.shape[1]) + self.config.pad_token_id + 1
            return SimpleNamespace(logits=self.head(self.embed(input_ids) + self.positions(own.expand_as(input_ids))))

    for pad in (0, 1):
        torch.manual_seed(0)
        roberta = RobertaForCausalLM(RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=64, is_decoder=True,
                                                   max_position_embeddings=40, pad_token_id=pad))
        assert record_position_offset(roberta) == pad + 1
        assert record_position_module(CountsFromPad(pad)) == PositionModule("positions", pad + 1, per_row=False)


def test_bart_packs_through_its_position_embedding_module(tmp_path, tokenizer_dir):
    """BartForCausalLM.forward takes no position_ids; its decoder hands a shared
    ``arange`` to ``embed_positions``, which the probe finds and Plait runs once
    per packed bin with that bin's restarting positions. Three bins of different
    layouts (one padded) give every row's logits as run alone; without the hook
    the rows' positions run on across the bin and packing is refused."""
    import torch

    from plait.data.packing import packed_rows_leak
    from plait.model.forward import _POSITION_MODULE, PositionModule, forward_logits

    run = loaded(tiny("bart", tmp_path, tokenizer_dir), sample_packing=True)
    assert getattr(run.model, _POSITION_MODULE) == PositionModule("model.decoder.embed_positions", 0, per_row=True)
    rows, batch = three_packed_bins(2, run.cfg.attn_implementation)
    with torch.no_grad():
        together = forward_logits(run.model, batch).logits
    assert_each_bin_is_its_rows_alone(run.model, together, rows)
    setattr(run.model, _POSITION_MODULE, None)
    assert "do not restart per row" in packed_rows_leak(run.cfg, run.model)


def test_packing_probe_passes_an_isolating_model(tmp_path, tokenizer_dir):
    from plait.data.packing import packed_rows_leak

    run = loaded(tiny("llama", tmp_path, tokenizer_dir), sample_packing=True)
    assert packed_rows_leak(run.cfg, run.model) is None


def test_tiny_config_shrinks_composite_and_hybrid_configs():
    from plait.conformance import tiny_config

    gemma3 = tiny_config("gemma3", 300)
    assert gemma3.text_config.hidden_size == 64 and gemma3.text_config.num_hidden_layers == 2
    assert gemma3.vision_config.hidden_size == 64 and gemma3.text_config.vocab_size == 300
    jamba = tiny_config("jamba", 300)
    kinds = {jamba.layers_block_type[i] for i in range(jamba.num_hidden_layers)}
    assert jamba.num_hidden_layers <= 3 and kinds == {"mamba", "attention"}  # a hybrid stays hybrid


def test_tiny_config_keeps_the_sizes_a_config_derives_from_others_consistent():
    from plait.conformance import tiny_config

    zamba2 = tiny_config("zamba2", 300)  # its shared attention reads [hidden; embeddings]: twice the hidden size
    assert zamba2.hidden_size == 64 and zamba2.attention_hidden_size == 2 * zamba2.hidden_size
    assert zamba2.attention_head_dim == zamba2.attention_hidden_size // zamba2.num_attention_heads
    longcat = tiny_config("longcat_flash", 300)  # split into its no-position and rotary parts
    assert longcat.qk_head_dim == longcat.qk_nope_head_dim + longcat.qk_rope_head_dim
    blt = tiny_config("blt", 300)  # the local encoder and decoder project to and from the global model
    assert blt.encoder_config.hidden_size_global == blt.decoder_config.hidden_size_global \
        == blt.global_config.hidden_size == 64
    # defaults that leave a size unset which the model reads as set (every checkpoint sets it)
    assert tiny_config("ministral", 300).head_dim == 16 and tiny_config("nemotron", 300).num_key_value_heads == 4


def test_a_text_only_checkpoint_of_a_composite_model_loads_with_the_class_it_names(tmp_path):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, LlamaConfig, MllamaForCausalLM, MllamaTextConfig

    from plait.model.loading import causal_lm_class, causal_lm_class_of

    # MllamaForCausalLM saves MllamaTextConfig, which AutoModelForCausalLM does not map (the sweep loads,
    # trains and reloads such checkpoints of emu3 and mllama); only a causal-LM class taking that config counts
    MllamaTextConfig(architectures=["MllamaForCausalLM"]).save_pretrained(tmp_path)
    cfg = SimpleNamespace(base_model=str(tmp_path), revision_of_model=None, trust_remote_code=False)
    assert causal_lm_class_of(cfg) is MllamaForCausalLM
    assert causal_lm_class(MllamaTextConfig(architectures=["LlamaForCausalLM"])) is AutoModelForCausalLM
    assert causal_lm_class(LlamaConfig(architectures=["LlamaForCausalLM"])) is AutoModelForCausalLM
    cfg.base_model = str(tmp_path / "missing")  # unreadable: AutoModelForCausalLM, whose load says why
    assert causal_lm_class_of(cfg) is AutoModelForCausalLM


def test_a_model_that_needs_more_than_token_ids_is_refused_with_its_reason(tmp_path, tokenizer_dir):
    # Gemma 4's assistant drafts from another model's shared KV states: nothing to fine-tune on its own
    model_dir = tiny("gemma4_unified_assistant", tmp_path, tokenizer_dir)
    with pytest.raises(ConfigError, match=r"does not run on token ids alone \(ValueError: .*shared_kv_states"):
        loaded(model_dir)


def test_only_a_config_saying_is_decoder_false_is_loaded_as_a_decoder(tmp_path, tokenizer_dir):
    from plait.model.loading import causal_decoder_kwargs
    from plait.testing import build_run_config

    bert, llama = tiny("bert", tmp_path, tokenizer_dir), tiny("llama", tmp_path, tokenizer_dir)
    bert_cfg, _ = build_run_config({"base_model": str(bert)})
    assert causal_decoder_kwargs(bert_cfg, {}) == {"is_decoder": True}
    assert causal_decoder_kwargs(bert_cfg, {"is_decoder": False}) == {}  # the user's model_config wins
    llama_cfg, _ = build_run_config({"base_model": str(llama)})
    assert causal_decoder_kwargs(llama_cfg, {}) == {}

"""apply_family_tokenizer_fixes: pad token, chat template, stop tokens."""

from __future__ import annotations

import types

from plait.families import find_family

from plait_models import apply_family_tokenizer_fixes, set_generation_stop_tokens
from plait_models.testing import build_model


def test_pad_equal_to_eos_is_replaced_by_the_family_pad_token(pm, tokenizer):
    # a Qwen-like vocabulary: <|endoftext|> exists, pad fell back to EOS
    tokenizer.add_tokens(["<|endoftext|>"], special_tokens=True)
    tokenizer.pad_token = tokenizer.eos_token
    fixes = apply_family_tokenizer_fixes(find_family(pm, "qwen2"), tokenizer)
    assert tokenizer.pad_token == "<|endoftext|>"
    assert any("pad token" in line for line in fixes.changes)


def test_pad_equal_to_end_of_turn_is_replaced(pm, tokenizer):
    tokenizer.add_tokens(["<|eot_id|>", "<|finetune_right_pad_id|>"], special_tokens=True)
    tokenizer.pad_token = "<|eot_id|>"  # a common hand-made mistake: padding masks the stop token
    apply_family_tokenizer_fixes(find_family(pm, "llama"), tokenizer)
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"


def test_a_pad_token_chosen_in_the_config_is_kept(pm, tokenizer):
    tokenizer.add_tokens(["<|endoftext|>"], special_tokens=True)
    tokenizer.pad_token = tokenizer.eos_token
    cfg = types.SimpleNamespace(special_tokens={"pad_token": tokenizer.eos_token})
    apply_family_tokenizer_fixes(find_family(pm, "qwen2"), tokenizer, cfg)
    assert tokenizer.pad_token == tokenizer.eos_token


def test_missing_pad_without_candidate_falls_back_to_eos(pm, tokenizer):
    tokenizer.pad_token = None
    fixes = apply_family_tokenizer_fixes(find_family(pm, "gemma2"), tokenizer)  # no <pad> in this vocab
    assert tokenizer.pad_token == tokenizer.eos_token
    assert any("pad token: none" in line for line in fixes.changes)


def test_a_tokenizer_template_wins_and_its_end_of_turn_is_found(pm, tokenizer):
    from plait.testing import CHATML_TEMPLATE

    tokenizer.chat_template = CHATML_TEMPLATE
    fixes = apply_family_tokenizer_fixes(find_family(pm, "llama"), tokenizer)
    assert tokenizer.chat_template == CHATML_TEMPLATE  # not replaced by llama3's
    assert fixes.end_of_turn_tokens == ["<|im_end|>"]
    assert fixes.stop_token_ids == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_generic_path_keeps_eos_only(tokenizer):
    fixes = apply_family_tokenizer_fixes(None, tokenizer)
    assert tokenizer.chat_template is None
    assert fixes.stop_token_ids == [tokenizer.eos_token_id]


def test_added_tokens_grow_the_vocabulary_and_saved_model_stops_on_them(pm, tokenizer, tmp_path):
    from transformers import GenerationConfig

    before = len(tokenizer)
    fixes = apply_family_tokenizer_fixes(find_family(pm, "llama"), tokenizer)
    assert len(tokenizer) == before + 3  # <|start_header_id|>, <|end_header_id|>, <|eot_id|>
    model = build_model("llama", vocab_size=len(tokenizer))
    set_generation_stop_tokens(model, fixes.stop_token_ids, tokenizer.pad_token_id)
    model.save_pretrained(tmp_path)
    saved = GenerationConfig.from_pretrained(tmp_path)
    assert saved.eos_token_id == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")]


def test_template_markers_added_as_plain_tokens_become_special(pm, tokenizer):
    # core's `tokens:` key (filled by validate_config) adds markers as plain tokens; chat_template
    # masking trains only special end-of-turn markers, so they must be special after the fixes
    family = find_family(pm, "llama")
    tokenizer.add_tokens(list(family.chat_special_tokens))
    tokenizer.chat_template = family.default_chat_template
    size = len(tokenizer)
    fixes = apply_family_tokenizer_fixes(family, tokenizer)
    for token in family.chat_special_tokens:
        assert tokenizer.added_tokens_decoder[tokenizer.convert_tokens_to_ids(token)].special, token
    assert len(tokenizer) == size  # same ids: nothing new for the embeddings
    assert any("marked" in line and "<|eot_id|>" in line for line in fixes.changes)

"""``tokenizer_save_jinja_files``: where a saved model's chat template goes (Axolotl's key)."""

from __future__ import annotations

import json

import pytest

from plait.testing import build_run_config, make_tiny_model


@pytest.mark.parametrize("jinja_files", [True, False])
def test_the_chat_template_is_a_jinja_file_or_inside_tokenizer_config(tmp_path, jinja_files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plait.builtin.save import save_model

    source = make_tiny_model(tmp_path / "model")
    cfg, _ = build_run_config({"base_model": str(source), "tokenizer_save_jinja_files": jinja_files})
    tokenizer = AutoTokenizer.from_pretrained(source)
    out = tmp_path / "out"
    save_model(cfg=cfg, model=AutoModelForCausalLM.from_pretrained(source), tokenizer=tokenizer, path=str(out))

    in_config = json.loads((out / "tokenizer_config.json").read_text()).get("chat_template")
    assert (out / "chat_template.jinja").exists() is jinja_files
    assert in_config == (None if jinja_files else tokenizer.chat_template)
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template  # either way it loads back

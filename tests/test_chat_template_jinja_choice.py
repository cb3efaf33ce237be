"""Axolotl's ``chat_template: jinja``: the template is ``chat_template_jinja``'s text."""

from __future__ import annotations

import pytest

from plait.testing import CHATML_TEMPLATE, build_run_config

REVERSED = "{% for m in messages %}{{ m['content'][::-1] }}|{% endfor %}"


def _tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from plait.testing import make_tiny_tokenizer

    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path / "tok", vocab_size=300,
                                                             chat_template=CHATML_TEMPLATE))


def test_jinja_choice_takes_the_jinja_text(tmp_path):
    cfg, pm = build_run_config({"base_model": str(tmp_path), "chat_template": "jinja", "chat_template_jinja": REVERSED})
    from plait.chat_templates import check_chat_template_names, resolve_chat_template

    check_chat_template_names(cfg)
    assert resolve_chat_template(cfg, _tokenizer(tmp_path)) == REVERSED


def test_jinja_choice_without_the_text_names_both_keys(tmp_path):
    from plait.chat_templates import lookup_chat_template
    from plait.errors import ConfigError

    # validation (which runs check_chat_template_names) refuses it before any tokenizer work
    with pytest.raises(ConfigError, match="config key 'chat_template': 'jinja' means .* chat_template_jinja"):
        build_run_config({"base_model": str(tmp_path), "chat_template": "jinja"})
    with pytest.raises(ConfigError, match="chat_template_jinja, which is not set"):
        lookup_chat_template(None, "jinja", _tokenizer(tmp_path))


def test_dataset_jinja_choice_uses_the_runs_text(tmp_path):
    pytest.importorskip("plait_formats")
    from plait_formats.chat import resolve_template

    cfg, _ = build_run_config({"base_model": str(tmp_path), "chat_template_jinja": REVERSED,
                               "datasets": [{"path": "rows.jsonl", "type": "chat_template", "chat_template": "jinja"}]})
    assert resolve_template(cfg, cfg.datasets[0], _tokenizer(tmp_path)) == REVERSED

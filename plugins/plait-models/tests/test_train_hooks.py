"""plait-models' loop hooks through the real ``plait train``:

* ``tokenizer_loaded``: the family's tokenizer fixes run before the data is
  tokenized (an end-of-turn marker of the template becomes one token);
* ``extra_loss`` (+ ``on_train_start`` asking for router logits): a tiny
  Mixtral's first logged loss with ``router_aux_loss_coef: 0.02`` exceeds the
  one with ``0`` by the weighted router loss. At initialisation routing is
  nearly uniform, where the load-balancing loss is ``top_k`` (2), so the gap
  is about ``0.02 * 2``; tolerance 0.004 (measured 0.0400).
"""

from __future__ import annotations

import math

import pytest

from plait.hookspecs import hookimpl
from plait.testing import make_tiny_model, make_tiny_tokenizer, run_cli, write_config, write_jsonl


class FirstLoss:
    def __init__(self):
        self.losses = []

    @hookimpl
    def on_step_end(self, run, metrics):
        self.losses.append(metrics["loss"])


def test_moe_router_loss_is_added_to_the_logged_loss(tmp_path):
    from plait.quickstart import make_split

    model = make_tiny_model(tmp_path / "mixtral", family="mixtral", num_local_experts=4, num_experts_per_tok=2)
    rows, _ = make_split(8, 1)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    first = {}
    for coef in (0.0, 0.02):
        cfg = write_config(tmp_path / f"{coef}.yml", base_model=str(model),
                           datasets=[{"path": str(data), "type": "alpaca"}], sequence_len=128,
                           micro_batch_size=4, gradient_accumulation_steps=2, max_steps=1, bf16=False,
                           router_aux_loss_coef=coef, output_dir=str(tmp_path / f"out{coef}"))
        recorder = FirstLoss()
        result = run_cli(["train", str(cfg)], plugins=[recorder])
        assert result.exit_code == 0, result.stderr[-3000:]
        first[coef] = recorder.losses[0]
        if coef:
            assert "router load-balancing loss added, coefficient 0.02" in result.stderr
    assert all(math.isfinite(v) for v in first.values())
    gap = first[0.02] - first[0.0]
    assert gap == pytest.approx(0.02 * 2, abs=0.004), f"measured gap {gap:.5f}"


def test_tokenizer_loaded_applies_the_family_fixes_before_tokenizing(tmp_path):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    template = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] }}<|eot_id|>{% endfor %}")
    tok_dir = make_tiny_tokenizer(tmp_path / "tok", chat_template=template)
    assert "<|eot_id|>" not in AutoTokenizer.from_pretrained(tok_dir).get_vocab()
    model = make_tiny_model(tmp_path / "llama", tokenizer_path=tok_dir, family="llama")
    rows = [{"text": f"line {i} ends here <|eot_id|>"} for i in range(4)]
    data = write_jsonl(tmp_path / "text.jsonl", rows)
    cfg = write_config(tmp_path / "cfg.yml", base_model=str(model), sequence_len=64,
                       datasets=[{"path": str(data), "type": "completion"}],
                       dataset_prepared_path=str(tmp_path / "prepared"), output_dir=str(tmp_path / "out"))
    result = run_cli(["preprocess", str(cfg), "--no-progress"])
    assert result.exit_code == 0, result.stderr[-3000:]
    assert "added special tokens ['<|eot_id|>']" in result.stderr
    cache = result.stdout.split("prepared data: ")[1].splitlines()[0].strip()
    ids = load_from_disk(f"{cache}/train")[0]["input_ids"]
    # one id, past the original vocabulary: the fixed tokenizer built the rows
    assert len(AutoTokenizer.from_pretrained(tok_dir)) in ids


def test_tokenizer_loaded_skips_a_model_it_cannot_read(tmp_path):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    import plait_models

    tok_dir = make_tiny_tokenizer(tmp_path / "tok", chat_template=None)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    before = (len(tokenizer), tokenizer.chat_template, tokenizer.pad_token)
    cfg = SimpleNamespace(plugin_manager=object(), base_model=str(tmp_path / "nothing-here"),
                          model_config_type=None, base_model_config=None, trust_remote_code=False)
    plait_models.tokenizer_loaded(cfg=cfg, tokenizer=tokenizer)
    assert (len(tokenizer), tokenizer.chat_template, tokenizer.pad_token) == before


def test_a_run_that_renders_no_chat_gets_no_default_template_or_new_tokens(tmp_path):
    """Alpaca rows on a template-less Llama: installing the family's chat template
    would add its markers and resize the embeddings (a LoRA adapter would then
    have to carry them) for a template nothing renders, so neither happens."""
    from transformers import AutoTokenizer

    tok_dir = make_tiny_tokenizer(tmp_path / "tok", chat_template=None)
    model = make_tiny_model(tmp_path / "llama", tokenizer_path=tok_dir, family="llama")
    data = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": f"say {i}", "output": f"{i}"} for i in range(4)])
    cfg = write_config(tmp_path / "cfg.yml", base_model=str(model), sequence_len=64,
                       datasets=[{"path": str(data), "type": "alpaca"}], max_steps=1, micro_batch_size=2,
                       dataset_prepared_path=str(tmp_path / "prepared"), output_dir=str(tmp_path / "out"))
    result = run_cli(["train", str(cfg)])
    assert result.exit_code == 0, result.stderr[-3000:]
    assert "added special tokens" not in result.stderr and "family's default" not in result.stderr
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert saved.chat_template is None and len(saved) == len(AutoTokenizer.from_pretrained(tok_dir))

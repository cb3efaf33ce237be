"""Axolotl's generate_samples: at each evaluation a few rows are cut at
generation_prompt_ratio and continued by the model; the samples are printed and
kept in generation_samples.jsonl, and the run trains exactly as without them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model

sys.path.insert(0, str(Path(__file__).parent))
from test_generation_eval import qa_rows  # noqa: E402

MAX_NEW = 4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    # dropout: the training steps draw random numbers, so a generation that moved the run's random state shows
    return make_tiny_model(tmp_path_factory.mktemp("samples") / "model", attention_dropout=0.2)


def _train(tiny_model, out, **keys):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from plait.train.loop import train

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cfg, pm = build_run_config({"base_model": str(tiny_model), "output_dir": str(out), "max_steps": 4,
                                "eval_steps": 2, "micro_batch_size": 2, "learning_rate": 1e-3, "val_set_size": 6,
                                "logging_steps": 1, **keys})
    train(cfg, pm, data=SimpleNamespace(train=qa_rows(tokenizer, 8, 0), eval=qa_rows(tokenizer, 5, 1)))
    return tokenizer, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_greedy_samples_are_the_saved_models_continuations_of_the_cut_rows(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "greedy"
    tokenizer, _ = _train(tiny_model, out, generate_samples=True, num_generation_samples=2,
                          generation_max_new_tokens=MAX_NEW, generation_do_sample=False, generation_prompt_ratio=0.4)
    samples = [json.loads(line) for line in (out / "generation_samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2, 4, 4]
    eval_rows = qa_rows(tokenizer, 5, 1)
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # the model of the last evaluation
    for sample in samples[2:]:
        ids = eval_rows[sample["row"]]["input_ids"]
        cut = max(1, int(len(ids) * 0.4))
        assert sample["prompt"] == tokenizer.decode(ids[:cut], skip_special_tokens=True)
        assert sample["continuation"] == tokenizer.decode(ids[cut:], skip_special_tokens=True)
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids[:cut]]), max_new_tokens=MAX_NEW, do_sample=False)
        assert sample["generated"] == tokenizer.decode(expected[0, cut:], skip_special_tokens=True)
    assert samples[2]["generated"] or samples[3]["generated"]  # something was generated


@pytest.mark.slow
def test_sampling_leaves_the_runs_training_as_it_was(tiny_model, tmp_path):
    _, plain = _train(tiny_model, tmp_path / "plain")
    _, sampled = _train(tiny_model, tmp_path / "sampled", generate_samples=True, generation_temperature=1.0,
                        generation_top_k=20, generation_top_p=0.9)
    # steps 3 and 4 come after an evaluation that sampled: their dropout draws are the same as without it
    assert [r["loss"] for r in sampled if "loss" in r] == [r["loss"] for r in plain if "loss" in r]
    again = [json.loads(line) for line in (tmp_path / "sampled" / "generation_samples.jsonl").read_text().splitlines()]
    assert len(again) == 6 and {s["step"] for s in again} == {2, 4}
    # the same rows and the same draws in another run: seeded by the run's seed and the step
    _train(tiny_model, tmp_path / "sampled2", generate_samples=True, generation_temperature=1.0,
           generation_top_k=20, generation_top_p=0.9)
    assert again == [json.loads(line) for line in
                     (tmp_path / "sampled2" / "generation_samples.jsonl").read_text().splitlines()]


def test_keys_and_notes():
    cfg, _ = build_run_config({"base_model": "m", "generation_temperature": 0.2})
    assert any("generation_temperature is read by generate_samples, which is off" in note for note in cfg.notes)
    cfg, _ = build_run_config({"base_model": "m", "generate_samples": True})
    assert any("generate_samples generates at each evaluation, and this config does not evaluate" in note
               for note in cfg.notes)
    with pytest.raises(ConfigError, match="generation_prompt_ratio"):
        build_run_config({"base_model": "m", "generate_samples": True, "generation_prompt_ratio": 1.5})
    with pytest.raises(ConfigError, match="'generate_samples' continues a row's own tokens; dpo rows are pairs"):
        build_run_config({"base_model": "m", "generate_samples": True, "rl": "dpo"})

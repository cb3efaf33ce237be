"""Generation during evaluation (Axolotl's do_causal_lm_eval, eval_causal_lm_metrics,
eval_max_new_tokens, eval_table_size): a real run on a tiny model whose logged
metrics are recomputed independently from the texts it wrote, greedy
completions that match unbatched generation by the saved model, and the
messages for bad values."""

from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace

import pytest

from plait import hookimpl
from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model, run_cli, write_config, write_jsonl

sacrebleu = pytest.importorskip("sacrebleu")

MAX_NEW = 6


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("generation") / "model")


def qa_rows(tokenizer, n: int, seed: int):
    """Rows of a prompt (untrained) and its answer (trained, ending in EOS)."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    words = "the a of to and in is it you that he was for on are as with his they".split()
    rows = []
    for i in range(n):
        prompt = tokenizer.encode(f"### Instruction: {' '.join(rng.choices(words, k=rng.randint(2, 9)))}\n"
                                  f"### Response:")
        answer = tokenizer.encode(" " + " ".join(rng.choices(words, k=rng.randint(2, 6))),
                                  add_special_tokens=False) + [tokenizer.eos_token_id]
        ids = prompt + answer
        rows.append({"input_ids": ids, "labels": [-100] * len(prompt) + answer, "attention_mask": [1] * len(ids),
                     "length": len(ids)})
    # a row trained from its first token has no prompt: left out of generation
    ids = tokenizer.encode("all of it is trained")
    rows.append({"input_ids": ids, "labels": list(ids), "attention_mask": [1] * len(ids), "length": len(ids)})
    return Dataset.from_list(rows)


class Recorder:
    def __init__(self):
        self.tables, self.evals = {}, {}

    @hookimpl
    def on_eval_predictions(self, run, rows):
        self.tables[rows[0]["step"]] = (rows, run.model.training)

    @hookimpl
    def on_eval_end(self, run, metrics):
        self.evals[metrics["step"]] = (metrics, run.model.training)


@pytest.fixture(scope="module")
def generated(tiny_model, tmp_path_factory):
    """Three steps, evaluated after steps 2 and 3, scoring all 5 promptable eval rows; the table keeps 4."""
    from transformers import AutoTokenizer

    from plait.train.loop import train

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    out = tmp_path_factory.mktemp("generated") / "out"
    recorder = Recorder()
    cfg, pm = build_run_config({
        "base_model": str(tiny_model), "output_dir": str(out), "max_steps": 3, "eval_steps": 2, "micro_batch_size": 2,
        "eval_batch_size": 3, "learning_rate": 1e-3, "val_set_size": 6, "do_causal_lm_eval": True,
        "eval_causal_lm_metrics": ["sacrebleu", "ter", "chrf", "perplexity"], "eval_max_new_tokens": MAX_NEW,
        "eval_table_size": 4}, plugins=[recorder])
    run = train(cfg, pm, data=SimpleNamespace(train=qa_rows(tokenizer, 8, 0), eval=qa_rows(tokenizer, 5, 1)))
    return SimpleNamespace(out=out, run=run, recorder=recorder, tokenizer=tokenizer,
                           records=[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()],
                           table=[json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()])


@pytest.mark.slow
def test_the_logged_metrics_are_sacrebleus_scores_of_the_generated_texts(generated):
    evals = [r for r in generated.records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 3]
    score_all = {"sacrebleu": sacrebleu.corpus_bleu, "ter": sacrebleu.corpus_ter, "chrf": sacrebleu.corpus_chrf}
    for record in evals:
        # the table has 4 of the 5 rows; the scores cover all 5: rebuild the 5th from the saved model below
        metrics, training = generated.recorder.evals[record["step"]]
        assert training and metrics == record  # train mode restored before the event; same numbers as the file
        assert {"eval_sacrebleu", "eval_ter", "eval_chrf", "eval_perplexity"} <= set(record)
    final = _independent_generations(generated)
    last = evals[-1]
    for name, score in score_all.items():
        expected = score([p for _, p in final], [[r for r, _ in final]]).score
        assert last[f"eval_{name}"] == pytest.approx(expected, abs=1e-9), name
    assert last["eval_chrf"] > 0 and last["eval_ter"] > 0  # real texts compared, not two empty lists


def _independent_generations(generated):
    """(reference, prediction) of every promptable eval row, generated one row at a time (no padding, no
    batching) by the saved model, which is the model of the final evaluation."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = generated.tokenizer
    model = AutoModelForCausalLM.from_pretrained(generated.out).eval()
    pairs = []
    for row in qa_rows(tokenizer, 5, 1):
        start = next(i for i, label in enumerate(row["labels"]) if label != -100)
        if start == 0:
            continue
        prompt = torch.tensor([row["input_ids"][:start]])
        with torch.no_grad():
            # the saved generation config: EOS and the chat template's end of turn (plait-models adds it)
            out = model.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False)
        pairs.append((tokenizer.decode(row["input_ids"][start:], skip_special_tokens=True),
                      tokenizer.decode(out[0, start:], skip_special_tokens=True)))
    return pairs


@pytest.mark.slow
def test_the_table_file_holds_the_first_rows_with_prompt_reference_and_prediction(generated):
    tokenizer, table = generated.tokenizer, generated.table
    assert [(r["step"], r["row"]) for r in table] == [(2, i) for i in range(4)] + [(3, i) for i in range(4)]
    rows = qa_rows(tokenizer, 5, 1)
    for entry in table:
        row = rows[entry["row"]]
        start = next(i for i, label in enumerate(row["labels"]) if label != -100)
        assert entry["prompt"] == tokenizer.decode(row["input_ids"][:start], skip_special_tokens=True)
        assert entry["reference"] == tokenizer.decode(row["input_ids"][start:], skip_special_tokens=True)
        assert entry["prediction"] and len(tokenizer.encode(entry["prediction"], add_special_tokens=False)) \
            <= MAX_NEW + 2  # at most eval_max_new_tokens tokens (re-encoding may merge or split a couple)
    final = _independent_generations(generated)
    assert [(r["reference"], r["prediction"]) for r in table if r["step"] == 3] == final[:4]


@pytest.mark.slow
def test_perplexity_is_the_models_on_the_references_alone(generated):
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = generated.tokenizer
    model = AutoModelForCausalLM.from_pretrained(generated.out).eval()
    nll, count = 0.0, 0
    for row in qa_rows(tokenizer, 5, 1):
        start = next(i for i, label in enumerate(row["labels"]) if label != -100)
        if start == 0:
            continue
        ids = torch.tensor([[tokenizer.bos_token_id] + row["input_ids"][start:]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss  # mean over the reference tokens
        nll += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    last = [r for r in generated.records if "eval_loss" in r][-1]
    assert last["eval_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.mark.slow
def test_hook_on_eval_predictions(generated):
    assert sorted(generated.recorder.tables) == [2, 3]
    for step, (rows, training) in generated.recorder.tables.items():
        assert training  # called after the model went back to train mode
        assert rows == [r for r in generated.table if r["step"] == step]


def test_split_row_gives_the_prompt_and_the_first_trained_span():
    from plait.train.generation import split_row

    sample = split_row(7, [1, 2, 3, 4, 5, 6, 7, 8], [-100, -100, 3, 4, -100, -100, 7, 8])
    assert (sample.row, sample.prompt_ids, sample.reference_ids) == (7, [1, 2], [3, 4])
    assert split_row(0, [1, 2], [1, 2]) is None  # nothing before the trained tokens
    assert split_row(0, [1, 2], [-100, -100]) is None  # nothing trained


# ---------------------------------------------------------------- keys and messages


def _cfg(**keys):
    from plait.config import build_config
    from plait.testing import plugin_manager

    return build_config(plugin_manager(), {"base_model": "m", "val_set_size": 0.1, **keys}, machine_facts="note")


def test_axolotls_keys_validate_with_their_defaults():
    from plait.train.generation import max_new_tokens, metric_names

    cfg = _cfg(do_causal_lm_eval=True, eval_table_size=2)
    assert metric_names(cfg) == ["sacrebleu", "ter", "chrf"] and max_new_tokens(cfg) == 128
    alone = _cfg(eval_causal_lm_metrics=["perplexity"])
    assert metric_names(alone) == []  # without do_causal_lm_eval: none, and validation says so
    assert any("eval_causal_lm_metrics is read by do_causal_lm_eval" in note for note in alone.notes)


@pytest.mark.parametrize("keys,message", [
    ({"eval_causal_lm_metrics": ["comet"]}, "'comet' scores with a neural model .* accepted: sacrebleu, ter, chrf, "
                                            "perplexity"),
    ({"eval_causal_lm_metrics": ["sacrebleu", "chrF"]}, "'chrF' is not a metric Plait computes; did you mean "
                                                        "'chrf'\\?; accepted: sacrebleu, ter, chrf, perplexity"),
    ({"eval_max_new_tokens": 0}, "eval_max_new_tokens"),
    ({"eval_table_size": -1}, "eval_table_size"),
    ({"eval_table_size": 2, "fsdp": "full_shard"}, "'eval_table_size': generation during evaluation needs the "
                                                   "whole model on each process, and fsdp shards it"),
    ({"do_causal_lm_eval": True, "rl": "dpo"}, "'do_causal_lm_eval' generates .* dpo rows"),
    ({"do_causal_lm_eval": True, "processor_type": "AutoProcessor"}, "processor_type trains on images too"),
])
def test_bad_values_are_refused_by_name(keys, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**keys)


def test_several_processes_under_plait_parallel_are_refused_by_name(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # plait-parallel shards every multi-process run (FSDP2 by default)
    with pytest.raises(ConfigError, match="'do_causal_lm_eval': .* plait-parallel over 2 processes"):
        _cfg(do_causal_lm_eval=True)


def test_without_sacrebleu_its_metrics_are_a_machine_fact(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # how Python marks a module as absent
    with pytest.raises(ConfigError, match="sacrebleu, ter are computed by the sacrebleu package, which is not "
                                               "installed here; pip install sacrebleu"):
        build_run_config({"base_model": "m", "val_set_size": 0.1, "do_causal_lm_eval": True,
                          "eval_causal_lm_metrics": ["sacrebleu", "ter"]})
    build_run_config({"base_model": "m", "val_set_size": 0.1, "do_causal_lm_eval": True,
                      "eval_causal_lm_metrics": ["perplexity"]})  # perplexity needs only the model


@pytest.mark.slow
def test_plait_evaluate_prints_the_generation_metrics_and_table(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": f"say {w}", "output": w}
                                               for w in "one two three four five six".split()])
    config = write_config(tmp_path / "c.yml", base_model=str(tiny_model), datasets=[{"path": str(data),
                          "type": "alpaca"}], val_set_size=0.5, output_dir=str(tmp_path / "out"),
                          do_causal_lm_eval=True, eval_causal_lm_metrics=["chrf"], eval_max_new_tokens=4,
                          eval_table_size=2)
    result = run_cli(["evaluate", str(config), "--base", "--json"])
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)
    table = metrics["predictions"]
    assert [row["row"] for row in table] == [0, 1] and metrics["eval_chrf"] >= 0
    assert all(row["reference"] in "one two three four five six".split() for row in table)

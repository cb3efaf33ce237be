"""The objective's ``samples``: the pairs (and KTO rows) a step trained on, as
text-ready ids with their reward margins, and SwanLab's completion table
(``swanlab_log_completions``) built from them."""

from __future__ import annotations

import json
from collections import deque
from statistics import mean

import pytest

from plait import hookimpl
from plait_preference.testing import kto_rows, pair_rows


class SampleRecorder:
    """Asks the objective for its samples, as a tracker does, and keeps each step's."""

    def __init__(self):
        self.steps = []

    @hookimpl
    def on_train_start(self, run):
        run.objective.samples = deque()
        self.tokenizer = run.tokenizer

    @hookimpl
    def on_step_end(self, run, metrics):
        self.steps.append((metrics, list(run.objective.samples)))
        run.objective.samples.clear()


def _train(tmp_path, tiny_model, rows, **keys):
    from plait.testing import build_run_config
    from plait.train.loop import train

    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    recorder = SampleRecorder()
    cfg, pm = build_run_config({
        "base_model": str(tiny_model), "output_dir": str(tmp_path / "out"),
        "dataset_prepared_path": str(tmp_path / "prep"), "sequence_len": 256, "learning_rate": 1e-3,
        "logging_steps": 1, "micro_batch_size": 4, "max_steps": 2,
        "datasets": [{"path": str(data), "type": "chat_template.default", "field_messages": "conversations"}],
        **keys}, plugins=[recorder])
    train(cfg, pm)
    return recorder


@pytest.mark.slow
def test_dpo_samples_are_the_trained_pairs_with_their_reward_margins(tmp_path, tiny_model):
    rows = pair_rows(8)
    recorder = _train(tmp_path, tiny_model, rows, rl="dpo")
    texts = {row["conversations"][0]["value"]: (row["chosen"]["value"], row["rejected"]["value"]) for row in rows}
    decode = recorder.tokenizer.decode
    seen = set()
    for metrics, samples in recorder.steps:
        assert len(samples) == metrics["pairs"] == 4
        # the step's rewards/margins is the mean of its pairs' margins
        assert mean(s["reward_diff"] for s in samples) == pytest.approx(metrics["rewards/margins"], rel=1e-5,
                                                                         abs=1e-7)
        for sample in samples:
            prompt = decode(sample["prompt_ids"])
            [question] = [q for q in texts if q in prompt]
            chosen, rejected = texts[question]
            assert chosen in decode(sample["chosen_ids"]) and rejected in decode(sample["rejected_ids"])
            seen.add(question)
    assert len(seen) == 8  # two steps of four: every pair once


def test_kto_samples_are_the_trained_rows_without_their_kl_sequences(tmp_path, tiny_model):
    rows = kto_rows(8)
    for row in rows:
        row["conversations"] = row.pop("messages")
    recorder = _train(tmp_path, tiny_model, rows, rl="kto")
    decode = recorder.tokenizer.decode
    answers = {row["conversations"][0]["content"]: (row["conversations"][1]["content"], row["label"]) for row in rows}
    for metrics, samples in recorder.steps:
        assert len(samples) == metrics["examples"] == 4
        for sample in samples:
            [question] = [q for q in answers if q in decode(sample["prompt_ids"])]
            completion, label = answers[question]
            assert completion in decode(sample["completion_ids"]) and sample["label"] is label
        good = [s["reward"] for s in samples if s["label"]]
        assert mean(good) == pytest.approx(metrics["rewards/chosen"], rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_swanlab_logs_the_completion_table_of_a_dpo_run(tmp_path, train, write_rows, monkeypatch):
    pytest.importorskip("swanlab")
    monkeypatch.chdir(tmp_path)  # SwanLab writes ./swanlog
    steps = train("dpo", rl="dpo", micro_batch_size=4, max_steps=2, swanlab_project="plait-test",
                  swanlab_mode="offline", swanlab_completion_log_interval=1,
                  plugins=["axolotl.integrations.swanlab.SwanLabPlugin"],
                  datasets=[{"path": str(write_rows(pair_rows(8))), "type": "chat_template.default",
                             "field_messages": "conversations"}])
    tables = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("swanlog/run-*/media/echarts/*.json"))]
    assert [t["_swanLab"] for t in tables] == ["table", "table"]  # one per step (interval 1)
    for table, metrics in zip(tables, steps):
        assert [c["field"] for c in table["colDefs"]] == ["step", "prompt", "chosen", "rejected", "reward_diff"]
        rows = table["rowData"]
        assert {row["step"] for row in rows} == {metrics["step"]} and len(rows) == 4
        assert mean(row["reward_diff"] for row in rows) == pytest.approx(metrics["rewards/margins"], rel=1e-5,
                                                                         abs=1e-7)

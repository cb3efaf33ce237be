"""``process_reward_model: true``: stepwise_supervised rows, a token-classification
head trained on each step's label, saved so plain transformers loads it.

TRL 1.16 no longer ships ``PRMTrainer`` (it was moved to ``trl.experimental.prm``
and later removed), so the per-step losses are checked against the loop it
ran on: transformers' ``Trainer`` with ``AutoModelForTokenClassification``'s
own loss, ``DataCollatorForTokenClassification`` and rows tokenized by this
file's own rendering of PRMTrainer's ``tokenize_row``.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from plait.errors import ConfigError
from plait.testing import build_run_config, run_cli, write_config, write_jsonl

#: the decoder's linear layers ("all-linear" would also pick the classifier head, which trains in full)
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = "the cat sat on a mat and ran far away with big hat under old green tree".split()


def step_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows in math_shepherd's layout; a step is wrong (False) when it holds the word "red"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        steps, labels = [], []
        for _ in range(rng.randint(2, 4)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
            wrong = rng.random() < 0.4
            if wrong:
                words.insert(rng.randrange(len(words) + 1), "red")
            steps.append(" ".join(words))
            labels.append(not wrong)
        rows.append({"prompt": "q: " + " ".join(rng.choice(WORDS) for _ in range(4)), "completions": steps,
                     "labels": labels})
    return rows


def prm_keys(tiny_model, data, tmp_path, **extra) -> dict:
    return {"base_model": str(tiny_model), "process_reward_model": True, "num_labels": 2,
            "datasets": [{"path": str(data), "type": "stepwise_supervised", "step_separator": "\n"}],
            "output_dir": str(tmp_path / "out"), "dataset_prepared_path": str(tmp_path / "prep"),
            "sequence_len": 256, "lr_scheduler": "constant", "warmup_steps": 0, "logging_steps": 1, **extra}


def train(tmp_path, keys) -> list[dict]:
    result = run_cli(["train", str(write_config(tmp_path / "prm.yml", **keys))])
    assert result.exit_code == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------- the rows


def test_stepwise_labels_sit_on_each_steps_last_token(tiny_model):
    from transformers import AutoTokenizer

    from plait_preference.stepwise import tokenize_row

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    row = {"prompt": "the cat", "completions": ["sat on a mat", "ran far"], "labels": [True, False]}
    options = dict(separator="\n", max_completion_length=None, sequence_len=None, num_labels=2)
    ids, labels = tokenize_row(tokenizer, row, 0, last_step_only=False, **options)
    assert tokenizer.decode(ids) == tokenizer.bos_token + "the catsat on a mat\nran far\n"
    prompt = 1 + len(encode(tokenizer, "the cat"))  # BOS first, as Axolotl and TRL add it
    step0, step1 = len(encode(tokenizer, "sat on a mat")), len(encode(tokenizer, "ran far"))
    newline = encode(tokenizer, "\n")
    assert len(newline) == 1
    # the label of each step on its separator, every other token ignored
    assert labels == [-100] * (prompt + step0) + [1] + [-100] * step1 + [0]
    assert [ids[i] for i, label in enumerate(labels) if label != -100] == newline * 2

    _, last_only = tokenize_row(tokenizer, row, 0, last_step_only=True, **options)
    assert last_only == [-100] * (len(labels) - 1) + [0]
    cut = dict(options, max_completion_length=step0 + 1)  # the first step and its separator
    cut_ids, cut_labels = tokenize_row(tokenizer, row, 0, last_step_only=False, **cut)
    assert cut_ids == ids[:prompt + step0 + 1] and cut_labels == labels[:prompt + step0 + 1]


@pytest.mark.parametrize("bad_row, message", [
    ({"prompt": "q", "completions": ["a", "b"], "labels": [True]}, r"2 steps, labels: 1"),
    ({"prompt": "q", "completions": ["a"], "labels": [2]}, r"label 0 is 2, but num_labels is 2"),
    ({"prompt": "q", "completions": "a b", "labels": [True]}, r"'completions' must be a non-empty list"),
])
def test_bad_rows_are_named_with_file_and_row(bad_row, message, tmp_path, tiny_model):
    good = step_rows(2)
    data = write_jsonl(tmp_path / "steps.jsonl", [good[0], bad_row, good[1]])
    result = run_cli(["preprocess", str(write_config(tmp_path / "prm.yml", **prm_keys(tiny_model, data, tmp_path)))])
    assert result.exit_code != 0
    assert "steps.jsonl" in result.stderr and "row 2" in result.stderr, result.stderr[-1500:]
    assert message.replace("\\", "") in result.stderr


# ----------------------------------------------------------------- validation


def test_process_reward_model_keys_validate(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "steps.jsonl", step_rows(2))
    keys = prm_keys(tiny_model, data, tmp_path)
    cfg, _ = build_run_config({**keys, "model_type": "AutoModelForTokenClassification"})
    assert cfg.num_labels == 2 and cfg.datasets[0].train_on_last_step_only is False

    bad = [({"num_labels": 1}, r"'num_labels': 1 is not accepted with process_reward_model"),
           ({"rl": "dpo"}, r"two different trainings"),
           ({"reward_model": True}, r"two different trainings"),
           ({"rl_beta": 0.1, "precompute_ref_log_probs": True}, r"rl_beta, precompute_ref_log_probs set with "
                                                                r"process_reward_model: true, which does not use"),
           ({"model_type": "AutoModelForCausalLM"}, r"'model_type': 'AutoModelForCausalLM' .* accepted: "
                                                     r"AutoModelForTokenClassification"),
           ({"datasets": [{"path": str(data), "type": "alpaca"}]}, r"'datasets.0.type': 'alpaca' .* accepted: "
                                                                    r"stepwise_supervised"),
           ({"datasets": [{"path": str(data), "type": "stepwise_supervised.v2"}]}, r"no variants"),
           ({"process_reward_model": False}, r"set process_reward_model: true"),
           ({"process_reward_model": None, "datasets": [{"path": str(data), "type": "alpaca"}]},
            r"'num_labels': 2 is not accepted")]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message):
            build_run_config({**keys, **change})


# ------------------------------------------------------------------- training


@pytest.mark.slow
def test_trains_and_the_saved_model_loads_in_transformers(tmp_path, tiny_model):
    """Loss goes down; the saved model, loaded by plain transformers, gives the
    final evaluation's loss and accuracy on the same rows."""
    import torch.nn.functional as F
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from plait_preference.stepwise import tokenize_row

    rows = step_rows(16, seed=1)
    data = write_jsonl(tmp_path / "steps.jsonl", rows)
    steps = 12
    records = train(tmp_path, prm_keys(tiny_model, data, tmp_path, micro_batch_size=16, max_steps=steps,
                                        learning_rate=5e-3, test_datasets=[{"path": str(data),
                                                                           "type": "stepwise_supervised"}],
                                        eval_steps=steps))
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == steps and losses[-1] < losses[0] - 0.15, losses
    final = [r for r in records if "eval_loss" in r][-1]
    labelled = sum(len(r["labels"]) for r in rows)
    assert records[0]["labelled_steps"] == final["eval_labelled_steps"] == labelled

    model, info = AutoModelForTokenClassification.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and model.config.num_labels == 2
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    total, right = 0.0, 0
    with torch.no_grad():
        for index, row in enumerate(rows):  # one row at a time, as a user scores them
            ids, labels = tokenize_row(tokenizer, row, index, separator="\n", max_completion_length=None,
                                       last_step_only=False, sequence_len=256, num_labels=2)
            logits = model(torch.tensor([ids])).logits[0]
            labels = torch.tensor(labels)
            total += float(F.cross_entropy(logits[labels != -100], labels[labels != -100], reduction="sum"))
            right += int((logits[labels != -100].argmax(-1) == labels[labels != -100]).sum())
    assert total / labelled == pytest.approx(final["eval_loss"], rel=1e-4)
    assert right / labelled == pytest.approx(final["eval_accuracy"], abs=1e-9)


def trl_tokenize_row(tokenizer, row: dict) -> dict:
    """TRL PRMTrainer.tokenize_row's rows, written out here (no cuts): the reference's data."""
    prompt = encode(tokenizer, row["prompt"])
    ids, labels = [tokenizer.bos_token_id] + prompt, [-100] * (1 + len(prompt))
    separator = tokenizer.encode("\n", add_special_tokens=False)
    for step, label in zip(row["completions"], row["labels"]):
        step_ids = encode(tokenizer, step) + separator
        ids += step_ids
        labels += [-100] * (len(step_ids) - 1) + [int(label)]
    return {"input_ids": ids, "labels": labels}


@pytest.mark.slow
@pytest.mark.parametrize("adapter", [None, "lora"])
def test_per_step_loss_equals_transformers_trainer(adapter, tmp_path, tiny_model):
    """Per-step losses equal transformers' Trainer (PRMTrainer's loop) on the same
    model, rows and settings. Tolerance 1e-5 relative: float32 on a CPU, both pad
    the batch the same way; only summation order differs. With LoRA both start
    from one saved adapter with the head in modules_to_save."""
    from datasets import Dataset
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              Trainer, TrainingArguments)

    # a token-classification checkpoint, so both sides start from the same head
    torch.manual_seed(0)
    base = AutoModelForTokenClassification.from_pretrained(tiny_model, num_labels=2)
    base.save_pretrained(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.save_pretrained(tmp_path / "base")
    extra = {}
    if adapter:
        from peft import LoraConfig, get_peft_model

        start = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LINEAR, lora_dropout=0.0,
                                                task_type="TOKEN_CLS"))  # the head in modules_to_save
        start.save_pretrained(tmp_path / "adapter")
        extra = {"adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_model_dir": str(tmp_path / "adapter")}

    rows = step_rows(4, seed=2)
    data = write_jsonl(tmp_path / "steps.jsonl", rows)
    steps = 3
    ours = [r for r in train(tmp_path, prm_keys(tmp_path / "base", data, tmp_path, micro_batch_size=4,
                                                max_steps=steps, learning_rate=1e-3, optimizer="adamw_torch",
                                                max_grad_norm=1.0, weight_decay=0.0, **extra)) if "loss" in r]

    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "base")
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, tmp_path / "adapter", is_trainable=True)
    for module in model.modules():  # PRMConfig's disable_dropout default
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    args = TrainingArguments(output_dir=str(tmp_path / "ref"), per_device_train_batch_size=4, max_steps=steps,
                             learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                             optim="adamw_torch", max_grad_norm=1.0, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", seed=42, bf16=False)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list([trl_tokenize_row(tokenizer, r)
                                                                              for r in rows]),
                      data_collator=DataCollatorForTokenClassification(tokenizer))
    trainer.train()
    theirs = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][:steps]
    assert [r["loss"] for r in ours] == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    assert ours[0]["labelled_steps"] == sum(len(r["labels"]) for r in rows)


def test_packed_rows_give_the_loss_of_unpacked_ones(tmp_path, tiny_model):
    """Rows packed into one bin (positions restart, attention kept inside each
    row) give the summed loss and labelled count of the same rows padded."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from plait_preference.process_reward import ProcessRewardObjective, load_process_reward_model
    from plait_preference.stepwise import tokenize_row

    rows = step_rows(5, seed=4)
    data = write_jsonl(tmp_path / "steps.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenized = [tokenize_row(tokenizer, row, i, separator="\n", max_completion_length=None, last_step_only=False,
                              sequence_len=256, num_labels=2) for i, row in enumerate(rows)]
    plain = [{"input_ids": ids, "labels": labels} for ids, labels in tokenized]
    packed = [{"input_ids": sum((r["input_ids"] for r in plain), []), "labels": sum((r["labels"] for r in plain), []),
               "seq_lens": [len(r["input_ids"]) for r in plain]}]
    results = []
    for packing, batch_rows in ((False, plain), (True, packed)):
        cfg, pm = build_run_config(prm_keys(tiny_model, data, tmp_path, sample_packing=packing))
        torch.manual_seed(0)  # the same random head on both sides
        model = load_process_reward_model(cfg, tokenizer).eval()
        run = SimpleNamespace(model=model, device=torch.device("cpu"), cfg=cfg, pm=pm)
        batch = pm.hook.collate(cfg=cfg, rows=batch_rows, tokenizer=tokenizer)
        objective = ProcessRewardObjective(model)
        with torch.no_grad():
            loss_sum, metrics = objective.loss(run, batch)
        results.append((float(loss_sum), objective.count(batch), float(metrics["accuracy"][0])))
    (plain_loss, plain_count, plain_right), (packed_loss, packed_count, packed_right) = results
    assert packed_count == plain_count == sum(len(r["labels"]) for r in rows)
    assert packed_loss == pytest.approx(plain_loss, rel=1e-5) and packed_right == plain_right

    # the packed step again on the meta device (shapes, no data): anything that would make the host wait
    # for a GPU (.item(), a boolean mask, nonzero) raises there; the labelled positions come from the host
    model.to("meta")
    loss_sum, metrics = objective.loss(SimpleNamespace(model=model, device=torch.device("meta"), cfg=cfg, pm=pm),
                                       batch, training=True)
    loss_sum.backward()
    assert loss_sum.device.type == "meta" and metrics["accuracy"][1] == packed_count


def test_lora_trains_the_adapter_and_the_head(tmp_path, tiny_model):
    """A fresh LoRA run: the adapter and the whole head (peft's TOKEN_CLS
    modules_to_save) get gradients, the base does not; a frozen head is refused."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from plait_preference.process_reward import ProcessRewardObjective
    from plait_preference.stepwise import tokenize_row

    rows = step_rows(3, seed=5)
    data = write_jsonl(tmp_path / "steps.jsonl", rows)
    cfg, pm = build_run_config(prm_keys(tiny_model, data, tmp_path, adapter="lora", lora_r=4, lora_alpha=8,
                                        lora_target_linear=True))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = pm.hook.load_adapter(cfg=cfg, model=pm.hook.load_model(cfg=cfg, tokenizer=tokenizer))
    batch_rows = [dict(zip(("input_ids", "labels"), tokenize_row(
        tokenizer, row, i, separator="\n", max_completion_length=None, last_step_only=False, sequence_len=256,
        num_labels=2))) for i, row in enumerate(rows)]
    batch = pm.hook.collate(cfg=cfg, rows=batch_rows, tokenizer=tokenizer)
    run = SimpleNamespace(model=model, device=torch.device("cpu"), cfg=cfg, pm=pm)
    loss_sum, _ = ProcessRewardObjective(model).loss(run, batch, training=True)
    loss_sum.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in name or "score.modules_to_save" in name for name in grads)
    # lora_B starts at zero, so lora_A's first gradient is zero too: B and the head move first
    moving = [name for name, grad in grads.items() if grad is not None and bool(grad.abs().sum() > 0)]
    for head_param in ("score.modules_to_save.default.weight", "score.modules_to_save.default.bias"):
        assert any(name.endswith(head_param) for name in moving), moving
    assert all(any(name == m for m in moving) for name in grads if "lora_B" in name)

    frozen = pm.hook.load_model(cfg=cfg, tokenizer=tokenizer).requires_grad_(False)
    with pytest.raises(ConfigError, match=r"head 'score' is frozen"):
        ProcessRewardObjective(frozen)

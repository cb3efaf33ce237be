"""``reward_model: true``: a Bradley-Terry reward model trained on Plait's loop,
saved so plain transformers loads it and scores pairs the way training did."""

from __future__ import annotations

import json

import pytest
import torch

from plait import hookimpl

from plait_preference.testing import pair_rows


def test_reward_model_trains_and_loads_in_plain_transformers(tmp_path, tiny_model, train, write_rows):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = pair_rows(8, seed=9)
    steps = train("rm", reward_model=True, micro_batch_size=8, max_steps=8, learning_rate=5e-3,
                  datasets=[{"path": str(write_rows(rows)), "type": "chat_template.default"}])
    assert steps[0]["pairs"] == 8 and "rewards/accuracies" in steps[0]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.1  # it learns which response of each pair is chosen

    model, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", output_loading_info=True)
    assert not info["missing_keys"] and model.config.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm")
    right = pairs_ranked_right(model, tokenizer, rows)
    assert right / len(rows) == pytest.approx(steps[-1]["rewards/accuracies"], abs=0.26)
    assert right >= 6


def test_reward_model_and_rl_together_are_refused(tiny_model):
    from plait.errors import ConfigError
    from plait.testing import build_run_config

    with pytest.raises(ConfigError, match="two different trainings"):
        build_run_config({"base_model": str(tiny_model), "reward_model": True, "rl": "dpo"})


class HeadAtStart:
    """Keeps the scalar head's weight as training starts (what the run trains from)."""

    def __init__(self):
        self.score = None

    @hookimpl
    def on_train_start(self, run):
        from plait.model.forward import unwrap

        self.score = unwrap(run.model).score.weight.detach().clone()


def test_reward_model_with_lora_trains_the_head_without_lora_modules_to_save(tmp_path, tiny_model, write_rows):
    # peft's SEQ_CLS wrapper puts score in modules_to_save itself: no key needed; the head trains in
    # full and is saved beside the adapter, and the base + adapter loads in transformers + peft
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from plait.testing import build_run_config, run_cli, write_config

    build_run_config({"base_model": str(tiny_model), "reward_model": True, "adapter": "lora",
                      "lora_target_linear": True, "lora_modules_to_save": ["score"]})  # still allowed
    rows = pair_rows(8, seed=9)
    out, spy = tmp_path / "rm_lora", HeadAtStart()
    config = write_config(tmp_path / "rm_lora.yml", base_model=str(tiny_model), output_dir=str(out),
                          reward_model=True, adapter="lora", lora_r=8, lora_alpha=16, lora_target_linear=True,
                          datasets=[{"path": str(write_rows(rows)), "type": "chat_template.default"}],
                          sequence_len=256, micro_batch_size=8, max_steps=6, learning_rate=1e-2,
                          lr_scheduler="constant", warmup_steps=0, logging_steps=1)
    result = run_cli(["train", str(config)], plugins=[spy])
    assert result.exit_code == 0, result.stderr[-3000:]
    # a classifier has no vocabulary head to fuse: no warning that reads like a broken causal LM
    assert "no linear output layer" not in result.stderr
    assert "LlamaForSequenceClassification is a classifier" in result.stderr
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.1

    saved = load_file(out / "adapter_model.safetensors")
    score_keys = [k for k in saved if ".score." in k]
    assert len(score_keys) == 1 and any("lora_" in k for k in saved), sorted(saved)
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1),
                                      out).eval()
    trained = model.base_model.model.score.modules_to_save["default"].weight.detach()
    assert torch.equal(trained, saved[score_keys[0]])
    assert (trained - spy.score).abs().max() > 1e-3  # the head trained, not only the adapter
    tokenizer = AutoTokenizer.from_pretrained(out)
    model.config.pad_token_id = tokenizer.pad_token_id
    right = pairs_ranked_right(model, tokenizer, rows)
    assert right >= 6, right


def pairs_ranked_right(model, tokenizer, rows) -> int:
    """How many pairs the saved model scores chosen above rejected, each
    sequence scored alone, as a user of the saved model would."""
    right = 0
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["conversations"][0]["value"]}],
                                                   add_generation_prompt=True, tokenize=False)
            scores = [model(**tokenizer(prompt + row[k]["value"] + "<|im_end|>" + tokenizer.eos_token,
                                        return_tensors="pt")).logits[0, 0] for k in ("chosen", "rejected")]
            right += int(scores[0] > scores[1])
    return right

"""``reward_model: true``: a Bradley-Terry reward model trained on Plait's loop,
saved so plain transformers loads it and scores pairs the way training did."""

from __future__ import annotations

import pytest
import torch

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
    # score each training pair as a user of the saved model would: one sequence at a time
    right = 0
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["conversations"][0]["value"]}],
                                                   add_generation_prompt=True, tokenize=False)
            scores = [model(**tokenizer(prompt + row[k]["value"] + "<|im_end|>" + tokenizer.eos_token,
                                        return_tensors="pt")).logits[0, 0] for k in ("chosen", "rejected")]
            right += int(scores[0] > scores[1])
    assert right / len(rows) == pytest.approx(steps[-1]["rewards/accuracies"], abs=0.26)
    assert right >= 6


def test_reward_model_with_lora_needs_the_head_trained(tiny_model):
    from plait.errors import ConfigError
    from plait.testing import build_run_config

    with pytest.raises(ConfigError, match=r"lora_modules_to_save: \[score\]"):
        build_run_config({"base_model": str(tiny_model), "reward_model": True, "adapter": "lora",
                          "lora_target_linear": True})
    with pytest.raises(ConfigError, match="two different trainings"):
        build_run_config({"base_model": str(tiny_model), "reward_model": True, "rl": "dpo"})

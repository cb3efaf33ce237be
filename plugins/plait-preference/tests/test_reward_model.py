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


class HeadAndScores:
    """The scalar head's weight as training starts (what the run trains from),
    and the trained model's scores of each pair's sequences when it ends (in
    memory, each sequence alone, as :func:`pair_scores` scores them)."""

    def __init__(self, rows):
        self.rows, self.score, self.scores = rows, None, None

    @hookimpl
    def on_train_start(self, run):
        from plait.model.forward import unwrap

        self.score = unwrap(run.model).score.weight.detach().clone()

    @hookimpl
    def on_train_end(self, run):
        self.scores = pair_scores(run.model, run.tokenizer, self.rows)


@pytest.mark.slow  # 4-bit matmuls on a CPU: about a second a step on 2 shared cores
def test_qlora_reward_model_trains_the_head_beside_the_adapter_and_reloads_in_transformers_and_peft(
        tmp_path, tiny_model, write_rows):
    # reward_model + load_in_4bit + qlora: the backbone's linear layers in 4 bits (plait-bnb's config), the
    # score head a plain linear layer. peft's SEQ_CLS wrapper puts score in modules_to_save itself (no key
    # needed): the head trains in full and is saved beside the adapter. Reloaded in plain transformers +
    # peft on the same 4-bit base, the model scores every sequence as the trained one did in memory.
    pytest.importorskip("plait_bnb")
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    from plait.testing import build_run_config, run_cli, write_config

    build_run_config({"base_model": str(tiny_model), "reward_model": True, "adapter": "lora",
                      "lora_target_linear": True, "lora_modules_to_save": ["score"]})  # still allowed
    rows = pair_rows(8, seed=9)
    out, spy = tmp_path / "rm_qlora", HeadAndScores(rows)
    config = write_config(tmp_path / "rm_qlora.yml", base_model=str(tiny_model), output_dir=str(out),
                          reward_model=True, adapter="qlora", load_in_4bit=True, lora_r=8, lora_alpha=16,
                          lora_target_linear=True,
                          datasets=[{"path": str(write_rows(rows)), "type": "chat_template.default"}],
                          sequence_len=256, micro_batch_size=8, max_steps=5, learning_rate=1e-2,
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
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=1, dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",  # plait-bnb's defaults
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    model = PeftModel.from_pretrained(base, out)
    assert type(base.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    head = base.score.modules_to_save["default"]
    assert type(head) is torch.nn.Linear and torch.equal(head.weight.detach(), saved[score_keys[0]])
    assert (head.weight.detach() - spy.score).abs().max() > 1e-3  # the head trained, not only the adapter
    tokenizer = AutoTokenizer.from_pretrained(out)
    model.config.pad_token_id = tokenizer.pad_token_id
    reloaded = pair_scores(model, tokenizer, rows)
    torch.testing.assert_close(reloaded, spy.scores, rtol=1e-4, atol=1e-4)
    assert int((reloaded[:, 0] > reloaded[:, 1]).sum()) >= 6


def pair_scores(model, tokenizer, rows):
    """``[pairs, 2]``: the model's score of each pair's chosen and rejected
    sequence, each scored alone, as a user of the saved model would."""
    was_training = model.training
    model.eval()
    scores = []
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["conversations"][0]["value"]}],
                                                   add_generation_prompt=True, tokenize=False)
            scores.append([model(**tokenizer(prompt + row[k]["value"] + "<|im_end|>" + tokenizer.eos_token,
                                             return_tensors="pt")).logits[0, 0].float() for k in ("chosen", "rejected")])
    model.train(was_training)
    return torch.tensor(scores)


def pairs_ranked_right(model, tokenizer, rows) -> int:
    """How many pairs the saved model scores chosen above rejected, each
    sequence scored alone, as a user of the saved model would."""
    scores = pair_scores(model, tokenizer, rows)
    return int((scores[:, 0] > scores[:, 1]).sum())

"""Per-step losses and rewards equal TRL's on the same tiny model, data and settings.

DPO (full fine-tuning and LoRA) and KTO against TRL's trainers; ORPO and
SimPO against TRL's loss functions on log-probs from a plain transformers
forward. Tolerance: 2e-5 relative (2e-6 absolute), float32 on a CPU: the two
sides batch differently (Plait: a pair is one row of two isolated sequences;
TRL: two padded rows), so sums differ in the last bits. TRL's configs default
to ``bf16=True`` (autocast, also on a CPU): the comparison turns it off.
"""

from __future__ import annotations

import math

import pytest

from plait_preference.testing import kto_rows, pair_rows

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.slow
TOL = dict(rel=2e-5, abs=2e-6)
STEPS = 3
CHATML_USER = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def trl_args(tmp_path, **extra):
    return dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-3,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
                max_grad_norm=1.0, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=42,
                max_length=None, bf16=False, **extra)


def trl_logs(trainer) -> list[dict]:
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry][:STEPS]


def pair_texts(rows):
    """The strings chatml.prompt_pairs makes of the rows, as TRL's plain prompt/chosen/rejected."""
    return [{"prompt": CHATML_USER.format(r["prompt"]), "chosen": r["chosen"] + "<|im_end|>",
             "rejected": r["rejected"] + "<|im_end|>"} for r in rows]


def flat_pairs(n):
    return [{"prompt": r["conversations"][0]["value"], "chosen": r["chosen"]["value"],
             "rejected": r["rejected"]["value"]} for r in pair_rows(n, seed=3)]


def plait_pairs_keys(write_rows, rows, **extra):
    return {"rl": "dpo", "datasets": [{"path": str(write_rows(rows)), "type": "chatml.prompt_pairs"}],
            "micro_batch_size": 4, "max_steps": STEPS, "optimizer": "adamw_torch", "max_grad_norm": 1.0, **extra}


def compare(ours, theirs, keys):
    assert len(ours) == len(theirs) == STEPS
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        for key in keys:
            assert a[key] == pytest.approx(b[key], **TOL), f"step {step} {key}: plait {a[key]} trl {b[key]}"


DPO_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_full_fine_tuning_matches_trl(loss_type, tmp_path, tiny_model, train, write_rows):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = flat_pairs(4)
    ours = train("plait", **plait_pairs_keys(write_rows, rows, dpo_loss_type=[loss_type]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model),
                             args=trl.DPOConfig(**trl_args(tmp_path, beta=0.1, loss_type=[loss_type])),
                             train_dataset=Dataset.from_list(pair_texts(rows)), processing_class=tokenizer)
    compare(ours, trl_logs(trainer), DPO_KEYS)
    if loss_type == "sigmoid":
        assert ours[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_norm_loss_matches_trl_sigmoid_norm(tmp_path, tiny_model, train, write_rows):
    """Axolotl's dpo_norm_loss: the sigmoid loss on per-token average log-ratios, TRL's sigmoid_norm
    (the rewards and log-probs logged stay the summed ones, as TRL logs them)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = flat_pairs(4)
    ours = train("plait", **plait_pairs_keys(write_rows, rows, dpo_norm_loss=True))
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model),
                             args=trl.DPOConfig(**trl_args(tmp_path, beta=0.1, loss_type=["sigmoid_norm"])),
                             train_dataset=Dataset.from_list(pair_texts(rows)),
                             processing_class=AutoTokenizer.from_pretrained(tiny_model))
    compare(ours, trl_logs(trainer), DPO_KEYS)


def test_rpo_matches_trl_sigmoid_plus_sft(tmp_path, tiny_model, train, write_rows):
    """Axolotl's rpo_alpha: TRL's loss_type [sigmoid, sft] with loss_weights [1, alpha]."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = flat_pairs(4)
    ours = train("plait", **plait_pairs_keys(write_rows, rows, rpo_alpha=0.5))
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model),
                             args=trl.DPOConfig(**trl_args(tmp_path, beta=0.1, loss_type=["sigmoid", "sft"],
                                                           loss_weights=[1.0, 0.5])),
                             train_dataset=Dataset.from_list(pair_texts(rows)),
                             processing_class=AutoTokenizer.from_pretrained(tiny_model))
    theirs = trl_logs(trainer)
    compare(ours, theirs, DPO_KEYS)
    assert ours[0]["loss"] > math.log(2) + 0.1  # the NLL term is in the loss


def test_dpo_lora_matches_trl(tmp_path, tiny_model, train, write_rows):
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # one saved starting adapter for both sides (LoRA's A is random: the same draw on each side)
    torch.manual_seed(0)
    start = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    start.save_pretrained(tmp_path / "adapter")
    rows = flat_pairs(4)
    ours = train("plait", **plait_pairs_keys(write_rows, rows, adapter="lora", lora_r=8, lora_alpha=16,
                                             lora_model_dir=str(tmp_path / "adapter")))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "adapter",
                                      is_trainable=True)
    trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(**trl_args(tmp_path, beta=0.1)),
                             train_dataset=Dataset.from_list(pair_texts(rows)),
                             processing_class=AutoTokenizer.from_pretrained(tiny_model))
    compare(ours, trl_logs(trainer), DPO_KEYS)


def test_kto_matches_trl(tmp_path, tiny_model, train, write_rows):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"], "label": r["label"]}
            for r in kto_rows(4, seed=5)]
    ours = train("plait", rl="kto", rl_beta=0.1, kto_desirable_weight=1.0, kto_undesirable_weight=1.5,
                 datasets=[{"path": str(write_rows(rows)), "type": "chatml.prompt_pairs"}], micro_batch_size=4,
                 max_steps=STEPS, optimizer="adamw_torch", max_grad_norm=1.0)
    texts = [{"prompt": CHATML_USER.format(r["prompt"]), "completion": r["completion"] + "<|im_end|>",
              "label": r["label"]} for r in rows]
    trainer = trl.KTOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model),
                             args=trl.KTOConfig(**trl_args(tmp_path, beta=0.1, desirable_weight=1.0,
                                                           undesirable_weight=1.5)),
                             train_dataset=Dataset.from_list(texts),
                             processing_class=AutoTokenizer.from_pretrained(tiny_model))
    compare(ours, trl_logs(trainer), ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                      "logps/chosen", "logps/rejected"))

"""Preference runs through ``plait train``: the first DPO step, packing, the
data layout and the refusals."""

from __future__ import annotations

import json
import math

import pytest

from plait_preference.testing import kto_rows, pair_rows


def dpo_keys(data, **extra):
    return {"rl": "dpo", "datasets": [{"path": str(data), "type": "chat_template.default",
                                       "field_messages": "conversations"}],
            "micro_batch_size": 4, "max_steps": 2, **extra}


def test_first_dpo_step_with_the_policy_as_reference_is_ln2(train, write_rows):
    # LoRA's B starts at zero, so the policy is the reference at step 1
    # all 8 pairs in every step: step 2 sees the pairs step 1 trained on
    steps = train("lora", **dpo_keys(write_rows(pair_rows(8)), micro_batch_size=8, adapter="lora",
                                     lora_target_linear=True))
    first = steps[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == pytest.approx(0.0, abs=1e-6)
    assert first["pairs"] == 8 and first["logps/chosen"] < 0
    assert steps[1]["rewards/margins"] > 0  # one step of DPO already prefers the chosen responses


def test_packed_pairs_give_the_loss_of_unpacked_pairs(train, write_rows):
    data = write_rows(pair_rows(8, seed=1))
    plain = train("plain", **dpo_keys(data, micro_batch_size=8, max_steps=2))
    # every pair in one row of 256 slots: the 8 pairs' sequences are packed into a single bin or two
    packed = train("packed", **dpo_keys(data, micro_batch_size=8, max_steps=2, sample_packing=True))
    for a, b in zip(plain, packed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], rel=1e-4, abs=1e-6)


def test_kto_rows_hold_a_completion_and_a_kl_sequence(tmp_path, tiny_model, write_rows):
    from transformers import AutoTokenizer

    from plait.data.prepare import prepare_datasets
    from plait.testing import build_run_config

    rows = kto_rows(6)
    cfg, pm = build_run_config({"base_model": str(tiny_model), "rl": "kto", "micro_batch_size": 3, "shuffle_merged_datasets": False,
                                "dataset_prepared_path": str(tmp_path / "prep"),
                                "datasets": [{"path": str(write_rows(rows)), "type": "chat_template.default"}]})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    train = prepare_datasets(cfg, pm, tokenizer, show_progress=False).train
    assert len(train) == 6
    for i, row in enumerate(train):
        row = {**row, **json.loads(row["extras"])}
        first, second = row["seq_lens"]
        assert first + second == row["length"]
        assert row["segment_names"] == ["desirable" if rows[i]["label"] else "undesirable", "kl"]
        # the KL sequence is the same prompt with the previous row's completion (wrapping in groups of 3)
        completion = lambda r: [t for t, l in zip(r["input_ids"][:r["seq_lens"][0]], r["labels"])  # noqa: E731
                                if l != -100]
        kl_part = [t for t, l in zip(row["input_ids"][first:], row["labels"][first:]) if l != -100]
        other = train[(i // 3) * 3 + (i - 1) % 3]
        other = {**other, **json.loads(other["extras"])}
        assert kl_part == completion(other)


def test_bad_rows_and_keys_are_named(tmp_path, tiny_model, write_rows):
    from plait.errors import ConfigError, DataError
    from plait.data.prepare import prepare_datasets
    from plait.testing import build_run_config
    from transformers import AutoTokenizer

    with pytest.raises(ConfigError, match="'rl': 'grpo'.*online RL"):
        build_run_config({"base_model": "m", "rl": "grpo"})
    with pytest.raises(ConfigError, match="dpo_loss_type.*'sppo'.*sigmoid, sigmoid_norm, hinge, ipo, robust"):
        build_run_config({"base_model": "m", "rl": "dpo", "dpo_loss_type": ["sppo"]})
    # Axolotl's trl block: beta is rl_beta; blank or off options are fine; online RL's options are named
    cfg, _ = build_run_config({"base_model": "m", "rl": "dpo", "trl": {"beta": 0.05, "use_vllm": False,
                                                                        "max_completion_length": None}})
    assert cfg.rl_beta == 0.05
    with pytest.raises(ConfigError, match="trl.beta .0.05. and rl_beta .0.1. are the same setting"):
        build_run_config({"base_model": "m", "rl": "dpo", "rl_beta": 0.1, "trl": {"beta": 0.05}})
    with pytest.raises(ConfigError, match="trl.num_generations, trl.reward_funcs: TRL's generation options for "
                                          "online RL"):
        build_run_config({"base_model": "m", "rl": "dpo", "trl": {"num_generations": 2, "reward_funcs": ["f"]}})
    with pytest.raises(ConfigError, match="'dpo_norm_loss': true averages the sigmoid loss's log-ratios.*'hinge'"):
        build_run_config({"base_model": "m", "rl": "dpo", "dpo_norm_loss": True, "dpo_loss_type": "hinge"})
    with pytest.raises(ConfigError, match="'dpo_label_smoothing': 0.1 has no per-token form"):
        build_run_config({"base_model": "m", "rl": "dpo", "dpo_norm_loss": True, "dpo_label_smoothing": 0.1})
    with pytest.raises(ConfigError, match="'rpo_alpha': 0.5 adds the chosen responses' NLL.*rl is 'orpo'"):
        build_run_config({"base_model": "m", "rl": "orpo", "rpo_alpha": 0.5})
    with pytest.raises(ConfigError, match="context_parallel_size: 2 is not supported"):
        build_run_config({"base_model": "m", "rl": "kto", "context_parallel_size": 2})
    with pytest.raises(ConfigError, match="'tensor_parallel_size': 2 is not supported with rl: dpo and full "
                                          "fine-tuning with a frozen reference copy; accepted: tensor_parallel_size: "
                                          "1.*precompute_ref_log_probs: true.*adapter: lora"):
        build_run_config({"base_model": "m", "rl": "dpo", "tensor_parallel_size": 2})
    # no copy to build: the precompute pass and the adapter-off base run under TP (test_precompute.py trains both)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WORLD_SIZE", "2")  # as torchrun sets it: the mesh sizes are checked against it
        build_run_config({"base_model": "m", "rl": "kto", "tensor_parallel_size": 2, "precompute_ref_log_probs": True})
        build_run_config({"base_model": "m", "rl": "dpo", "tensor_parallel_size": 2, "adapter": "lora",
                          "lora_target_linear": True})
    with pytest.raises(ConfigError, match="rl_beta set but 'rl' is not"):
        build_run_config({"base_model": "m", "rl_beta": 0.2})
    with pytest.raises(ConfigError, match="'chat_template.default' is a preference dataset type.*set rl: dpo"):
        build_run_config({"base_model": "m", "datasets": [{"path": "x.json", "type": "chat_template.default"}]})
    with pytest.raises(ConfigError, match="'chatml.intell' is not accepted"):
        build_run_config({"base_model": "m", "rl": "dpo", "datasets": [{"path": "x.json", "type": "chatml.intell"}]})
    with pytest.raises(ConfigError, match="'datasets.0.type': 'alpaca' is not a preference dataset type"):
        build_run_config({"base_model": "m", "rl": "dpo", "datasets": [{"path": "x.json", "type": "alpaca"}]})
    rows = pair_rows(3)
    del rows[2]["rejected"]
    cfg, pm = build_run_config({"base_model": str(tiny_model), "rl": "dpo", **{"dataset_prepared_path": str(tmp_path)},
                                "datasets": [{"path": str(write_rows(rows)), "type": "chat_template.default"}]})
    with pytest.raises(DataError, match=r"data\.json.*row 3|row 3.*data\.json") as err:
        prepare_datasets(cfg, pm, AutoTokenizer.from_pretrained(tiny_model), show_progress=False)
    assert "rejected" in str(err.value)


def test_inspect_shows_chosen_and_rejected_and_evaluate_reports_rewards(tmp_path, tiny_model, train, write_rows):
    import json

    from plait.testing import run_cli, write_config

    rows = pair_rows(6, seed=4)
    keys = dpo_keys(write_rows(rows), micro_batch_size=2, max_steps=2, adapter="lora", lora_target_linear=True,
                    val_set_size=2, shuffle_merged_datasets=False)
    steps = train("evaluated", **keys)
    config = write_config(tmp_path / "evaluated.yml", base_model=str(tiny_model), output_dir=str(tmp_path / "evaluated"),
                          dataset_prepared_path=str(tmp_path / "prep"), sequence_len=256, **keys)
    shown = run_cli(["inspect", str(config), "--rows", "1", "--color", "never"])
    assert shown.exit_code == 0, shown.stderr
    chosen_at, rejected_at = shown.stdout.index("[chosen:"), shown.stdout.index("[rejected:")
    assert chosen_at < rejected_at
    # the prompt is masked in both sequences; each response is trained in its own
    assert shown.stdout[chosen_at:rejected_at].count("[[") == 1 and shown.stdout[rejected_at:].count("[[") == 1

    scored = run_cli(["evaluate", str(config), "--json"])
    assert scored.exit_code == 0, scored.stderr
    metrics = json.loads(scored.stdout.strip().splitlines()[-1])
    assert metrics["eval_pairs"] == 2 and "eval_ppl" not in metrics
    assert metrics["eval_rewards/margins"] == pytest.approx(
        metrics["eval_rewards/chosen"] - metrics["eval_rewards/rejected"], abs=1e-6)
    assert metrics["eval_loss"] > 0 and 0 <= metrics["eval_rewards/accuracies"] <= 1
    assert len(steps) == 2

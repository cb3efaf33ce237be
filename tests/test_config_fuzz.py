"""Fuzz: a few hundred mutated configs never give a traceback.

A seeded generator (reproducible; the failing mutation is printed) starts from
a config that trains and changes one to three things: a key set to a value of
another kind or out of range (``true``, ``-5``, ``1e30``, ``.inf``, ``""``, a
list, a mapping), a key removed, a dataset entry's key changed. ``plait config
validate`` must answer each with exit 0 or a message (exit 2), never a
traceback; a sample of the ones it passes must then train two steps on a tiny
model, or stop with a message.
"""

from __future__ import annotations

import copy
import random
import traceback

import pytest

from plait.testing import make_tiny_model, run_cli, write_config, write_jsonl

SEED = 19
N_CONFIGS = 300
N_TRAINED = 4

VALUES = [True, False, None, 0, 1, -1, -5, 2, 0.5, 1.5, 1e30, -1e30, float("inf"), float("nan"), "", "abc",
          "a.module", "true", "1e-4", [], [1, 2], ["x"], {}, {"a": 1}, 2**40, 4096]
KEYS = ["base_model", "sequence_len", "micro_batch_size", "gradient_accumulation_steps", "batch_size", "num_epochs",
        "max_steps", "learning_rate", "weight_decay", "optimizer", "optim_args", "adam_beta1", "adam_beta2",
        "adam_epsilon", "lr_scheduler", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "cosine_min_lr_ratio",
        "max_grad_norm", "loss_watchdog_threshold", "seed", "val_set_size", "output_dir", "dataset_prepared_path",
        "logging_steps", "eval_steps", "evals_per_epoch", "save_steps", "saves_per_epoch", "save_total_limit",
        "resume_from_checkpoint", "auto_resume_from_checkpoints", "sample_packing", "pad_to_sequence_len",
        "train_on_inputs", "bf16", "fp16", "tf32", "flash_attention", "sdp_attention", "gradient_checkpointing",
        "plugins", "disable_plugins", "datasets", "test_datasets", "special_tokens", "tokens", "chat_template",
        "adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear",
        "load_in_4bit", "load_in_8bit", "peft_use_dora", "save_on_signals", "excess_length_strategy",
        "sample_packing_bin_size", "eval_batch_size", "dataset_processes", "skip_bad_rows", "strict"]
DATASET_KEYS = ["path", "type", "ds_type", "split", "shards", "shards_idx", "data_files", "field_instruction",
                "train_on_inputs", "name"]


def mutate(base: dict, rng: random.Random) -> tuple[dict, list[str]]:
    config, said = copy.deepcopy(base), []
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.6:
            key, value = rng.choice(KEYS), rng.choice(VALUES)
            config[key] = copy.deepcopy(value)
            said.append(f"{key}={value!r}")
        elif kind < 0.75:
            key = rng.choice(list(config))
            config.pop(key)
            said.append(f"del {key}")
        elif isinstance(config.get("datasets"), list) and config["datasets"] and \
                isinstance(config["datasets"][0], dict):
            key, value = rng.choice(DATASET_KEYS), rng.choice(VALUES)
            config["datasets"][0][key] = copy.deepcopy(value)
            said.append(f"datasets.0.{key}={value!r}")
    return config, said


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = make_tiny_model(root / "model")
    rows = [{"instruction": f"say {i}", "output": f"{i} {i + 1} {i + 2}"} for i in range(16)]
    data = write_jsonl(root / "train.jsonl", rows)
    return root, {"base_model": str(model), "datasets": [{"path": str(data), "type": "alpaca"}],
                  "sequence_len": 64, "micro_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3,
                  "output_dir": str(root / "out"), "dataset_prepared_path": str(root / "prepared")}


def outcome(args: list[str]) -> tuple[int | None, str]:
    """``(exit code, stderr)``; ``(None, traceback)`` when the command raised."""
    try:
        result = run_cli(args)
    except SystemExit as exc:
        return int(exc.code or 0), ""
    except BaseException:  # noqa: BLE001 - a traceback is exactly what this test looks for
        return None, traceback.format_exc()
    return result.exit_code, result.stderr


@pytest.mark.slow
def test_mutated_configs_never_give_a_traceback(base, tmp_path, monkeypatch):
    root, keys = base
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a mutated base_model is a hub name: no network here
    monkeypatch.chdir(tmp_path)  # relative output paths of mutations land in this test's directory
    rng = random.Random(SEED)
    failures, valid = [], []
    for index in range(N_CONFIGS):
        config, said = mutate(keys, rng)
        path = write_config(tmp_path / f"c{index}.yml", **config)
        code, err = outcome(["config", "validate", str(path)])
        if code not in (0, 2) or "Traceback" in err:
            failures.append(f"validate {said}: exit {code}\n{err[-1500:]}")
        elif code == 0:
            valid.append((path, said))
    assert not failures, f"{len(failures)} of {N_CONFIGS} mutated configs gave a traceback:\n" + "\n".join(failures[:5])
    assert len(valid) > 20, "the mutations leave too few valid configs to train"

    # train a sample of what validate passed: two steps at most, each in its own output_dir
    for index, (path, said) in enumerate(rng.sample(valid, N_TRAINED)):
        code, err = outcome(["train", str(path), "max_steps=2", f"output_dir={tmp_path / f'run{index}'}",
                             "save_steps=null", "saves_per_epoch=null", "eval_steps=null", "evals_per_epoch=null"])
        if code not in (0, 2) or "Traceback" in err:
            failures.append(f"train {said}: exit {code}\n{err[-1500:]}")
    assert not failures, "\n".join(failures)

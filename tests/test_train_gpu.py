"""The loop on a GPU: bf16 autocast, fp16 with float32 master weights and a
GradScaler, LoRA. Skipped without CUDA (a run of these on one H200 passed;
QLoRA and 8-bit optimizers are covered by plait-bnb's tests)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from plait.testing import build_run_config, make_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def counting_rows(n_rows: int, seed: int):
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        n = rng.randint(8, 20)
        ids = list(range(start := rng.randint(10, 60 - n), start + n))  # as in test_train_loop.py
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:], "length": n})
    return Dataset.from_list(rows)


@pytest.mark.parametrize("keys,master_dtype,scaler", [
    ({"bf16": True}, torch.bfloat16, False),
    ({"fp16": True, "bf16": False}, torch.float32, True),
    ({"bf16": True, "adapter": "lora", "lora_target_linear": True, "learning_rate": 1e-2}, torch.float32, False),
    ({"fp16": True, "bf16": False, "adapter": "lora", "lora_target_linear": True, "learning_rate": 1e-2},
     torch.float32, True),
])
def test_gpu_precisions_train(tmp_path, keys, master_dtype, scaler):
    from plait.train.loop import train

    model = make_tiny_model(tmp_path / "model")
    cfg, pm = build_run_config({"base_model": str(model), "output_dir": str(tmp_path / "out"), "learning_rate": 3e-3,
                                "micro_batch_size": 4, "num_epochs": 2, **keys})
    run = train(cfg, pm, data=SimpleNamespace(train=counting_rows(32, 0), eval=counting_rows(8, 1)))
    losses = [r["loss"] for r in run.metrics_log.read() if "loss" in r]
    assert losses[-1] < losses[0] - 0.3, losses
    trainable = next(p for p in run.model.parameters() if p.requires_grad)
    assert trainable.device.type == "cuda" and trainable.dtype == master_dtype
    assert (run.grad_scaler is not None) == scaler

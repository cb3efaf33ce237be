"""Run the Triton kernels on the CPU interpreter when there is no GPU.

Triton decides between compiling and interpreting when a ``@triton.jit``
function is defined, i.e. when ``plait_kernels.ops`` is imported, so the
variable is set here, at conftest import, before any test module imports the
kernels. Other test directories are unaffected on a GPU machine (the variable
is only set without CUDA) and do not run Triton code on a CPU one.
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device():
    """Where the kernels run: the GPU when there is one, else the CPU interpreter."""
    return "cuda" if ON_GPU else "cpu"



@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random-init Llama with its tokenizer (the LoRA fast-path tests)."""
    from plait.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def _copy_task_rows(n: int = 1, length: int = 12, vocab: int = 300, seed: int = 0):
    """``n`` tokenized rows of a copy task a tiny model can learn: the second half
    repeats the first, and only it is trained. Short, and seen every step: the
    interpreter is slow, and the loss on a fixed batch must fall."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(6, vocab, (length,), generator=gen).tolist()[: length // 2] * 2 for _ in range(n)]
    labels = [[-100] * (length // 2) + row[length // 2:] for row in ids]
    return Dataset.from_dict({"input_ids": ids, "labels": labels, "attention_mask": [[1] * length] * n})


@pytest.fixture
def loop_losses(monkeypatch):
    """``loop_losses(model_dir, out_dir, keys, plugins=(), rows=1)``: the per-step
    losses of core's training loop with plait-kernels and ``plugins`` (entry-point
    plugins kept out) over ``rows`` copy-task rows: three steps of micro batch 1 at
    learning rate 1e-2, sequence 16, seed 0, unless ``keys`` say otherwise."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    import plait_kernels.plugin as kernels_plugin
    from plait.testing import build_run_config
    from plait.train.loop import train

    monkeypatch.setenv("PLAIT_LOAD_PLUGINS", "")

    def run(model_dir, out_dir, keys: dict, plugins=(), rows: int = 1) -> list[float]:
        cfg, pm = build_run_config({
            "base_model": str(model_dir), "output_dir": str(out_dir), "micro_batch_size": 1, "max_steps": 3,
            "learning_rate": 1e-2, "lr_scheduler": "constant", "sequence_len": 16, "seed": 0, "val_set_size": 0,
            **keys,
        }, plugins=[kernels_plugin, *plugins])
        train(cfg, pm, data=SimpleNamespace(train=_copy_task_rows(n=rows), eval=None))
        metrics = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
        return [m["loss"] for m in metrics if "loss" in m]

    return run

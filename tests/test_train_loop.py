"""The training loop in process: loss falls, accumulation is exact, bad runs stop
with a message, schedules and events behave, outputs load without Plait.

Data here is pre-tokenized (``train(cfg, pm, data=...)``) so these tests do not
depend on dataset formats; ``test_train_resume.py`` runs the CLI end to end.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from plait import hookimpl
from plait.errors import ConfigError, TrainingError
from plait.testing import build_run_config, make_tiny_model

# optional extras (plait[plot], plait[tensorboard]): the floors environment installs core's required
# dependencies only, so what needs them is checked where they are installed
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("train") / "model")


def counting_rows(n_rows: int, *, length: int | None = None, seed: int = 0, vocab: tuple[int, int] = (10, 60)):
    """Rows of consecutive token ids (``k, k+1, ...``): a pattern a tiny model learns
    in a few steps. The first 3 tokens are the "prompt" (label -100)."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        n = length or rng.randint(8, 20)
        start = rng.randint(vocab[0], vocab[1] - n)
        ids = list(range(start, start + n))
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:], "attention_mask": [1] * n, "length": n})
    return Dataset.from_list(rows)


def data(n_train=32, n_eval=8, **kwargs):
    return SimpleNamespace(train=counting_rows(n_train, **kwargs), eval=counting_rows(n_eval, seed=1, **kwargs))


def run_train(keys: dict, data_, plugins=()):
    from plait.train.loop import train

    cfg, pm = build_run_config(keys, plugins=plugins)
    return train(cfg, pm, data=data_)


def losses(run):
    return [r["loss"] for r in run.metrics_log.read() if "loss" in r]


def test_full_finetune_reduces_loss_and_writes_outputs(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run = run_train({"base_model": str(tiny_model), "output_dir": str(out), "learning_rate": 3e-3,
                     "micro_batch_size": 4, "num_epochs": 3, "evals_per_epoch": 1, "warmup_steps": 2}, data())
    curve = losses(run)
    assert len(curve) == run.total_steps == 24
    assert sum(curve[-4:]) / 4 < curve[0] - 1.0, curve  # from ~6.2 (uniform over 512) to well below

    evals = [r for r in run.metrics_log.read() if "eval_loss" in r]
    assert [e["step"] for e in evals] == [8, 16, 24]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert math.isclose(evals[-1]["eval_ppl"], math.exp(evals[-1]["eval_loss"]), rel_tol=1e-9)

    resolved = (out / "config.resolved.yaml").read_text()
    assert "# source: file\nlearning_rate: 0.003" in resolved and "# source: default\nseed: 42" in resolved
    env = json.loads((out / "environment.json").read_text())
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or env["versions"]["torch"]
    if HAS_MATPLOTLIB:
        assert (out / "loss.png").stat().st_size > 1000
    else:  # without plait[plot] the plot is skipped, the run is not
        assert not (out / "loss.png").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 24 and report["final_loss"] == curve[-1]

    # plain transformers loads the result, and it is the trained model
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    trained = run.model
    torch.testing.assert_close(reloaded.lm_head.weight, trained.lm_head.weight, rtol=0, atol=0)
    assert not torch.equal(reloaded.lm_head.weight, base.lm_head.weight)
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()


def test_lora_reduces_loss_and_saves_a_peft_adapter(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    run = run_train({"base_model": str(tiny_model), "output_dir": str(out), "adapter": "lora",
                     "lora_r": 8, "lora_alpha": 16, "lora_target_linear": True, "learning_rate": 1e-2,
                     "micro_batch_size": 4, "num_epochs": 2}, data())
    curve = losses(run)
    assert sum(curve[-4:]) / 4 < curve[0] - 0.5, curve
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert not (out / "model.safetensors").exists()

    # plain peft on plain transformers reproduces the trained model's logits
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    run.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, run.model(ids).logits, rtol=1e-5, atol=1e-5)


def test_gradient_accumulation_equals_one_large_batch(tiny_model, tmp_path):
    """mb=2 x ga=2 and mb=4 x ga=1 see the same rows per step (the plan shuffles
    rows, then chunks), and the loss is normalised by the window's token count."""
    rows = data(16, 4)
    rows.train = counting_rows(16, seed=3)  # rows of different lengths: padding and token counts differ
    common = {"base_model": str(tiny_model), "learning_rate": 1e-3, "max_steps": 4, "lr_scheduler": "constant",
              "max_grad_norm": 0}
    small = run_train({**common, "output_dir": str(tmp_path / "a"), "micro_batch_size": 2,
                       "gradient_accumulation_steps": 2}, rows)
    large = run_train({**common, "output_dir": str(tmp_path / "b"), "micro_batch_size": 4,
                       "gradient_accumulation_steps": 1}, rows)
    for a, b in zip(losses(small), losses(large)):
        assert abs(a - b) < 1e-6
    worst = max((pa - pb).abs().max().item()
                for pa, pb in zip(small.model.parameters(), large.model.parameters()))
    assert worst < 1e-6, worst


def test_nan_loss_stops_with_the_step_and_keys_to_change(tiny_model, tmp_path):
    # SGD with a huge learning rate: step 1 blows the weights up, step 2's loss is not finite
    with pytest.raises(TrainingError, match=r"at step 2; the weights were not updated.*learning_rate") as info:
        run_train({"base_model": str(tiny_model), "output_dir": str(tmp_path / "nan"), "optimizer": "sgd",
                   "learning_rate": 1e12, "max_grad_norm": 0, "lr_scheduler": "constant", "max_steps": 5}, data())
    assert "max_grad_norm" in str(info.value) and "bf16" in str(info.value)


def test_unknown_optimizer_and_scheduler_fail_before_the_model_loads(tmp_path):
    # the names are registry lookups at config time: the error comes before train() could load anything
    missing = str(tmp_path / "no-such-model")  # loading it would fail differently
    with pytest.raises(ConfigError, match=r"'optimizer': 'adamw_9bit' is not a known optimizer; did you mean "
                                          r"'adamw_8bit'\?\naccepted: .*adamw_torch"):
        build_run_config({"base_model": missing, "output_dir": str(tmp_path), "optimizer": "adamw_9bit"})
    with pytest.raises(ConfigError,
                       match=r"'lr_scheduler': 'cosine_wiggle' is not a known schedule.*\naccepted: cosine"):
        build_run_config({"base_model": missing, "output_dir": str(tmp_path), "lr_scheduler": "cosine_wiggle"})


@pytest.mark.parametrize("name,warmup,min_ratio", [("linear", 2, 0.0), ("cosine", 0, 0.2), ("constant", 3, 0.0)])
def test_logged_learning_rates_follow_the_schedule(tiny_model, tmp_path, name, warmup, min_ratio):
    from plait.builtin.optim import lr_factor

    run = run_train({"base_model": str(tiny_model), "output_dir": str(tmp_path / name), "learning_rate": 1e-3,
                     "lr_scheduler": name, "warmup_steps": warmup, "cosine_min_lr_ratio": min_ratio,
                     "max_steps": 6, "micro_batch_size": 8}, data(16, 0))
    logged = [r["lr"] for r in run.metrics_log.read()]
    expected = [1e-3 * lr_factor(name, step, warmup, 6, min_ratio) for step in range(6)]
    assert logged == pytest.approx(expected, rel=1e-12)
    if warmup:
        assert logged[:warmup + 1] == sorted(logged[:warmup + 1]) and logged[warmup] == pytest.approx(1e-3)


def test_weight_decay_skips_biases_and_norms(tiny_model):
    from transformers import AutoModelForCausalLM

    from plait.model.params import param_groups

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    norms = {id(m.weight) for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}
    assert norms and norms <= {id(p) for p in no_decay["params"]}


# ----------------------------------------------------------------- event hooks


class Recorder:
    """A logger plugin: records what every event hook received."""

    def __init__(self):
        self.events = []

    @hookimpl
    def on_train_start(self, run):
        self.events.append(("start", run.step, run.total_steps, run.model is not None))

    @hookimpl
    def on_step_end(self, run, metrics):
        self.events.append(("step", dict(metrics)))

    @hookimpl
    def on_eval_end(self, run, metrics):
        self.events.append(("eval", dict(metrics)))

    @hookimpl
    def on_train_end(self, run):
        self.events.append(("end", run.step, (Path(run.output_dir) / "model.safetensors").exists()))


@pytest.fixture(scope="module")
def recorded(tiny_model, tmp_path_factory):
    recorder = Recorder()
    out = tmp_path_factory.mktemp("events") / "out"
    run_train({"base_model": str(tiny_model), "output_dir": str(out), "max_steps": 4, "eval_steps": 2,
               "logging_steps": 2, "use_tensorboard": HAS_TENSORBOARD}, data(16, 4), plugins=[recorder])
    return recorder.events, out


def test_hook_on_train_start(recorded):
    events, _ = recorded
    assert events[0] == ("start", 0, 4, True)


def test_hook_on_step_end(recorded):
    events, _ = recorded
    steps = [m for kind, m, *_ in events if kind == "step"]
    assert [m["step"] for m in steps] == [2, 4]  # logging_steps: 2
    assert set(steps[0]) >= {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"}
    assert steps[0]["tokens"] > 0 and steps[0]["tokens_per_s"] > 0


def test_hook_on_eval_end(recorded):
    events, _ = recorded
    evals = [m for kind, m, *_ in events if kind == "eval"]
    assert [m["step"] for m in evals] == [2, 4]
    assert all(m["eval_ppl"] == pytest.approx(math.exp(m["eval_loss"])) for m in evals)


def test_hook_on_train_end(recorded):
    events, out = recorded
    assert events[-1] == ("end", 4, True)  # called after the final save


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="plait[tensorboard] is not installed")
def test_tensorboard_logs_train_and_eval_scalars(recorded):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = recorded
    files = list((out / "runs").rglob("events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    assert {"train/loss", "train/lr", "eval/loss"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]


def test_sample_packing_trains_and_evaluates_like_unpacked(tiny_model, tmp_path):
    from plait.train.loop import evaluate

    run = run_train({"base_model": str(tiny_model), "output_dir": str(tmp_path / "packed"), "sample_packing": True,
                     "sequence_len": 64, "micro_batch_size": 1, "max_steps": 4, "learning_rate": 3e-3}, data(32, 12))
    assert run.steps_per_epoch < 32  # several rows per sequence
    assert losses(run)[-1] < losses(run)[0]
    packed = evaluate(run)
    run.cfg.eval_sample_packing = False
    unpacked = evaluate(run)
    assert packed["eval_tokens"] == unpacked["eval_tokens"]
    assert abs(packed["eval_loss"] - unpacked["eval_loss"]) < 1e-5


def test_a_tracker_that_is_not_installed_is_a_config_error():
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match=r"'wandb_project' asks for wandb, which is not installed; pip install wandb"):
        build_run_config({"base_model": "m", "wandb_project": "demo"})


def test_interval_reads_steps_fractions_and_per_epoch_counts():
    from plait.train.loop import interval

    assert interval(25, None, 10, 100) == 25
    assert interval(0.1, None, 10, 100) == 10  # a fraction of the run, as in Axolotl
    assert interval(None, 4, 10, 100) == 2
    assert interval(None, None, 10, 100) is None


def test_lora_run_stopped_and_resumed_in_process_saves_the_same_adapter(tiny_model, tmp_path):
    """The subprocess tests kill full fine-tunes; this one stops a LoRA run with
    dropout (RNG) by an exception from a plugin after checkpoint-3 and resumes it."""

    class Stop(Exception):
        pass

    class StopAtStep4:
        @hookimpl
        def on_step_end(self, run, metrics):
            if metrics["step"] == 4:
                raise Stop

    keys = {"base_model": str(tiny_model), "adapter": "lora", "lora_target_linear": True, "lora_dropout": 0.2,
            "learning_rate": 1e-2, "micro_batch_size": 4, "max_steps": 7, "save_steps": 3}
    rows = data(12, 4)
    run_train({**keys, "output_dir": str(tmp_path / "whole")}, rows)
    with pytest.raises(Stop):
        run_train({**keys, "output_dir": str(tmp_path / "stopped")}, rows, plugins=[StopAtStep4()])
    assert sorted(p.name for p in (tmp_path / "stopped").glob("checkpoint-*")) == ["checkpoint-3"]
    ckpt = tmp_path / "stopped" / "checkpoint-3"
    assert (ckpt / "model" / "adapter_model.safetensors").exists()  # usable as a peft adapter as is
    resumed = run_train({**keys, "output_dir": str(tmp_path / "stopped"), "auto_resume_from_checkpoints": True}, rows)
    assert resumed.step == 7
    whole = (tmp_path / "whole" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "stopped" / "adapter_model.safetensors").read_bytes() == whole


@pytest.mark.parametrize("loss,threshold,updated", [(2.0, None, True), (float("nan"), None, False),
                                                     (float("inf"), None, False), (9.0, 4.0, False)])
def test_device_side_loss_check_skips_the_fused_update(loss, threshold, updated):
    """The step's loss check on the device (fused AdamW's found_inf): a NaN/inf
    loss, or a mean over loss_watchdog_threshold, leaves weights and step count
    as they were, without the host reading the loss first."""
    from types import SimpleNamespace

    from plait.train.loop import checks_loss_on_device, flag_bad_loss

    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=0.1, fused=True)
    run = SimpleNamespace(optimizer=opt, mesh=None)
    assert checks_loss_on_device(run, scaler=None)
    assert not checks_loss_on_device(run, scaler=object())  # fp16's GradScaler owns found_inf
    assert not checks_loss_on_device(SimpleNamespace(optimizer=torch.optim.AdamW([param], foreach=True), mesh=None),
                                     scaler=None)
    param.grad = torch.ones(3)
    flag_bad_loss(opt, torch.tensor(loss * 2, dtype=torch.float64), 2, threshold)  # 2 tokens: mean = loss
    opt.step()
    assert torch.equal(param.data, torch.ones(3)) != updated
    assert opt.state[param]["step"].item() == (1 if updated else 0)

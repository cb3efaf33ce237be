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


# ------------------------------------------------ defer_step_read: a step read during the next one


class FusedAdamW:
    """torch's fused AdamW on the CPU too (core asks for it on CUDA only): the
    optimizer whose ``found_inf`` lets the loop check the loss on the device,
    and so read each step's values during the next step (``defer_step_read``)."""

    @hookimpl(tryfirst=True)
    def build_optimizer(self, cfg, params):
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)


class StepOrder:
    """Records the order of forward passes (``extra_loss``, once per training
    micro-batch), step ends, evaluations and saves, and keeps the run; adds
    ``terms[k]`` to the loss of the k-th training micro-batch (1-based)."""

    def __init__(self, terms: dict | None = None):
        self.events, self.terms, self.forwards, self.run = [], terms or {}, 0, None

    @hookimpl
    def on_train_start(self, run):
        self.run = run

    @hookimpl
    def extra_loss(self, cfg, model, outputs, batch):
        self.forwards += 1
        self.events.append(("forward", self.forwards))
        term = self.terms.get(self.forwards)
        return None if term is None else torch.tensor(term)

    @hookimpl
    def on_step_end(self, run, metrics):
        # the run is where the step left it: its number, its weights (no later update applied yet)
        self.events.append(("step_end", metrics["step"], run.step))

    @hookimpl
    def on_eval_end(self, run, metrics):
        self.events.append(("eval", metrics["step"]))


def deferred_and_eager(keys: dict, rows, *, terms: dict | None = None, expect=None):
    """The same run with ``defer_step_read`` true and false (fused AdamW):
    ``{defer: (StepOrder, error or None)}``; ``expect`` is the exception class
    the runs are expected to raise."""
    from plait.train.loop import reads_step_late

    results = {}
    for defer in (True, False):
        order = StepOrder(terms)
        raised = None
        try:
            run_train({**keys, "output_dir": keys["output_dir"] + f"-{defer}", "defer_step_read": defer}, rows,
                      plugins=[FusedAdamW(), order])
        except Exception as exc:  # noqa: BLE001 - compared below
            if expect is None or not isinstance(exc, expect):
                raise
            raised = exc
        if expect is not None:
            assert raised is not None, "the run did not stop"
        assert reads_step_late(order.run) is defer
        results[defer] = (order, raised)
    return results


def state_of(run) -> tuple[dict, dict]:
    return ({name: p.detach().clone() for name, p in run.model.named_parameters()},
            {name: {k: v.clone() for k, v in run.optimizer.state[p].items()}
             for name, p in run.model.named_parameters() if p in run.optimizer.state})


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_bitwise_equal(a[key], b[key])
        else:
            assert torch.equal(a[key], b[key]), key


def logged(run, *, timing: bool = False) -> list[dict]:
    return [{k: v for k, v in r.items() if timing or k != "tokens_per_s"} for r in run.metrics_log.read()]


def test_deferred_read_trains_and_logs_bitwise_as_the_eager_read(tiny_model, tmp_path):
    """Two epochs with gradient accumulation, evaluations and saves: every
    logged record (but tokens_per_s), every hook's view and the final weights
    and Adam state are the same; in between, a step is read after the next
    step's forward and backward passes, except before an evaluation, a save or
    an epoch's end, where it is read first."""
    keys = {"base_model": str(tiny_model), "output_dir": str(tmp_path / "run"), "learning_rate": 3e-3,
            "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 9, "warmup_steps": 2,
            "eval_steps": 5, "save_steps": 3}
    results = deferred_and_eager(keys, data(16, 4))  # 4 steps an epoch: two epoch boundaries
    (late, _), (eager, _) = results[True], results[False]
    assert logged(late.run) == logged(eager.run)
    assert [r["step"] for r in logged(late.run) if "loss" in r] == list(range(1, 10))
    assert all(r["tokens_per_s"] > 0 for r in logged(late.run, timing=True) if "loss" in r)
    assert late.run.last_metrics["step"] == 9 and logged(late.run)[-1] == logged(eager.run)[-1]
    assert_bitwise_equal(state_of(late.run)[0], state_of(eager.run)[0])
    assert_bitwise_equal(state_of(late.run)[1], state_of(eager.run)[1])
    assert sorted(p.name for p in (tmp_path / "run-True").glob("checkpoint-*")) == \
        sorted(p.name for p in (tmp_path / "run-False").glob("checkpoint-*"))

    def reads(order):
        """Per step end: how many micro-batches had run forward when it was reported."""
        forwards, seen = 0, {}
        for event in order.events:
            if event[0] == "forward":
                forwards = event[1]
            elif event[0] == "step_end":
                assert event[1] == event[2]  # on_step_end sees run.step at the step it reports
                seen[event[1]] = forwards
        return seen

    assert reads(eager) == {step: 2 * step for step in range(1, 10)}
    # read late: during the next step (2 more micro-batches), but at a save (3, 6, 9), an evaluation (5),
    # an epoch's end (4, 8) and the run's end (9) before the next step
    assert reads(late) == {step: 2 * step + (0 if step in (3, 4, 5, 6, 8, 9) else 2) for step in range(1, 10)}
    assert late.events.index(("eval", 5)) < late.events.index(("forward", 11))


def test_a_nan_loss_read_late_stops_at_its_step_with_the_weights_of_the_step_before(tiny_model, tmp_path):
    """Step 3's loss is NaN: the deferred run has already run step 4's forward
    and backward when it reads step 3, and stops before step 4's update; the
    error, the logged steps, the weights and Adam's step counts are those of
    the eager read, and the weights are those after step 2."""
    keys = {"base_model": str(tiny_model), "output_dir": str(tmp_path / "nan"), "learning_rate": 3e-3,
            "micro_batch_size": 4, "max_steps": 6, "lr_scheduler": "constant"}
    rows = data(32, 0)
    results = deferred_and_eager(keys, rows, terms={3: float("nan")}, expect=TrainingError)
    (late, late_error), (eager, eager_error) = results[True], results[False]
    assert str(late_error) == str(eager_error)
    assert "loss is nan at step 3; the weights were not updated" in str(late_error)
    assert late.forwards == 4 and eager.forwards == 3  # the deferred run read step 3 during step 4
    assert [r["step"] for r in logged(late.run)] == [1, 2] and logged(late.run) == logged(eager.run)
    two = StepOrder()
    run_train({**keys, "output_dir": str(tmp_path / "two"), "max_steps": 2}, rows, plugins=[FusedAdamW(), two])
    for order in (late, eager):
        weights, adam = state_of(order.run)
        assert_bitwise_equal(weights, state_of(two.run)[0])
        assert_bitwise_equal(adam, state_of(two.run)[1])
        assert {float(state["step"]) for state in adam.values()} == {2.0}


@pytest.mark.parametrize("deferred", [False, True], ids=["eager", "deferred"])
def test_lora_run_stopped_and_resumed_in_process_saves_the_same_adapter(tiny_model, tmp_path, deferred):
    """The subprocess tests kill full fine-tunes; this one stops a LoRA run with
    dropout (RNG) by an exception from a plugin after checkpoint-3 and resumes
    it: the uninterrupted run's adapter and metrics. ``deferred``: with fused
    AdamW, so each step is read during the next (the hook of step 4 runs in
    step 5)."""
    from plait.train.loop import reads_step_late

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
    optimizer = [FusedAdamW()] if deferred else []
    order = StepOrder()
    whole = run_train({**keys, "output_dir": str(tmp_path / "whole")}, rows, plugins=[*optimizer, order])
    assert reads_step_late(order.run) is deferred
    if deferred:
        assert ("forward", 5) in order.events[:order.events.index(("step_end", 4, 4))]  # read during step 5
    with pytest.raises(Stop):
        run_train({**keys, "output_dir": str(tmp_path / "stopped")}, rows, plugins=[*optimizer, StopAtStep4()])
    assert sorted(p.name for p in (tmp_path / "stopped").glob("checkpoint-*")) == ["checkpoint-3"]
    ckpt = tmp_path / "stopped" / "checkpoint-3"
    assert (ckpt / "model" / "adapter_model.safetensors").exists()  # usable as a peft adapter as is
    resumed = run_train({**keys, "output_dir": str(tmp_path / "stopped"), "auto_resume_from_checkpoints": True},
                        rows, plugins=optimizer)
    assert resumed.step == 7
    assert (tmp_path / "stopped" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "adapter_model.safetensors").read_bytes()
    assert logged(resumed) == logged(whole)


def test_save_first_step_writes_a_checkpoint_after_step_one_that_resumes(tiny_model, tmp_path):
    """Axolotl's save_first_step: a checkpoint after step 1 besides the save_steps ones; with
    the deferred read (fused AdamW) step 1 is read before it is saved, and a run resumed
    from checkpoint-1 ends with the uninterrupted run's adapter."""
    keys = {"base_model": str(tiny_model), "adapter": "lora", "lora_target_linear": True, "learning_rate": 1e-2,
            "micro_batch_size": 4, "max_steps": 4, "save_steps": 3, "save_first_step": True}
    rows = data(16, 4)
    whole = run_train({**keys, "output_dir": str(tmp_path / "whole")}, rows, plugins=[FusedAdamW()])
    assert sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]
    resumed = run_train({**keys, "output_dir": str(tmp_path / "resumed"),
                         "resume_from_checkpoint": str(tmp_path / "whole" / "checkpoint-1")}, rows,
                        plugins=[FusedAdamW()])
    assert resumed.step == 4
    assert (tmp_path / "resumed" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "adapter_model.safetensors").read_bytes()


def test_one_cycle_schedule_resumes_to_the_uninterrupted_runs_weights(tiny_model, tmp_path):
    """Axolotl's one_cycle (torch's OneCycleLR, which also cycles AdamW's beta1): its state goes into the
    checkpoint and comes back, so a resumed run ends with the uninterrupted run's adapter."""
    keys = {"base_model": str(tiny_model), "adapter": "lora", "lora_target_linear": True, "learning_rate": 1e-2,
            "micro_batch_size": 4, "max_steps": 6, "save_steps": 3, "lr_scheduler": "one_cycle",
            "warmup_steps": 2, "logging_steps": 1}
    rows = data(16, 4)
    whole = run_train({**keys, "output_dir": str(tmp_path / "whole")}, rows)
    lrs = [r["lr"] for r in whole.metrics_log.read() if "lr" in r]
    assert lrs.index(max(lrs)) == 1 and lrs[0] < lrs[1] > lrs[-1]  # peak at the end of the 2-step warm-up
    resumed = run_train({**keys, "output_dir": str(tmp_path / "resumed"),
                         "resume_from_checkpoint": str(tmp_path / "whole" / "checkpoint-3")}, rows)
    assert resumed.step == 6
    assert (tmp_path / "resumed" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "adapter_model.safetensors").read_bytes()


def test_jagged_restarts_dip_the_rate_and_resume_to_the_uninterrupted_runs_weights(tiny_model, tmp_path):
    """Axolotl's jagged restarts on a constant schedule: the rate falls to the floor at every period's start and
    climbs back; the scale follows from the schedule's step, so a resumed run ends with the same adapter."""
    keys = {"base_model": str(tiny_model), "adapter": "lora", "lora_target_linear": True, "learning_rate": 1e-2,
            "micro_batch_size": 4, "max_steps": 6, "save_steps": 3, "lr_scheduler": "constant", "warmup_steps": 0,
            "logging_steps": 1, "jagged_restart_steps": 3, "jagged_restart_warmup_steps": 2,
            "cosine_min_lr_ratio": 0.1}
    rows = data(16, 4)
    whole = run_train({**keys, "output_dir": str(tmp_path / "whole")}, rows)
    lrs = [r["lr"] for r in whole.metrics_log.read() if "lr" in r]
    # the first period at the schedule's rate; the restart at step 3 starts at the floor (0.1), half-way up at 4
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-2, 1e-3, 5.5e-3, 1e-2])
    resumed = run_train({**keys, "output_dir": str(tmp_path / "resumed"),
                         "resume_from_checkpoint": str(tmp_path / "whole" / "checkpoint-3")}, rows)
    assert resumed.step == 6
    assert (tmp_path / "resumed" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "adapter_model.safetensors").read_bytes()


class TouchTrigger:
    """Creates dynamic_checkpoint's trigger file after the given steps, as a user's `touch` would."""

    def __init__(self, path, after_steps):
        self.path, self.after_steps = path, after_steps

    @hookimpl
    def on_step_end(self, run, metrics):
        if metrics["step"] in self.after_steps:
            self.path.touch()


def test_dynamic_checkpoint_saves_when_the_trigger_file_appears(tiny_model, tmp_path):
    """Axolotl's dynamic_checkpoint: the file is looked for every check_interval steps, deleted when seen, and a
    checkpoint is saved after that step; the run goes on to the end."""
    out = tmp_path / "out"
    out.mkdir()
    trigger = out / ".axolotl_save_checkpoint"
    run = run_train({"base_model": str(tiny_model), "output_dir": str(out), "adapter": "lora",
                     "lora_target_linear": True, "micro_batch_size": 4, "max_steps": 5,
                     "dynamic_checkpoint": {"enabled": True, "check_interval": 2}},
                    data(16, 4), plugins=[TouchTrigger(trigger, after_steps={1, 2})])
    # touched after step 1: seen at step 2; touched after step 2: step 3 is not looked at, step 4 is
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert run.step == 5 and not trigger.exists()
    assert all((out / name / "manifest.json").exists() for name in ("checkpoint-2", "checkpoint-4"))
    with pytest.raises(ConfigError, match="enable_signal"):
        build_run_config({"base_model": "m", "dynamic_checkpoint": {"enabled": True, "enable_signal": True}})


@pytest.mark.parametrize("start", [0, 1])
def test_profiler_steps_trace_exactly_the_asked_optimizer_steps(tiny_model, tmp_path, start):
    """Axolotl's profiler_steps / profiler_steps_start: a Chrome trace of optimizer steps start+1 .. start+2
    (Axolotl counts from 0), whatever the loop's deferred step read does; counted by torch's own
    Optimizer.step records in the trace."""
    out = tmp_path / "out"
    run_train({"base_model": str(tiny_model), "output_dir": str(out), "micro_batch_size": 4, "max_steps": 4,
               "profiler_steps": 2, "profiler_steps_start": start}, data(16, 4))
    trace = json.loads((out / "profiler_trace.json").read_text())
    steps = [e for e in trace["traceEvents"] if e.get("name", "").startswith("Optimizer.step#")]
    assert len(steps) == 2
    assert not (out / "snapshot.pickle").exists()  # the allocator history is a GPU's
    cfg, _ = build_run_config({"base_model": "m", "profiler_steps_start": 3})
    assert any("profiler_steps_start is read with profiler_steps" in note for note in cfg.notes)


def test_load_best_model_at_end_saves_the_best_evaluated_checkpoint(tiny_model, tmp_path):
    """A constant learning rate too high for the tiny model: its eval loss is lowest after the first
    step. The final model is that checkpoint's weights; save_total_limit: 1 keeps it beside the newest."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    run = run_train({"base_model": str(tiny_model), "output_dir": str(out), "learning_rate": 0.5,
                     "lr_scheduler": "constant", "warmup_steps": 0, "micro_batch_size": 4, "max_steps": 5,
                     "eval_steps": 1, "save_steps": 1, "save_total_limit": 1, "load_best_model_at_end": True,
                     "val_set_size": 0.2},
                    data(16, 8))
    evals = {r["step"]: r["eval_loss"] for r in run.metrics_log.read() if "eval_loss" in r}
    best = min(evals, key=evals.get)
    assert best < 5, evals  # the case this test is for: the last step is not the best
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted({f"checkpoint-{best}", "checkpoint-5"})
    final, kept = load_file(out / "model.safetensors"), load_file(out / f"checkpoint-{best}" / "trainable.safetensors")
    assert kept.keys() == final.keys()
    assert all(torch.equal(final[k], kept[k]) for k in kept)
    last = load_file(out / "checkpoint-5" / "trainable.safetensors")
    assert not all(torch.equal(final[k], last[k]) for k in last)


def test_load_best_model_at_end_needs_an_evaluation_at_every_checkpoint(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="does not evaluate during training"):
        build_run_config({"base_model": "m", "load_best_model_at_end": True, "save_steps": 2})
    with pytest.raises(ConfigError, match="writes no checkpoints during training"):
        build_run_config({"base_model": "m", "load_best_model_at_end": True, "val_set_size": 0.1, "eval_steps": 2})
    with pytest.raises(ConfigError, match="saves every 3 steps and evaluates every 2"):
        run_train({"base_model": str(tiny_model), "output_dir": str(tmp_path / "out"), "micro_batch_size": 4,
                   "max_steps": 4, "eval_steps": 2, "save_steps": 3, "val_set_size": 0.1,
                   "load_best_model_at_end": True}, data(16, 8))

"""The training loop, readable top to bottom.

:func:`train` is the whole recipe::

    config -> process group, pre-flight (plait.train.preflight), seeds,
              the checkpoint to resume from (verified), output_dir
           -> tokenizer (+ tokenizer_loaded fixes) -> datasets (tokenized, split)
           -> model (plait.pipeline.setup_model: load, gradient checkpointing,
              device, adapters, kernels) -> parallel wrapper
           -> loss step, optimizer, schedule -> room for a checkpoint? -> resume?
           -> for each optimizer step: collate + shard_batch each micro-batch,
              forward, loss (+ extra_loss terms), backward; clip, step,
              log, evaluate, checkpoint; a save_on_signals signal: save, stop
           -> final eval, save, loss plot

Every component comes from a hook (see :mod:`plait.hookspecs`), so plugins
replace the parts; nothing here knows about LoRA, quantization or sharding.

Gradient accumulation divides every micro-batch's summed loss by the number of
trained units of the *whole* accumulation window (all ranks), so training with
``micro_batch_size=2, gradient_accumulation_steps=2`` is the same step as
``micro_batch_size=4, gradient_accumulation_steps=1``. The objective
(``build_objective``) says what a unit is and computes the loss: trained
tokens and their cross-entropy by default, preference pairs for DPO.

Several processes (``torchrun``/``accelerate launch`` set ``WORLD_SIZE``):
the process group is initialised (NCCL on GPUs, gloo on the CPU) and
``wrap_parallel`` is asked with ``mesh=None`` (plait-parallel builds the mesh
from the config and records it with ``plait.model.mesh.attach_mesh``). When no plugin
answers, the model is replicated with DDP. Data is dealt by the mesh's ``dp``
dimension; every micro-batch goes through ``shard_batch`` (context parallel:
each rank keeps a slice of every sequence); only rank 0 prints and writes;
logged metrics are summed over ranks, counting the tokens that tensor-parallel
ranks share once. Under tensor parallel the head weight is a replicated
DTensor, and the loss (computed outside the model) uses its local tensor.

With ``sample_packing`` the share of packed token slots holding real tokens is
printed and written to ``metrics.jsonl`` once per epoch
(``sample_packing_efficiency``); ``input_tokens``/``tokens_per_s`` count real
tokens only, from the rows' lengths, never pad slots.

One process with torch's fused Adam/AdamW (and no fp16 scaler) checks each
step's loss on the device (the optimizer's ``found_inf`` holds a NaN or
watchdog step's update back) and reads the step's values on the host during
the next step, once that step's backward pass is queued and before its update
is (``defer_step_read``): the accelerator then always has work queued while
the host logs and sets up. Steps before an evaluation, a save, a stop or an
epoch's end are read before the next one starts; training is bitwise the
same either way.

Precision: weights come in the dtype ``load_model`` chose (``bf16``/``fp16``
on a GPU); on a GPU the forward runs under autocast, fp16 keeps float32
master weights and a ``GradScaler``. The CPU trains in the weights' dtype
(float32 unless ``bf16: true``/``full`` asks for pure bfloat16).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers.utils import logging as hf_logging

from plait.config.axolotl_keys import NO_OP_KEYS
from plait.data.batching import materialize, plan_batches, row_lengths, to_device
from plait.data.packing import sample_packing_efficiency
from plait.data.prepare import prepare_datasets
from plait.errors import ConfigError, PluginError, TrainingError
from plait.logs import verbose
from plait.model.batch import drop_full_attention_mask
from plait.model.forward import forward_hidden, forward_logits, head_plan
from plait.model.head import eaft_of, logits_cross_entropy
from plait.model.loading import compute_dtype
from plait.model.mesh import mesh_of
from plait.model.params import optimizer_param_groups
from plait.output import MetricsLog, plot_loss, save_final, write_environment, write_report, write_resolved_config
from plait.pipeline import placed_by_config, setup_model, setup_tokenizer
from plait.plugins import call_required, no_result_error
from plait.train import checkpoint
from plait.train import generation, sample_generation, save_trigger
from plait.train.best import best_checkpoint, check_schedule
from plait.train.collector import freeze_setup_objects, unfreeze_setup_objects
from plait.train.generation import ACCEPTED_METRICS, check_unsharded
from plait.train.distributed import (World, _dim_names, all_reduce_sum, close_distributed, data_parallel_group,
                                     data_parallel_rank_and_size, init_distributed, loss_divisor, set_seed)
from plait.train.lisa import Lisa
from plait.train.metric_sums import MetricSums
from plait.train.prefetch import StepPrefetcher
from plait.train.preflight import preflight
from plait.train.progress import Progress
from plait.train.signals import StopOnSignals, TrainingStopped

if TYPE_CHECKING:  # annotations only
    import datasets
    import pluggy
    from torch.distributed.device_mesh import DeviceMesh
    from transformers import PreTrainedTokenizerBase

    from plait.config.schema import CoreConfig


class Objective(Protocol):
    """What ``build_objective`` returns (see :func:`plait.hookspecs.build_objective`)."""

    unit: str
    perplexity: bool

    def count(self, batch: dict) -> int: ...

    def loss(self, run: Run, batch: dict, *, training: bool = False) -> tuple[Any, dict]: ...


@dataclass
class Run:
    """Everything one training run holds; what event hooks receive.

    Core keeps its state in the typed fields below, plugins may read them.
    ``extras`` belongs to plugins alone: each keeps its own state there under
    its own name (a tracker's writer: ``run.extras["tensorboard"]``); core
    never reads it.
    """

    cfg: CoreConfig
    pm: pluggy.PluginManager
    output_dir: Path
    world: Optional[World] = None
    tokenizer: Optional[PreTrainedTokenizerBase] = None
    #: the ready model: adapters, kernels and parallel wrapper applied (:func:`build_model`)
    model: Optional[torch.nn.Module] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
    #: ``loss(hidden, head_weight, labels) -> (loss_sum, n_tokens)`` (``build_loss``)
    loss_fn: Optional[Callable[..., tuple]] = None
    #: what a step minimises and how micro-batches are weighed (``build_objective``)
    objective: Optional[Objective] = None
    #: tokenized rows (a ``datasets.Dataset``); eval_data is None without an eval split
    train_data: Optional[datasets.Dataset] = None
    eval_data: Optional[datasets.Dataset] = None
    #: the mesh ``wrap_parallel`` sharded the model over; None for one process or DDP
    mesh: Optional[DeviceMesh] = None
    dp_rank: int = 0
    dp_size: int = 1
    #: the process group of the ``dp_size`` ranks holding different rows of a step (for an objective's
    #: statistic over the step's whole batch, all-reduced over it); None when ``dp_size`` is 1
    dp_group: Optional[Any] = None
    #: every training row's length, in dataset order (what batches are planned from)
    train_lengths: list[int] = field(default_factory=list)
    total_steps: int = 0
    steps_per_epoch: int = 0
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    #: per-plugin state, each plugin under its own name: ``run.extras["tensorboard"]``; core never uses it
    extras: dict[str, Any] = field(default_factory=dict)
    #: ``metrics.jsonl`` (main rank only; None on the others)
    metrics_log: Optional[MetricsLog] = None
    #: ``eval_predictions.jsonl`` (``eval_table_size``), a MetricsLog of table rows; rank 0
    prediction_table: Optional[MetricsLog] = None
    #: generate_samples' records (generation_samples.jsonl), main rank
    sample_log: Optional[MetricsLog] = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    #: fp16 on a GPU: the loss scaler (its state is saved in checkpoints)
    grad_scaler: Optional[torch.amp.GradScaler] = None
    #: the step a resumed run started from; None for a fresh run
    resumed_at_step: Optional[int] = None
    #: the last checkpoint the periodic saves (save_steps/saves_per_epoch) wrote; None before the first
    saved_checkpoint: Optional[Path] = None
    #: save_on_signals: the installed handlers, and whether any rank received one in the last step
    signals: Optional[StopOnSignals] = None
    stop_requested: bool = False
    #: dynamic_checkpoint: the trigger file was seen after the step just read (agreed over the ranks)
    save_requested: bool = False
    #: sample_packing: this epoch's share of packed token slots holding real tokens
    sample_packing_efficiency: Optional[float] = None
    #: the parameters that train, gathered once for gradient clipping
    trainable_params: Optional[list[torch.nn.Parameter]] = None
    #: early_stopping_patience: the best eval loss and evaluations since it improved
    best_eval_loss: Optional[float] = None
    evals_without_improvement: int = 0
    #: save_strategy: best: the lowest eval_loss so far (None: none yet), and whether a resumed
    #: run's earlier evaluations (metrics.jsonl) were read into it
    best_metric: Optional[float] = None
    best_metric_read: bool = False
    #: lisa_n_layers: which decoder layers train in this period (plait.train.lisa)
    lisa: Optional[Lisa] = None
    #: do_causal_lm_eval / eval_table_size: whether the rows generation skips were reported (once a run)
    generation_skips_said: bool = False
    #: loss_watchdog_threshold: steps in a row whose loss exceeded it
    high_loss_steps: int = 0
    #: ``(epoch, data ranks, rows) -> sha256`` of the packing plan, for checkpoints (plait.train.checkpoint)
    packing_plan_digest: Optional[tuple[tuple[int, int, int], str]] = None
    #: the handles of the plugins' ``install_step_hooks``, removed when training ends
    step_hooks: list[Any] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def world_size(self) -> int:
        return self.world.world_size

    @property
    def is_main(self) -> bool:
        return self.world.rank == 0

    def forward_precision(self):
        """The mixed-precision context the loop's training and eval forwards run under
        (:func:`autocast`), for a plugin's own forwards outside the step (plait-preference's
        reference scoring) to compute as the step does."""
        return autocast(self)

    @property
    def device(self) -> torch.device:
        return self.world.device

    #: where batches go when the loader placed the model itself over several devices (device_map): the
    #: input embeddings' device; ``None``: :attr:`device`
    input_device: Any = None

    def cross_entropy(self, batch, *, training: bool = False):
        """:func:`loss_of` on this run: the default objective's loss."""
        return loss_of(self, batch, training=training)

    def position(self) -> dict:
        """Where the run is; a checkpoint stores this to resume the data order."""
        return {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "total_steps": self.total_steps}


# ------------------------------------------------------------------ recipe


def train(cfg, pm, *, data=None) -> Run:
    """Train as ``cfg`` says and save the result in ``cfg.output_dir``.

    ``data`` (an object with ``.train`` and ``.eval`` datasets of tokenized
    rows) skips dataset preparation; tests use it.
    """
    if not verbose():
        hf_logging.disable_progress_bar()  # per-file load/save bars would bury the training bar
    world = init_distributed(cfg.ddp_timeout)
    run = Run(cfg=cfg, pm=pm, output_dir=Path(cfg.output_dir), world=world)
    try:
        # what `plait config validate` checks too: data files, output dirs, resume, flash-attn;
        # the resume checkpoint is hashed once, by resume_path below
        checks = preflight(cfg, check_data=data is None, verify_checkpoint=False)
        for note in checks.notes:
            log(run, f"note: {note}")
        checks.raise_for_problems()
        set_seed(cfg.seed)
        resume_from = checkpoint.resume_path(cfg, say=partial(log, run))
        start_output(run, resume_from)
        for note in cfg.notes:
            log(run, f"note: {note}")
        if cfg.ignored_keys:
            log(run, "ignoring keys that change nothing in Plait: " + "; ".join(
                f"{key} ({NO_OP_KEYS[key]})" for key in cfg.ignored_keys))

        run.tokenizer = setup_tokenizer(cfg, pm)
        if data is None:
            data = prepare_datasets(cfg, pm, run.tokenizer)
        run.train_data, run.eval_data = data.train, getattr(data, "eval", None)
        if run.train_data is None or len(run.train_data) == 0:
            raise TrainingError("the training set is empty; check datasets: and val_set_size")

        run.model = build_model(run)
        check_unsharded(run)  # generation in eval: refused now, not at the first evaluation
        run.loss_fn = call_required(pm, "build_loss", cfg=cfg, model=run.model)
        run.objective = call_required(pm, "build_objective", cfg=cfg, model=run.model, loss_fn=run.loss_fn)
        plan_schedule(run)
        run.optimizer, run.scheduler = build_optimizer_and_scheduler(run)
        run.step_hooks = install_step_hooks(run)
        if cfg.lisa_n_layers:
            # after the optimizer: it holds every layer, each trains with its own state when chosen
            run.lisa = Lisa(cfg, run.model, run.world_size)
        # every rank (all stop together): before the first step, not at the first save
        checkpoint.check_room(run)
        if cfg.fp16 and run.device.type == "cuda":
            run.grad_scaler = torch.amp.GradScaler("cuda")

        if resume_from is not None:
            position = checkpoint.load_checkpoint(run, resume_from)
            run.step, run.epoch, run.step_in_epoch = position["step"], position["epoch"], position["step_in_epoch"]
            run.resumed_at_step = run.step
            log(run, f"resumed from {resume_from} at step {run.step}")
            if not position["optimizer_state"]:
                log(run, f"warning: {resume_from} was saved with save_only_model: true and holds no optimizer state; "
                         f"the optimizer starts fresh (zero moments) at step {run.step}, so this run is not the same "
                         f"as an uninterrupted one (weights, schedule, RNG and data position are restored)")
            if position.get("total_steps") not in (None, run.total_steps):
                log(run, f"warning: the checkpoint planned {position['total_steps']} steps, this run "
                         f"{run.total_steps}; the learning-rate schedule follows the new length from here")


        if run.is_main:
            run.metrics_log = MetricsLog(run.output_dir, resume_step=run.step if resume_from else None)
            if cfg.eval_table_size:
                from plait.train.generation import TABLE_FILE

                run.prediction_table = MetricsLog(run.output_dir, resume_step=run.step if resume_from else None,
                                                  name=TABLE_FILE)
            if cfg.generate_samples:
                run.sample_log = MetricsLog(run.output_dir, resume_step=run.step if resume_from else None,
                                            name=sample_generation.SAMPLES_FILE)
        pm.hook.on_train_start(run=run)
        train_epochs(run)
        finish(run)
        return run
    finally:
        remove_step_hooks(run)
        close_distributed(world)


def start_output(run: Run, resume_from) -> None:
    """Create ``output_dir`` with the resolved config and the environment."""
    if not run.is_main:
        return
    try:
        run.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:

        raise ConfigError(f"config key 'output_dir': {str(run.output_dir)!r} cannot be created: "
                          f"{exc.strerror or exc}") from None
    for partial_save in checkpoint.remove_partial_saves(run.output_dir):
        log(run, f"removed {partial_save}: a save that never finished")
    earlier = checkpoint.list_checkpoints(run.output_dir)
    if earlier and resume_from is None:
        log(run, f"warning: {run.output_dir} holds checkpoints of an earlier run ({earlier[-1].name}); starting over "
                 f"(set auto_resume_from_checkpoints: true to continue it); they are overwritten as steps repeat")
    write_resolved_config(run.cfg, run.output_dir)
    write_environment(run.output_dir, run.pm, run.world_size)


def build_model(run: Run):
    """:func:`plait.pipeline.setup_model` for training, then ``wrap_parallel``
    when the run spans several processes (DDP when no plugin answers)."""
    cfg, pm = run.cfg, run.pm
    model = setup_model(cfg, pm, run.tokenizer, for_training=True, device=run.device,
                        train_data=run.train_data, say=partial(log, run))
    if placed_by_config(cfg):
        # device_map / max_memory: from_pretrained placed (split) the model, setup_model left it there
        run.input_device = model.get_input_embeddings().weight.device
        log(run, f"device_map: the model is placed by from_pretrained ({describe_placement(model)}); batches go to "
                 f"{run.input_device}")
    if run.world_size > 1:
        wrapped = pm.hook.wrap_parallel(cfg=cfg, model=model, mesh=None)
        if wrapped is None:
            # no parallel plugin answered: replicate with DDP (every rank holds the whole model)
            ids = [run.device.index] if run.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=ids)
        model = wrapped
        run.mesh = mesh_of(model)
        layout = describe_mesh(run.mesh) if run.mesh is not None else "DistributedDataParallel (replicated)"
        log(run, f"parallel: {layout} over {run.world_size} processes")
    run.dp_rank, run.dp_size = data_parallel_rank_and_size(run.mesh, run.world)
    run.dp_group = data_parallel_group(run.mesh, run.world)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(run, f"model: {trainable:,} trainable of {total:,} parameters")
    return model


def describe_placement(model) -> str:
    """Modules per device of a device-mapped model, e.g. ``cuda:0: 14 modules, cuda:1: 13 modules``."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return f"all on {model.get_input_embeddings().weight.device}"
    counts: dict[str, int] = {}
    for device in device_map.values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    return ", ".join(f"{device}: {n} module{'s' if n > 1 else ''}" for device, n in counts.items())


def plan_schedule(run: Run) -> None:
    """Optimizer steps per epoch and in total (``max_steps`` wins over ``num_epochs``)."""
    cfg = run.cfg
    run.train_lengths = row_lengths(run.train_data)
    micro_batches = len(plan_batches(cfg, run.train_lengths, 0, run.dp_rank, run.dp_size))
    if micro_batches == 0:
        raise TrainingError(f"{len(run.train_lengths)} training rows give no micro-batch on {run.dp_size} ranks")
    run.steps_per_epoch = math.ceil(micro_batches / cfg.gradient_accumulation_steps)
    run.total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * run.steps_per_epoch))


def build_optimizer_and_scheduler(run: Run):
    cfg, pm = run.cfg, run.pm
    groups = optimizer_param_groups(cfg, pm, run.model)
    for group in groups:
        if "lr" in group:
            log(run, f"learning rate {group['lr']:g} (peak) for {len(group['params'])} parameter tensors")
    optimizer = call_required(pm, "build_optimizer", cfg=cfg, params=groups)
    scheduler = call_required(pm, "build_scheduler", cfg=cfg, optimizer=optimizer, total_steps=run.total_steps)
    return optimizer, scheduler


def install_step_hooks(run: Run) -> list:
    """Every plugin's ``install_step_hooks`` answer: the handles to remove when training ends."""
    handles = []
    for answer in run.pm.hook.install_step_hooks(cfg=run.cfg, model=run.model, optimizer=run.optimizer,
                                                 step_of=lambda: run.step):
        for handle in answer or ():
            if not callable(getattr(handle, "remove", None)):
                raise PluginError(f"install_step_hooks returned {handle!r}, which has no remove(); return the "
                                  f"handles torch's register_*_hook calls give back, or None")
            handles.append(handle)
    return handles


def remove_step_hooks(run: Run) -> None:
    """Take the plugins' step hooks off the optimizer and model (the model outlives the run in tests and
    ``plait evaluate``-style reuse; a hook reading a finished run's step must not stay on it)."""
    for handle in run.step_hooks:
        handle.remove()
    run.step_hooks = []


# ------------------------------------------------------------------ the loop


def train_epochs(run: Run) -> None:
    """Step until ``total_steps``, epoch after epoch; resumes mid-epoch."""
    cfg = run.cfg
    eval_every = interval(cfg.eval_steps, cfg.evals_per_epoch, run.steps_per_epoch, run.total_steps)
    save_every = interval(cfg.save_steps, cfg.saves_per_epoch, run.steps_per_epoch, run.total_steps)
    if cfg.load_best_model_at_end:
        check_schedule(cfg, eval_every, save_every)
    progress = Progress(run)
    prefetch = StepPrefetcher(partial(collate_window, run))
    signals = run.signals = StopOnSignals(cfg.save_on_signals)
    signals.install()
    # defer_step_read: a step's values are read during the next step (train_step's after_backward), so the
    # device has the next step's work queued while the host reads, logs and prepares; a step the loop does
    # more with (evaluate, save, stop, an epoch's or the run's end, a LISA switch) is read before the next starts
    deferred = reads_step_late(run)
    queued: QueuedStep | None = None  # the step whose values are still to be read

    def read_and_log(step: QueuedStep, ended: float | None = None) -> dict:
        metrics = read_queued_step(run, step, ended)
        log_step(run, metrics, progress)
        return metrics

    freeze_setup_objects()  # no full garbage collection walks the model and libraries mid-step
    try:
        while run.step < run.total_steps:
            plan = plan_batches(cfg, run.train_lengths, run.epoch, run.dp_rank, run.dp_size)
            if cfg.sample_packing and run.step_in_epoch == 0:
                log_packing_efficiency(run, plan)
            ga = cfg.gradient_accumulation_steps
            windows = [plan[i:i + ga] for i in range(0, len(plan), ga)]
            for index in range(run.step_in_epoch, len(windows)):
                earlier = partial(read_and_log, queued, time.perf_counter()) if queued is not None else None
                try:
                    switch_lisa_layers(run)
                    result = train_step(run, windows[index], prefetch.get(run.epoch, windows, index),
                                        before_last_backward=partial(prefetch.start, run.epoch, windows, index + 1),
                                        after_backward=earlier, defer=deferred)
                except Exception:
                    if queued is not None and not queued.taken:
                        # this step failed before reading the one before: read that first, as the eager read
                        # would have (a NaN there is the error to report; else its metrics are logged)
                        read_and_log(queued)
                    raise
                queued = None
                run.step_in_epoch = index + 1
                if isinstance(result, QueuedStep):
                    if not must_read_now(run, index, len(windows), eval_every, save_every):
                        queued = result
                        continue
                    metrics = read_and_log(result)
                else:
                    metrics = result
                    log_step(run, metrics, progress)
                improved = False
                if eval_every and run.step % eval_every == 0 and run.eval_data is not None:
                    metrics = evaluate_and_log(run)
                    progress.write(format_eval(metrics))
                    improved = is_new_best(run, metrics)
                    if stop_early(run, metrics):
                        return
                # save_strategy: best saves after an evaluation that beat every earlier one
                saved = saves_after(cfg, run.step, save_every) or improved or run.save_requested
                if run.save_requested:
                    log(run, f"dynamic_checkpoint: the trigger file was there after step {run.step}; saving")
                if saved:
                    # event plugins (W&B's wandb_log_model: checkpoint) read it at the next on_step_end/on_train_end
                    run.saved_checkpoint = checkpoint.save_checkpoint(run)
                # several ranks stop together on the step's all-reduced vote; one process need not wait for it
                if run.stop_requested or (run.world_size == 1 and signals.received):
                    stop_on_signal(run, saved)
                if run.step >= run.total_steps:
                    break
            else:
                run.epoch, run.step_in_epoch = run.epoch + 1, 0
    finally:
        unfreeze_setup_objects()
        signals.restore()
        prefetch.close()
        progress.close()


def must_read_now(run: Run, index: int, n_windows: int, eval_every, save_every) -> bool:
    """Whether the step just queued (``defer_step_read``) is read before the
    next one starts: the loop evaluates, saves or stops after it, the epoch or
    the run ends with it, or LISA switches layers before the next step; every
    boundary where the loop or a hook reads the run's state sees it complete,
    as it would without the deferred read."""
    step, signals, lisa = run.step, run.signals, run.lisa
    return bool(step >= run.total_steps or index == n_windows - 1
                or (eval_every and step % eval_every == 0 and run.eval_data is not None)
                or saves_after(run.cfg, step, save_every) or save_trigger.looks_at(run.cfg, step)
                or run.stop_requested or (signals is not None and signals.received)
                or (lisa is not None and lisa.switches_before(step)))


def saves_after(cfg, step: int, save_every) -> bool:
    """Whether the loop writes a checkpoint after ``step``: every ``save_every``
    steps, and after the first one with ``save_first_step``."""
    return bool(save_every and step % save_every == 0) or (cfg.save_first_step and step == 1)


def switch_lisa_layers(run: Run) -> None:
    """LISA: train the decoder layers chosen for this step's period (from seed and step)."""
    lisa = run.lisa
    if lisa is not None and lisa.before_step(run.step):
        run.trainable_params = None  # the clipped set follows the trained layers
        log(run, f"lisa: step {run.step + 1}: training decoder layers {lisa.active} of {len(lisa.layers)}")


def stop_on_signal(run: Run, saved: bool) -> None:
    """A signal of ``save_on_signals`` arrived during the step that just ended
    (on any rank): save this step's checkpoint unless it was just saved, and stop."""
    name = run.signals.received or "SIGTERM"  # another rank's signal: this one saw none
    path = run.output_dir / f"checkpoint-{run.step}"
    if not saved:
        path = checkpoint.save_checkpoint(run)
    raise TrainingStopped(
        f"received {name}: stopped after step {run.step} of {run.total_steps} and saved {path}; rerun the same "
        f"command with auto_resume_from_checkpoints: true (or resume_from_checkpoint: {path}) to continue", name)


def log_packing_efficiency(run: Run, plan) -> float:
    """Share of the epoch's packed token slots holding real tokens (all data
    ranks), printed and written to ``metrics.jsonl`` once per epoch."""
    bins = sum(len(micro_batch) for micro_batch in plan)
    slots = bins * run.cfg.sequence_len
    used = sample_packing_efficiency(plan, run.train_lengths, run.cfg.sequence_len) * slots
    # every rank of a tensor/context-parallel group holds the same plan: count each data rank once
    used, slots = (v / data_replicas(run) for v in all_reduce_sum([used, slots], run.device))
    efficiency = used / slots if slots else 0.0
    run.sample_packing_efficiency = efficiency
    if run.is_main:
        log(run, f"epoch {run.epoch}: sample packing efficiency {efficiency:.1%} "
                 f"({int(used):,} tokens in {int(slots):,} slots)")
        # a resumed run's metrics.jsonl already holds the record of the epoch it resumed in
        if run.metrics_log is not None and (run.resumed_at_step is None or run.step > run.resumed_at_step):
            run.metrics_log.append({"step": run.step, "epoch": run.epoch, "sample_packing_efficiency": efficiency})
    return efficiency


def data_replicas(run: Run) -> int:
    """Ranks holding the same micro-batch before context-parallel sharding
    (the tensor- and context-parallel ranks of one data rank)."""
    return max(1, run.world_size // max(run.dp_size, 1))


def token_replicas(run: Run) -> int:
    """Ranks holding the same tokens after sharding (tensor-parallel ranks):
    sums over all ranks are divided by this so every token counts once."""
    return max(1, data_replicas(run) // mesh_size(run.mesh, "cp"))


def describe_mesh(mesh) -> str:
    """``mesh dp_replicate 1 x dp_shard 2 x cp 1 x tp 1``: the named dimensions and their sizes."""
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if not names:
        return f"mesh of {mesh.size()} ranks"
    return "mesh " + " x ".join(f"{name} {mesh[name].size()}" for name in names)


def mesh_size(mesh, name: str) -> int:
    """Size of a named mesh dimension; 1 without a mesh or without that dimension."""
    if mesh is None or name not in _dim_names(mesh):
        return 1
    return mesh[name].size()


def stop_early(run: Run, metrics: dict) -> bool:
    """``early_stopping_patience``: whether the eval loss has failed to improve
    on its best for that many evaluations in a row (HF's EarlyStoppingCallback)."""
    patience = run.cfg.early_stopping_patience
    if not patience:
        return False
    loss = metrics["eval_loss"]
    best = run.best_eval_loss
    if best is None or loss < best:
        run.best_eval_loss, run.evals_without_improvement = loss, 0
        return False
    run.evals_without_improvement += 1
    if run.evals_without_improvement < patience:
        return False
    log(run, f"early_stopping_patience: eval_loss has not improved on {best:.4f} for {patience} evaluations; "
             f"stopping at step {run.step} of {run.total_steps}")
    return True


def is_new_best(run: Run, metrics: dict) -> bool:
    """``save_strategy: best``: whether this evaluation's ``eval_loss`` (the
    ``metric_for_best_model``) is below every earlier one of the run. A resumed
    run finds the earlier ones in ``metrics.jsonl``, so the same steps save."""
    if run.cfg.save_strategy != "best":
        return False
    if not run.best_metric_read:
        earlier = [r["eval_loss"] for r in (run.metrics_log.read() if run.metrics_log is not None else [])
                   if "eval_loss" in r and r.get("step", 0) < run.step]
        run.best_metric, run.best_metric_read = min(earlier, default=None), True
    best = run.best_metric
    better = best is None or metrics["eval_loss"] < best
    if run.world_size > 1:
        # only rank 0 holds metrics.jsonl (a resumed run's history): its answer is every rank's (saving is collective)
        better = all_reduce_sum([float(better and run.is_main)], run.device)[0] > 0
    if better:
        run.best_metric = metrics["eval_loss"]
    return better


def interval(steps, per_epoch, steps_per_epoch: int, total_steps: int) -> int | None:
    """Every how many steps: an int, a fraction (< 1) of the run, or N times per epoch."""
    if steps:
        return max(1, round(steps * total_steps)) if steps < 1 else int(steps)
    if per_epoch:
        return max(1, steps_per_epoch // per_epoch)
    return None


def train_step(run: Run, window, batches: list | None = None, before_last_backward=None, *,
               after_backward=None, defer: bool = False) -> dict | QueuedStep:
    """One optimizer step over ``window`` (its micro-batches); ``batches`` are
    those micro-batches already collated (:mod:`plait.train.prefetch`).
    ``before_last_backward`` is called once, as the last backward pass starts:
    from there to the step's end the host mostly waits on the device.

    Returns the step's metrics; with ``defer`` (:func:`reads_step_late`), a
    :class:`QueuedStep` instead: the update is queued and the step counted,
    its values are read by :func:`read_queued_step` later, during the next
    step, which calls ``after_backward`` for that once its own backward pass
    is queued and before its own update is: the host then learns whether the
    earlier step's loss stops the run before it queues an update after it."""
    cfg, model = run.cfg, run.model
    started = time.perf_counter()
    if batches is None:
        batches = collate_window(run, window)
    # tokens the model reads (pad slots excluded, packed or not), from the rows' lengths
    input_tokens = sum(input_token_count(run.train_lengths, micro_batch) for micro_batch in window)
    # count first, so every micro-batch's loss is divided by the window's trained units
    local_tokens = sum(run.objective.count(batch) for batch in batches)
    divisor = loss_divisor(run.mesh, run.world, local_tokens)

    scaler = run.grad_scaler
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    step_metrics = MetricSums(run)
    for index, batch in enumerate(batches):
        last = index == len(batches) - 1
        # DDP: all-reduce gradients once per window, not after every micro-batch
        no_sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        with no_sync:
            with autocast(run):
                micro_loss, micro_metrics = run.objective.loss(run, batch, training=True)
            scaled = micro_loss / divisor
            if last and before_last_backward is not None:
                before_last_backward()
            (scaler.scale(scaled) if scaler else scaled).backward()
        loss_sum += micro_loss.detach().double()  # no host sync per micro-batch
        step_metrics.add(micro_metrics)
    if after_backward is not None:
        after_backward()
    skip_on_device = checks_loss_on_device(run, scaler)
    if skip_on_device:
        # the optimizer is queued behind the backward without waiting for it; a
        # bad loss still never reaches the weights (fused AdamW skips its update)
        flag_bad_loss(run.optimizer, loss_sum, local_tokens, watchdog_threshold_now(run))
        grad_norm, lr = _clip_and_step(run, scaler)
        if defer:
            read = step_metrics.read_later([loss_sum, grad_norm.double()])
            queued = QueuedStep(step=run.step + 1, epoch=run.epoch, started=started, lr=lr, local_tokens=local_tokens,
                                input_tokens=input_tokens, step_metrics=step_metrics, read=read)
            end_step(run)
            return queued
        # the step's one sync, which reads the objective's metric sums too
        loss_sum, grad_norm = step_metrics.read_with([loss_sum, grad_norm.double()])
    else:
        loss_sum, = step_metrics.read_with([loss_sum])

    loss, tokens, input_tokens = reduce_and_check(run, loss_sum, local_tokens, input_tokens, step=run.step + 1)
    if not skip_on_device:
        grad_norm, lr = _clip_and_step(run, scaler)
    end_step(run)
    return step_record(run, step=run.step, epoch=run.epoch, loss=loss, step_metrics=step_metrics, lr=lr,
                       grad_norm=grad_norm, tokens=tokens, input_tokens=input_tokens,
                       elapsed=time.perf_counter() - started)


@dataclass
class QueuedStep:
    """A step whose update is queued and whose values the host has not read yet
    (:func:`train_step` with ``defer``; read by :func:`read_queued_step`)."""

    step: int  #: its number: ``run.step`` once it is done
    epoch: int
    started: float  #: ``time.perf_counter()`` at its start
    lr: float
    local_tokens: int
    input_tokens: int
    step_metrics: MetricSums
    read: Any  #: :meth:`MetricSums.read_later`'s answer: loss sum and grad norm, then the metric sums
    #: whether :func:`read_queued_step` has begun reading it (it is read once, even when that read raises)
    taken: bool = False


def read_queued_step(run: Run, queued: QueuedStep, ended: float | None = None) -> dict:
    """The metrics of a step :func:`train_step` left queued, read now: the loss
    check (NaN, ``loss_watchdog_threshold``) runs here and may stop the run with
    the queued step's number. ``ended``: when the next step started (its
    ``tokens_per_s`` is then over the time from its start to the next step's
    start, the host's time for it; the device ran the two back to back), else
    now (a step read at a boundary: eval, save, the end, as the eager read)."""
    queued.taken = True
    loss_sum, grad_norm = queued.step_metrics.read(queued.read)
    loss, tokens, input_tokens = reduce_and_check(run, loss_sum, queued.local_tokens, queued.input_tokens,
                                                  step=queued.step)
    ended = time.perf_counter() if ended is None else ended
    return step_record(run, step=queued.step, epoch=queued.epoch, loss=loss, step_metrics=queued.step_metrics,
                       lr=queued.lr, grad_norm=grad_norm, tokens=tokens, input_tokens=input_tokens,
                       elapsed=ended - queued.started)


def reduce_and_check(run: Run, loss_sum: float, local_tokens: int, input_tokens: int, *, step: int):
    """A step's read loss sum and token counts summed over the ranks, the stop
    vote of ``save_on_signals`` agreed, and the loss checked
    (:func:`check_loss`; ``step`` names the step); ``(loss, tokens, input_tokens)``."""
    # a stop signal on any rank stops every rank after this step (save_on_signals); agreed in the step's one reduce
    signals = run.signals
    stop_votes = 1.0 if signals is not None and signals.received else 0.0
    # dynamic_checkpoint: the main rank's sight of the trigger file reaches every rank in the same reduce
    save_votes = 1.0 if save_trigger.take_request(run, step) else 0.0
    loss_sum, tokens, input_tokens, stop_votes, save_votes = all_reduce_sum(
        [loss_sum, local_tokens, input_tokens, stop_votes, save_votes], run.device)
    run.stop_requested = stop_votes > 0
    run.save_requested = save_votes > 0
    # tensor-parallel ranks repeat their group's tokens (and loss): count them once
    loss_sum, tokens = loss_sum / token_replicas(run), tokens / token_replicas(run)
    input_tokens /= data_replicas(run)
    loss = loss_sum / max(tokens, 1)
    check_loss(run, loss, step=step)
    return loss, tokens, input_tokens


def end_step(run: Run) -> None:
    """After a step's update is queued: the schedule moves on, gradients go, the step counts."""
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1


def step_record(run: Run, *, step: int, epoch: int, loss: float, step_metrics: MetricSums, lr: float, grad_norm,
                tokens: float, input_tokens: float, elapsed: float) -> dict:
    """The metrics of a step as the loop logs them (``metrics.jsonl``, ``on_step_end``), in this key order."""
    return {"step": step, "epoch": epoch, "loss": loss, **step_metrics.means(), "lr": lr,
            "grad_norm": float(grad_norm), run.objective.unit: int(round(tokens)),
            "input_tokens": int(round(input_tokens)), "tokens_per_s": input_tokens / elapsed if elapsed > 0 else 0.0}


def _clip_and_step(run: Run, scaler):
    """Clip the gradients and queue the optimizer step; ``(grad norm tensor, lr)``."""
    if run.trainable_params is None:
        # fixed for the run; walking a large model's modules costs milliseconds, every step
        run.trainable_params = [p for p in run.model.parameters() if p.requires_grad]
    if scaler:
        scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable_params, run.cfg.max_grad_norm or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2 / TP
        grad_norm = grad_norm.full_tensor()
    lr = run.optimizer.param_groups[0]["lr"]
    if scaler:
        scaler.step(run.optimizer)  # skips the step when fp16 gradients overflowed
        scaler.update()
    else:
        run.optimizer.step()
    return grad_norm, lr


def checks_loss_on_device(run: Run, scaler) -> bool:
    """Whether this step's loss check can run on the device, ahead of the optimizer.

    torch's fused Adam/AdamW skip their update (and step count) where the
    optimizer's ``found_inf`` is set, the mechanism GradScaler uses, so the host
    need not wait for the backward before queuing the step. One process only:
    across ranks the loss is all-reduced on the host first.
    """
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    opt = run.optimizer
    return (not several and run.mesh is None and scaler is None
            and type(opt) in (torch.optim.Adam, torch.optim.AdamW) and bool(opt.defaults.get("fused")))


def reads_step_late(run: Run) -> bool:
    """Whether the loop reads each step's values during the next step
    (``defer_step_read``): only where the loss check runs on the device
    (:func:`checks_loss_on_device`), so the update waits for no read."""
    return bool(run.cfg.defer_step_read) and checks_loss_on_device(run, run.grad_scaler)


def flag_bad_loss(optimizer, loss_sum, tokens: int, threshold) -> None:
    """Set the fused optimizer's ``found_inf`` to 1 where the summed loss is not
    finite or its mean exceeds ``threshold`` (``loss_watchdog_threshold``), on the device."""
    bad = ~torch.isfinite(loss_sum)
    if threshold:
        bad = bad | (loss_sum / max(tokens, 1) > threshold)
    optimizer.found_inf = bad.float()


def collate(run: Run, dataset, micro_batch) -> dict:
    """Fetch the rows of one micro-batch and let the ``collate`` hook build tensors."""
    rows = [materialize(dataset, bin_indices) for bin_indices in micro_batch]
    batch = run.pm.hook.collate(cfg=run.cfg, rows=rows, tokenizer=run.tokenizer)
    if batch is None:
        raise no_result_error(run.pm, "collate")
    return batch


def collate_window(run: Run, window) -> list[dict]:
    """This rank's collated micro-batches of one optimizer step's ``window``."""
    return [shard(run, collate(run, run.train_data, micro_batch)) for micro_batch in window]


def shard(run: Run, batch: dict) -> dict:
    """This rank's part of a collated micro-batch (``shard_batch``; a
    context-parallel slice of each sequence), or the batch itself."""
    if run.world_size <= 1:
        return batch
    part = run.pm.hook.shard_batch(cfg=run.cfg, batch=batch, mesh=run.mesh)
    return batch if part is None else part


def input_token_count(lengths, micro_batch) -> int:
    """Real tokens of one micro-batch (its bins' row lengths): pad slots of a
    padded or packed batch are not counted, so ``tokens_per_s`` is honest."""
    return sum(int(lengths[i]) for bin_indices in micro_batch for i in bin_indices)


def loss_of(run: Run, batch, *, training: bool = False):
    """Summed cross-entropy of one micro-batch and its trained-token count.

    The backbone gives hidden states; the loss step (``build_loss``) applies
    the head only where labels are trained.

    ``training``: add the ``extra_loss`` terms (e.g. an MoE router loss).
    Each term is meant for the micro-batch's *mean* loss, and the loop divides
    summed losses by the step's trained tokens (all ranks, all micro-batches),
    so a term is added as ``term * n_tokens``: the step's loss is then
    ``mean CE + token-weighted mean of the terms``, which with one micro-batch
    on one process is transformers' ``loss + coef * aux_loss``. Evaluation
    reports the cross-entropy alone (``eval_ppl`` stays a perplexity).
    """
    labels_key = "shift_labels" if "shift_labels" in batch else "labels"
    # to_device moves anything with .to: tensors and a flex BlockMask; ints stay
    batch = to_device(drop_full_attention_mask(batch), run.input_device or run.device)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
    labels = batch[labels_key]
    if not head_plan(run.model).fused:
        # the model scales or caps its logits in ways the fused head cannot repeat: its own logits
        outputs = forward_logits(run.model, inputs)
        logits = outputs.logits
        if labels_key == "labels":
            logits, labels = logits[:, :-1], labels[:, 1:]
        labels = labels.to(logits.device)  # the head's device under a device_map split
        loss_sum, n_tokens = logits_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                  eaft_of(run.cfg))
    else:
        hidden, head, outputs = forward_hidden(run.model, inputs)
        if labels_key == "labels":
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        weight = head.weight
        # under tensor parallel the head weight is a replicated DTensor; its local
        # tensor is the whole weight and gradients flow back through to_local
        weight = weight.to_local() if hasattr(weight, "to_local") else weight
        # a device_map split may put the head on another device than the last layer
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        loss_sum, n_tokens = run.loss_fn(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1))
    if training:
        for term in run.pm.hook.extra_loss(cfg=run.cfg, model=run.model, outputs=outputs, batch=batch):
            if term is not None:
                loss_sum = loss_sum + term.to(loss_sum.device, loss_sum.dtype) * n_tokens
    if run.input_device is not None:  # device_map: the loop sums losses on the run's device
        loss_sum = loss_sum.to(run.device)
        n_tokens = n_tokens.to(run.device) if hasattr(n_tokens, "to") else n_tokens
    return loss_sum, n_tokens


def autocast(run: Run):
    """Mixed precision on an accelerator when the config asks for bf16/fp16;
    the CPU trains in the weights' own dtype."""
    dtype = compute_dtype(run.cfg)
    if run.device.type == "cpu" or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(run.device.type, dtype=dtype)


def watchdog_patience(cfg) -> int:
    """High-loss steps in a row that stop the run: ``loss_watchdog_patience``,
    3 when unset (Axolotl's default)."""
    return cfg.loss_watchdog_patience or 3


def watchdog_threshold_now(run: Run):
    """The threshold a step's update is held back at: only on the step that
    would complete ``loss_watchdog_patience`` high-loss steps in a row (the
    earlier ones update the weights, as in Axolotl)."""
    threshold = run.cfg.loss_watchdog_threshold
    if threshold and run.high_loss_steps + 1 >= watchdog_patience(run.cfg):
        return threshold
    return None


def check_loss(run: Run, loss: float, *, step: int) -> None:
    """Stop on a NaN/inf loss before it reaches the weights, or when the loss
    has exceeded ``loss_watchdog_threshold`` on ``loss_watchdog_patience``
    steps in a row (the last of them is not applied). ``step``: the number of
    the step whose loss this is (messages name it)."""
    cfg = run.cfg
    over = math.isfinite(loss) and cfg.loss_watchdog_threshold and loss > cfg.loss_watchdog_threshold
    if math.isfinite(loss) and not over:
        run.high_loss_steps = 0
        return
    if over:
        run.high_loss_steps += 1
        patience = watchdog_patience(cfg)
        if run.high_loss_steps < patience:
            log(run, f"warning: loss {loss:.4g} exceeds loss_watchdog_threshold {cfg.loss_watchdog_threshold} at "
                     f"step {step} ({run.high_loss_steps} of {patience} steps in a row, "
                     f"loss_watchdog_patience)")
            return
    what = f"loss is {loss}" if not math.isfinite(loss) else \
        (f"loss {loss:.4g} exceeds loss_watchdog_threshold {cfg.loss_watchdog_threshold} "
         f"({watchdog_patience(cfg)} steps in a row, loss_watchdog_patience)")
    precision = "fp16: true" if cfg.fp16 else f"bf16: {cfg.bf16}"
    raise TrainingError(
        f"{what} at step {step}; the weights were not updated. Try a lower learning_rate "
        f"(now {cfg.learning_rate}), max_grad_norm (now {cfg.max_grad_norm}), or other precision ({precision}; "
        f"bf16 is steadier than fp16), and check the data for empty or broken rows."
    )


# ------------------------------------------------------------------ logging and eval


def log(run: Run, message: str) -> None:
    if run.is_main:
        print(message, file=sys.stderr, flush=True)


def log_step(run: Run, metrics: dict, progress) -> None:
    run.last_metrics = metrics
    progress.update(metrics)
    if not run.is_main or (run.step % run.cfg.logging_steps and run.step != run.total_steps):
        return
    run.metrics_log.append(metrics)
    run.pm.hook.on_step_end(run=run, metrics=metrics)


def evaluate(run: Run) -> dict:
    """Mean loss per trained unit over the eval set (all ranks), the objective's
    metrics as ``eval_<name>``, and the perplexity where the objective has one."""
    model = run.model
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    metrics = MetricSums(run)
    try:
        plan = plan_batches(run.cfg, row_lengths(run.eval_data), 0, run.dp_rank, run.dp_size, split="eval")
        with torch.no_grad():
            for micro_batch in plan:
                batch = shard(run, collate(run, run.eval_data, micro_batch))
                with autocast(run):
                    loss_sum, micro_metrics = run.objective.loss(run, batch)
                total += float(loss_sum)
                tokens += run.objective.count(batch)
                metrics.add(micro_metrics)
    finally:
        model.train(was_training)
    total, tokens = all_reduce_sum([total, tokens], run.device)
    total, tokens = total / token_replicas(run), tokens / token_replicas(run)
    loss = total / max(tokens, 1)
    result = {"step": run.step, "eval_loss": loss, **metrics.means(prefix="eval_")}
    if run.objective.perplexity:
        result["eval_ppl"] = math.exp(min(loss, 50.0))
    return {**result, f"eval_{run.objective.unit}": int(round(tokens))}


def evaluate_and_log(run: Run) -> dict:
    """:func:`evaluate`, then generation where the config asks for it
    (:mod:`plait.train.generation`: its metrics join the record, its table rows
    go to ``eval_predictions.jsonl`` and ``on_eval_predictions``); logged on rank 0."""
    metrics = evaluate(run)
    table = []
    if generation.wanted(run.cfg):
        generated = generation.generate_and_score(run)
        metrics.update(generated.metrics)
        table = generated.table
        if generated.skipped and not run.generation_skips_said:
            run.generation_skips_said = True
            log(run, f"do_causal_lm_eval / eval_table_size: {generated.skipped} of {len(run.eval_data)} eval rows "
                     f"have no untrained prompt before their trained tokens (or no trained token) and are not "
                     f"generated for")
    run.last_eval = metrics
    if run.is_main:
        run.metrics_log.append(metrics)
        if table:
            for row in table:
                run.prediction_table.append(row)
            run.pm.hook.on_eval_predictions(run=run, rows=table)
        run.pm.hook.on_eval_end(run=run, metrics=metrics)
    if run.cfg.generate_samples:
        write_samples(run, sample_generation.generate_samples(run))
    return metrics


def write_samples(run: Run, samples: list[dict]) -> None:
    """generate_samples' samples on the console and in output_dir (rank 0's list; empty elsewhere)."""
    if not samples:
        return
    for number, sample in enumerate(samples, start=1):
        log(run, sample_generation.format_sample(sample, number))
        run.sample_log.append(sample)


def format_eval(metrics: dict) -> str:
    line = f"step {metrics['step']}: eval_loss {metrics['eval_loss']:.4f}"
    if "eval_ppl" in metrics:
        line += f"  eval_ppl {metrics['eval_ppl']:.3f}"
    for name in ACCEPTED_METRICS:
        if f"eval_{name}" in metrics:
            line += f"  eval_{name} {metrics[f'eval_{name}']:.3f}"
    return line


def load_best_weights(run: Run) -> None:
    """``load_best_model_at_end``: the weights of the checkpoint with the lowest
    eval_loss become the final model's (every rank loads them)."""
    checkpoint.barrier()  # rank 0's last save and metrics lines are on disk for every rank
    best = best_checkpoint(run.output_dir)
    if best is None:
        log(run, "load_best_model_at_end: no checkpoint of this run was evaluated; the final weights are the last "
                 "step's")
        return
    path, loss = best
    checkpoint.load_weights(run, path)
    log(run, f"load_best_model_at_end: the final model is {path.name}'s weights (eval_loss {loss:.4f})")


def finish(run: Run) -> None:
    """Final evaluation, the saved model, the loss plot, ``on_train_end``."""
    # eval_strategy: no evaluates never, not even at the end (transformers' meaning)
    if run.eval_data is not None and len(run.eval_data) and run.last_eval.get("step") != run.step \
            and run.cfg.eval_strategy != "no":
        log(run, format_eval(evaluate_and_log(run)))
    if run.cfg.load_best_model_at_end:
        load_best_weights(run)
    save_final(run)  # every rank: sharded weights are gathered collectively
    if run.is_main:
        plot_loss(run.metrics_log.read(), run.output_dir / "loss.png")
        write_report(run)
        log(run, f"saved to {run.output_dir}")
    run.pm.hook.on_train_end(run=run)

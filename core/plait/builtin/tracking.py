"""Core's experiment trackers: TensorBoard (``use_tensorboard``), and Weights &
Biases / MLflow / trackio when they are installed and configured
(``wandb_project``, ``mlflow_tracking_uri`` or ``mlflow_experiment_name``,
``trackio_project_name``), with Axolotl's keys: ``wandb_watch`` (gradient /
parameter histograms), ``wandb_log_model`` / ``hf_mlflow_log_artifacts`` (the
saved checkpoints and model as artifacts), ``wandb_run_id``, ``mlflow_run_name``,
``use_wandb`` / ``use_mlflow`` / ``use_trackio`` (false turns one off).
SwanLab, Comet and OpenTelemetry metrics (:data:`OBJECT_TRACKERS`) live in a
module each.

``eval_table_size``'s prediction rows (``on_eval_predictions``) go to W&B
and MLflow as tables. They are event hookimpls like any logger plugin would write; each keeps its
state in ``run.extras`` under its own name.
"""

from __future__ import annotations

import importlib.util
import logging

from plait.builtin import comet_run, otel_metrics, swanlab_run
from plait.hookspecs import hookimpl

#: run.extras name -> (the keys that turn it on, its module, the class of its run object, built from the loop's
#: Run): the object logs ``(scalars, step)`` and finishes; the module has ``wanted``, ``check`` and ``INSTALL``
OBJECT_TRACKERS = {
    "swanlab": ("swanlab_project", swanlab_run, swanlab_run.SwanLabTracker),
    "comet": ("use_comet/comet_project_name", comet_run, comet_run.CometTracker),
    "otel": ("use_otel_metrics", otel_metrics, otel_metrics.OtelMetrics),
}


def _missing_modules(module) -> list[str]:
    """The modules a tracker imports that this machine lacks."""
    names = getattr(module, "MODULES", None) or (module.MODULE,)
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package of a dotted name is missing
            found = False
        if not found:
            missing.append(name)
    return missing


def wants_mlflow(cfg) -> bool:
    """On with a tracking URI or an experiment name, as in Axolotl; ``use_mlflow``
    true turns it on without either (MLflow's default location), false off."""
    if cfg.use_mlflow is not None:
        return cfg.use_mlflow
    return bool(cfg.mlflow_tracking_uri or cfg.mlflow_experiment_name)


def wants_wandb(cfg) -> bool:
    return bool(cfg.wandb_project) and cfg.use_wandb is not False


def wants_trackio(cfg) -> bool:
    return bool(cfg.trackio_project_name) and cfg.use_trackio is not False


def wandb_init_kwargs(cfg) -> dict:
    """``wandb.init`` arguments from Axolotl's keys (the run id names the run
    when ``wandb_name`` is unset, as in Axolotl)."""
    kwargs = dict(project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_name or cfg.wandb_run_id,
                  mode=cfg.wandb_mode, config=cfg.model_dump(mode="json"), resume="allow")
    if cfg.wandb_run_id:
        kwargs["id"] = cfg.wandb_run_id
    return kwargs


def wandb_model_uploads(cfg) -> tuple[bool, bool]:
    """``(each checkpoint, the final model)`` that ``wandb_log_model`` uploads."""
    mode = cfg.wandb_log_model
    return mode == "checkpoint", mode in ("checkpoint", "end")


@hookimpl
def validate_config(cfg):
    from plait.errors import ConfigError, MachineFactError

    wanted = [("use_tensorboard", cfg.use_tensorboard, "tensorboard"), ("wandb_project", wants_wandb(cfg), "wandb"),
              ("mlflow_tracking_uri/mlflow_experiment_name/use_mlflow", wants_mlflow(cfg), "mlflow"),
              ("trackio_project_name", wants_trackio(cfg), "trackio")]
    for key in ("wandb_watch", "wandb_log_model", "wandb_run_id"):
        if getattr(cfg, key) not in (None, "false") and not wants_wandb(cfg):
            raise ConfigError(f"config key {key!r}: {getattr(cfg, key)!r} needs W&B on: set wandb_project "
                              f"(use_wandb is {cfg.use_wandb!r})")
    for key in ("mlflow_run_name", "hf_mlflow_log_artifacts"):
        if getattr(cfg, key) and not wants_mlflow(cfg):
            raise ConfigError(f"config key {key!r}: {getattr(cfg, key)!r} needs MLflow on: set mlflow_tracking_uri, "
                              f"mlflow_experiment_name or use_mlflow: true (use_mlflow is {cfg.use_mlflow!r})")
    for _, module, _ in OBJECT_TRACKERS.values():
        module.check(cfg)
    # the machine's facts last, so a rule above is never hidden behind a missing package
    missing = [f"config key '{key}' asks for {module}, which is not installed; pip install {module} or remove the key"
               for key, asked, module in wanted if asked and importlib.util.find_spec(module) is None]
    for keys, module, _ in OBJECT_TRACKERS.values():
        absent = module.wanted(cfg) and _missing_modules(module)
        if absent:
            missing.append(f"config key '{keys}' asks for {', '.join(absent)}, which "
                           f"{'is' if len(absent) == 1 else 'are'} not installed; {module.INSTALL}, or remove the key")
    if missing:
        raise MachineFactError("; ".join(missing))


def _scalars(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}/{k.removeprefix('eval_')}": float(v) for k, v in metrics.items()
            if k not in ("step", "epoch") and isinstance(v, (int, float))}


@hookimpl
def on_train_start(run):
    if not run.is_main:
        return
    cfg = run.cfg
    if cfg.use_tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        run.extras["tensorboard"] = SummaryWriter(log_dir=str(run.output_dir / "runs"))
    if wants_wandb(cfg):
        import wandb

        run.extras["wandb"] = wandb.init(**wandb_init_kwargs(cfg))
        if cfg.wandb_watch not in (None, "false"):
            run.extras["wandb"].watch(run.model, log=cfg.wandb_watch, log_freq=cfg.logging_steps)
    if wants_trackio(cfg):
        import trackio

        run.extras["trackio"] = trackio.init(project=cfg.trackio_project_name, name=cfg.trackio_run_name,
                                             space_id=cfg.trackio_space_id, config=cfg.model_dump(mode="json"))
    if wants_mlflow(cfg):
        import mlflow

        if cfg.mlflow_tracking_uri:
            mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
        if cfg.mlflow_experiment_name:
            mlflow.set_experiment(cfg.mlflow_experiment_name)
        run.extras["mlflow"] = mlflow.start_run(run_name=cfg.mlflow_run_name)
        mlflow.log_params({k: str(v)[:250] for k, v in cfg.model_dump(mode="json").items()})
    for name, (_, module, tracker) in OBJECT_TRACKERS.items():
        if module.wanted(cfg):
            run.extras[name] = tracker(run)
    if "otel" in run.extras:
        logging.getLogger(__name__).info("OpenTelemetry metrics for Prometheus at %s", run.extras["otel"].url)


def _log(run, prefix: str, metrics: dict) -> None:
    scalars = _scalars(prefix, metrics)
    step = metrics["step"]
    if "tensorboard" in run.extras:
        for key, value in scalars.items():
            run.extras["tensorboard"].add_scalar(key, value, step)
    if "wandb" in run.extras:
        run.extras["wandb"].log(scalars, step=step)
    if "trackio" in run.extras:
        run.extras["trackio"].log(scalars, step=step)
    if "mlflow" in run.extras:
        import mlflow

        mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=step)
    for name in OBJECT_TRACKERS:
        if name in run.extras:
            run.extras[name].log(scalars, step)


@hookimpl
def on_step_end(run, metrics):
    _log(run, "train", metrics)
    upload_saved_checkpoint(run)


def upload_saved_checkpoint(run) -> None:
    """``wandb_log_model: checkpoint`` / ``hf_mlflow_log_artifacts``: the
    checkpoint the loop saved after the previous step (``run.saved_checkpoint``)
    goes to W&B Artifacts / the MLflow run too; a later step's ``on_step_end``
    or ``on_train_end`` sends it, since the loop saves after ``on_step_end`` and
    train does not import builtin. Each checkpoint goes once: the last one sent
    is kept in ``run.extras``."""
    path = run.saved_checkpoint
    if path is None or run.extras.get("sent_checkpoint") == path:
        return
    run.extras["sent_checkpoint"] = path
    if "wandb" in run.extras and wandb_model_uploads(run.cfg)[0]:
        upload_model(run.extras["wandb"], str(path), f"checkpoint-{run.extras['wandb'].id}")
    if "mlflow" in run.extras and run.cfg.hf_mlflow_log_artifacts:
        import mlflow

        mlflow.log_artifacts(str(path), artifact_path=path.name)


@hookimpl
def on_eval_end(run, metrics):
    _log(run, "eval", metrics)


#: the columns of the prediction table, in order (the keys of on_eval_predictions' rows)
TABLE_COLUMNS = ("step", "row", "prompt", "reference", "prediction")


@hookimpl
def on_eval_predictions(run, rows):
    """``eval_table_size``: the rows as a table where the tracker takes one (W&B, MLflow)."""
    step = rows[0]["step"]
    data = [[row[column] for column in TABLE_COLUMNS] for row in rows]
    if "wandb" in run.extras:
        import wandb

        run.extras["wandb"].log({"eval/predictions": wandb.Table(columns=list(TABLE_COLUMNS), data=data)},
                                step=step)
    if "mlflow" in run.extras:
        import mlflow

        mlflow.log_table(data={column: [row[column] for row in rows] for column in TABLE_COLUMNS},
                         artifact_file=f"eval_predictions/step-{step}.json")


def upload_model(wandb_run, folder: str, name: str) -> None:
    """Log ``folder`` (a saved model or checkpoint) as a W&B model artifact."""
    import wandb

    artifact = wandb.Artifact(name, type="model")
    artifact.add_dir(folder)
    wandb_run.log_artifact(artifact)


@hookimpl
def on_train_end(run):
    if "tensorboard" in run.extras:
        run.extras.pop("tensorboard").close()
    upload_saved_checkpoint(run)
    if "wandb" in run.extras:
        wandb_run = run.extras.pop("wandb")
        if wandb_model_uploads(run.cfg)[1]:
            upload_model(wandb_run, str(run.output_dir), f"model-{wandb_run.id}")
        wandb_run.finish()
    if "trackio" in run.extras:
        run.extras.pop("trackio").finish()
    if "mlflow" in run.extras:
        import mlflow

        run.extras.pop("mlflow")
        if run.cfg.hf_mlflow_log_artifacts:  # the final model: output_dir's files, its checkpoints left out
            for file in sorted(run.output_dir.iterdir()):
                if file.is_file():
                    mlflow.log_artifact(str(file), artifact_path="model")
        mlflow.end_run()
    for name in OBJECT_TRACKERS:
        if name in run.extras:
            run.extras.pop(name).finish()

"""Core's experiment trackers: TensorBoard (``use_tensorboard``), and Weights &
Biases / MLflow when they are installed and configured (``wandb_project``,
``mlflow_tracking_uri`` or ``mlflow_experiment_name``).

They are event hookimpls like any logger plugin would write; each keeps its
state in ``run.extras`` under its own name.
"""

from __future__ import annotations

import importlib.util

from plait.hookspecs import hookimpl


def _wants_mlflow(cfg) -> bool:
    return bool(cfg.mlflow_tracking_uri or cfg.mlflow_experiment_name)


@hookimpl
def validate_config(cfg):
    from plait.errors import ConfigError

    wanted = [("use_tensorboard", cfg.use_tensorboard, "tensorboard"), ("wandb_project", cfg.wandb_project, "wandb"),
              ("mlflow_tracking_uri/mlflow_experiment_name", _wants_mlflow(cfg), "mlflow")]
    for key, asked, module in wanted:
        if asked and importlib.util.find_spec(module) is None:
            raise ConfigError(f"config key '{key}' asks for {module}, which is not installed; pip install {module} "
                              f"or remove the key")


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
    if cfg.wandb_project:
        import wandb

        run.extras["wandb"] = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_name,
                                         mode=cfg.wandb_mode, config=cfg.model_dump(mode="json"), resume="allow")
    if _wants_mlflow(cfg):
        import mlflow

        if cfg.mlflow_tracking_uri:
            mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
        if cfg.mlflow_experiment_name:
            mlflow.set_experiment(cfg.mlflow_experiment_name)
        run.extras["mlflow"] = mlflow.start_run()
        mlflow.log_params({k: str(v)[:250] for k, v in cfg.model_dump(mode="json").items()})


def _log(run, prefix: str, metrics: dict) -> None:
    scalars = _scalars(prefix, metrics)
    step = metrics["step"]
    if "tensorboard" in run.extras:
        for key, value in scalars.items():
            run.extras["tensorboard"].add_scalar(key, value, step)
    if "wandb" in run.extras:
        run.extras["wandb"].log(scalars, step=step)
    if "mlflow" in run.extras:
        import mlflow

        mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=step)


@hookimpl
def on_step_end(run, metrics):
    _log(run, "train", metrics)


@hookimpl
def on_eval_end(run, metrics):
    _log(run, "eval", metrics)


@hookimpl
def on_train_end(run):
    if "tensorboard" in run.extras:
        run.extras.pop("tensorboard").close()
    if "wandb" in run.extras:
        run.extras.pop("wandb").finish()
    if "mlflow" in run.extras:
        import mlflow

        run.extras.pop("mlflow")
        mlflow.end_run()

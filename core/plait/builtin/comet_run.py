"""Comet tracking with Axolotl's ``use_comet`` / ``comet_*`` keys.

On when ``use_comet`` is true, or ``comet_project_name`` is set and
``use_comet`` is not false (Axolotl turns Comet on for a project name). The
run's config goes to the experiment's parameters, then every logged train and
eval scalar by step; ``comet_online: false`` keeps the experiment in an
offline archive.
"""

from __future__ import annotations

from plait.errors import ConfigError, TrainingError

MODULE = "comet_ml"
INSTALL = "pip install 'plait[comet]' (comet_ml)"

#: ``comet_experiment_config`` names Axolotl accepts -> ``comet_ml.ExperimentConfig``'s argument
EXPERIMENT_CONFIG_NAMES = {
    name: name for name in (
        "auto_histogram_activation_logging", "auto_histogram_epoch_rate", "auto_histogram_gradient_logging",
        "auto_histogram_tensorboard_logging", "auto_histogram_weight_logging", "auto_log_co2",
        "auto_metric_logging", "auto_metric_step_rate", "auto_output_logging", "auto_param_logging",
        "display_summary_level", "distributed_node_identifier", "log_code", "log_env_cpu", "log_env_details",
        "log_env_disk", "log_env_gpu", "log_env_host", "log_env_network", "log_git_metadata", "log_git_patch",
        "log_graph", "name", "offline_directory", "parse_args", "tags")
} | {"comet_disabled": "disabled"}

#: keys that only mean something with Comet on
SETTINGS = ("comet_api_key", "comet_workspace", "comet_experiment_key", "comet_mode", "comet_online",
            "comet_experiment_config")


def wanted(cfg) -> bool:
    return cfg.use_comet is True or (bool(cfg.comet_project_name) and cfg.use_comet is not False)


def check(cfg) -> None:
    unknown = sorted(set(cfg.comet_experiment_config or {}) - set(EXPERIMENT_CONFIG_NAMES))
    if unknown:
        raise ConfigError(f"config key 'comet_experiment_config': {', '.join(map(repr, unknown))} not accepted; "
                          f"accepted: {', '.join(sorted(EXPERIMENT_CONFIG_NAMES))}")
    if cfg.use_comet is None and not wanted(cfg):
        # use_comet: false turns Comet off and leaves its keys in place; unset, they would change nothing
        for key in SETTINGS:
            if getattr(cfg, key) is not None:
                raise ConfigError(f"config key {key!r}: {getattr(cfg, key)!r} needs Comet on: set use_comet: true "
                                  "or comet_project_name")


def start_kwargs(cfg) -> dict:
    """``comet_ml.start`` arguments, except ``experiment_config``."""
    kwargs = dict(api_key=cfg.comet_api_key, workspace=cfg.comet_workspace, project_name=cfg.comet_project_name,
                  experiment_key=cfg.comet_experiment_key, mode=cfg.comet_mode, online=cfg.comet_online)
    return {key: value for key, value in kwargs.items() if value is not None}


def experiment_settings(cfg) -> dict:
    """``comet_ml.ExperimentConfig`` arguments from ``comet_experiment_config``."""
    return {EXPERIMENT_CONFIG_NAMES[name]: value for name, value in (cfg.comet_experiment_config or {}).items()
            if value is not None and value != ""}


class CometTracker:
    """One Comet experiment for one training run."""

    def __init__(self, run) -> None:
        import comet_ml

        cfg = run.cfg
        try:
            self.experiment = comet_ml.start(**start_kwargs(cfg),
                                             experiment_config=comet_ml.ExperimentConfig(**experiment_settings(cfg)))
        except Exception as exc:  # no API key, a bad comet_experiment_config value, no network: Comet's reason
            raise TrainingError(f"Comet could not start: {type(exc).__name__}: {str(exc).rstrip('. ')}. Online, set "
                                "COMET_API_KEY or comet_api_key (or run `comet login`); comet_online: false needs no "
                                "account") from exc
        self.experiment.log_other("Created from", "plait")
        self.experiment.log_parameters(cfg.model_dump(mode="json"))

    def log(self, scalars: dict, step: int) -> None:
        self.experiment.log_metrics(scalars, step=step)

    def finish(self) -> None:
        self.experiment.end()

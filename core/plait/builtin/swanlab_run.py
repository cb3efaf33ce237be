"""SwanLab tracking with Axolotl's ``swanlab_*`` keys (Axolotl's swanlab
integration plugin; in Plait core's trackers serve it).

On when ``swanlab_project`` is set and ``use_swanlab`` is not false. The
run's config, then every logged train and eval scalar by step, go to
``swanlab.init``'s run; a Lark webhook gets SwanLab's start/end notices.
Under ``rl:`` (an objective with ``samples``, see ``build_objective``) the
trained pairs go to the ``rlhf_completions`` table
(``swanlab_log_completions``).
"""

from __future__ import annotations

from plait.errors import ConfigError, TrainingError

#: Axolotl's mode names -> SwanLab's (SwanLab renamed cloud to online)
MODES = {"cloud": "online", "local": "local", "offline": "offline", "disabled": "disabled"}

MODULE = "swanlab"
INSTALL = "pip install 'plait[swanlab]' (swanlab>=0.10)"


def wanted(cfg) -> bool:
    return bool(cfg.swanlab_project) and cfg.use_swanlab is not False


def check(cfg) -> None:
    """Rules across keys (Axolotl's, plus the completion table Plait lacks)."""
    if cfg.use_swanlab and not cfg.swanlab_project:
        raise ConfigError("config key 'use_swanlab': true needs swanlab_project (the SwanLab project to log to); "
                          "set swanlab_project, or use_swanlab: false")
    listed = [entry for entry in cfg.plugins or [] if entry.startswith("axolotl.integrations.swanlab.")]
    if listed and not cfg.swanlab_project and cfg.use_swanlab is not False:
        # Axolotl's plugin turns SwanLab on (use_swanlab defaults to true there) and refuses a missing project
        raise ConfigError(f"plugins: {listed[0]} turns SwanLab on and needs swanlab_project (the SwanLab project to "
                          "log to); set swanlab_project, or use_swanlab: false")
    if cfg.swanlab_lark_secret and not cfg.swanlab_lark_webhook_url:
        raise ConfigError("config key 'swanlab_lark_secret' signs Lark notifications and needs "
                          "swanlab_lark_webhook_url; set the webhook or remove the secret")


def init_kwargs(cfg) -> dict:
    """``swanlab.init`` arguments (without ``settings``) from Axolotl's keys."""
    kwargs = dict(project=cfg.swanlab_project, name=cfg.swanlab_experiment_name,
                  description=cfg.swanlab_description, workspace=cfg.swanlab_workspace,
                  mode=MODES[cfg.swanlab_mode] if cfg.swanlab_mode else None, config=cfg.model_dump(mode="json"))
    return {key: value for key, value in kwargs.items() if value is not None}


class SwanLabTracker:
    """One SwanLab run for one training run."""

    def __init__(self, run) -> None:
        import swanlab

        cfg = run.cfg
        hosts = {"api_key": cfg.swanlab_api_key, "api_host": cfg.swanlab_api_host,
                 "web_host": cfg.swanlab_web_host}
        hosts = {key: value for key, value in hosts.items() if value}
        callbacks = []
        if cfg.swanlab_lark_webhook_url:
            from swanlab.plugin.notification import LarkCallback

            callbacks.append(LarkCallback(webhook_url=cfg.swanlab_lark_webhook_url, secret=cfg.swanlab_lark_secret))
        try:
            self.run = swanlab.init(**init_kwargs(cfg), settings=swanlab.Settings(**hosts) if hosts else None,
                                    callbacks=callbacks or None)
        except Exception as exc:  # cloud mode with no API key or no network, say: SwanLab's reason, and the keys
            raise TrainingError(f"SwanLab could not start (swanlab_mode: {cfg.swanlab_mode or 'cloud'}): "
                                f"{type(exc).__name__}: {str(exc).rstrip('. ')}. For cloud mode set SWANLAB_API_KEY "
                                "or swanlab_api_key (or run `swanlab login`); swanlab_mode: local or offline needs "
                                "no account") from exc
        self.completions = None
        if cfg.swanlab_log_completions and hasattr(run.objective, "samples"):
            self.completions = CompletionTable(run, self.run)

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)
        if self.completions is not None and any(key.startswith("train/") for key in scalars):
            self.completions.collect(step)

    def finish(self) -> None:
        if self.completions is not None:
            self.completions.flush()
        self.run.finish()


class CompletionTable:
    """Axolotl's ``rlhf_completions`` table: the units the objective trained on
    (its ``samples``), stamped with the logged step they were trained by, the
    newest ``swanlab_completion_max_buffer`` kept, logged every
    ``swanlab_completion_log_interval`` steps and at the end."""

    NAME = "rlhf_completions"

    def __init__(self, run, swanlab_run) -> None:
        from collections import deque

        self.tokenizer, self.swanlab_run = run.tokenizer, swanlab_run
        self.interval = run.cfg.swanlab_completion_log_interval
        self.rows: deque = deque(maxlen=run.cfg.swanlab_completion_max_buffer)
        self.objective = run.objective
        self.objective.samples = deque(maxlen=run.cfg.swanlab_completion_max_buffer)
        self.logged_at = self.step = 0

    def collect(self, step: int) -> None:
        self.step = step
        while self.objective.samples:
            self.rows.append(self.row(step, self.objective.samples.popleft()))
        if step - self.logged_at >= self.interval:
            self.flush()

    def row(self, step: int, sample: dict) -> dict:
        text = {key.removesuffix("_ids"): self.tokenizer.decode(ids) for key, ids in sample.items()
                if key.endswith("_ids")}
        return {"step": step, **text, **{key: value for key, value in sample.items() if not key.endswith("_ids")}}

    def flush(self) -> None:
        if self.rows:
            import swanlab

            headers = list(self.rows[0])
            table = swanlab.echarts.Table().add(headers, [[row[h] for h in headers] for row in self.rows])
            self.swanlab_run.log({self.NAME: table}, step=self.step)
            self.rows.clear()
        self.logged_at = self.step

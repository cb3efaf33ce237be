"""SwanLab, Comet, MLflow and OpenTelemetry metrics: Axolotl's keys, the message
when a library is missing, and real runs whose logged values are the run's own losses.

OpenTelemetry's packages and MLflow's tracking client (mlflow-skinny) are test
dependencies (requirements-dev.txt). SwanLab
(which pins protobuf below 7) and comet_ml (a dozen dependencies) are not:
their training tests skip where they are not installed; the rest runs anyway.
"""

from __future__ import annotations

import json
import sys
import urllib.request
import zipfile
from types import SimpleNamespace
from pathlib import Path

import pytest

from plait import hookimpl
from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model, run_cli, write_config

# the loop tests' rows and run (pytest's importlib mode does not put tests/ on sys.path)
sys.path.insert(0, str(Path(__file__).parent))
from test_train_loop import data, run_train  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("trackers") / "model")


def _cfg(**keys):
    """Validated as `plait config validate` does: a missing tracker library is a note here, so the rules are
    checked on every machine."""
    from plait.config import build_config
    from plait.testing import plugin_manager

    return build_config(plugin_manager(), {"base_model": "m", **keys}, machine_facts="note")


def _validate(tmp_path, **keys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "a", "output": "b"}\n')
    keys = {"datasets": [{"path": str(rows), "type": "alpaca"}], "output_dir": str(tmp_path / "out"), **keys}
    return run_cli(["config", "validate", str(write_config(tmp_path / "c.yml", base_model="m", **keys))])


class Recorder:
    """The metrics the loop hands to every tracker, by kind."""

    def __init__(self):
        self.train, self.eval = {}, {}

    @hookimpl
    def on_step_end(self, run, metrics):
        self.train[metrics["step"]] = metrics

    @hookimpl
    def on_eval_end(self, run, metrics):
        self.eval[metrics["step"]] = metrics


def _train(tiny_model, tmp_path, keys, plugins=()):
    """Three logged steps, evaluated after steps 2 and 3."""
    recorder = Recorder()
    run_train({"base_model": str(tiny_model), "output_dir": str(tmp_path / "out"), "max_steps": 3, "eval_steps": 2,
               "logging_steps": 1, "micro_batch_size": 2, **keys}, data(8, 2, length=10), plugins=[recorder, *plugins])
    assert sorted(recorder.train) == [1, 2, 3] and sorted(recorder.eval) == [2, 3]
    return recorder


# ---------------------------------------------------------------- keys and messages


@pytest.mark.parametrize("module,keys,named", [
    ("swanlab", {"swanlab_project": "p"}, "'swanlab_project' asks for swanlab"),
    ("comet_ml", {"use_comet": True}, "'use_comet/comet_project_name' asks for comet_ml"),
    ("prometheus_client", {"use_otel_metrics": True}, "'use_otel_metrics' asks for prometheus_client"),
])
def test_a_missing_tracker_library_is_a_note_for_validate_and_a_refusal_for_train(tmp_path, monkeypatch, module,
                                                                                    keys, named):
    monkeypatch.setitem(sys.modules, module, None)  # how Python marks a module as absent: find_spec gives None
    result = _validate(tmp_path, **keys)
    assert result.exit_code == 0 and f"note: config key {named}" in result.stdout
    with pytest.raises(ConfigError, match=f"{named}, which is not installed; pip install 'plait\\["):
        build_run_config({"base_model": "m", **keys})  # as plait train does


def test_swanlab_keys_mean_what_they_mean_in_axolotl():
    from plait.builtin import swanlab_run

    cfg = _cfg(swanlab_project="p", swanlab_experiment_name="e", swanlab_description="d", swanlab_mode="cloud",
               swanlab_workspace="team", swanlab_lark_webhook_url="https://lark/hook", swanlab_lark_secret="s")
    kwargs = swanlab_run.init_kwargs(cfg)
    assert {k: kwargs[k] for k in ("project", "name", "description", "mode", "workspace")} == {
        "project": "p", "name": "e", "description": "d", "mode": "online", "workspace": "team"}
    assert kwargs["config"]["swanlab_project"] == "p"  # the run's config goes with it
    assert swanlab_run.wanted(cfg) and not swanlab_run.wanted(_cfg(swanlab_project="p", use_swanlab=False))
    with pytest.raises(ConfigError, match="'use_swanlab': true needs swanlab_project"):
        _cfg(use_swanlab=True)
    with pytest.raises(ConfigError, match="swanlab_mode"):
        _cfg(swanlab_project="p", swanlab_mode="online-ish")
    plugin = ["axolotl.integrations.swanlab.SwanLabPlugin"]
    with pytest.raises(ConfigError, match="SwanLabPlugin turns SwanLab on and needs swanlab_project"):
        _cfg(plugins=plugin)
    assert not swanlab_run.wanted(_cfg(plugins=plugin, use_swanlab=False))
    with pytest.raises(ConfigError, match="'swanlab_lark_secret' signs Lark notifications"):
        _cfg(swanlab_project="p", swanlab_lark_secret="s")


def test_swanlab_completion_table_keys(tmp_path):
    """The table itself is tested with a preference run (plait-preference's test_completion_samples.py)."""
    cfg = _cfg(swanlab_project="p")
    assert (cfg.swanlab_log_completions, cfg.swanlab_completion_log_interval, cfg.swanlab_completion_max_buffer) == (
        True, 100, 128)  # Axolotl's defaults
    with pytest.raises(ConfigError, match="swanlab_completion_max_buffer"):
        _cfg(swanlab_project="p", swanlab_completion_max_buffer=0)
    result = _validate(tmp_path, swanlab_project="p", swanlab_log_model=True, plugins=[
        "axolotl.integrations.swanlab.SwanLabPlugin"])
    assert result.exit_code == 2 and "swanlab_log_model: uploading checkpoints to SwanLab is not implemented" in (
        result.stdout + result.stderr)
    result = _validate(tmp_path, swanlab_project="p", swanlab_log_model=False, swanlab_completion_log_interval=50,
                       plugins=["axolotl.integrations.swanlab.SwanLabPlugin"])
    assert result.exit_code == 0, result.stdout + result.stderr


def test_comet_keys_mean_what_they_mean_in_axolotl():
    from plait.builtin import comet_run

    cfg = _cfg(comet_project_name="p", comet_workspace="w", comet_mode="create", comet_online=False,
               comet_experiment_key="k" * 32, comet_experiment_config={"name": "run", "comet_disabled": False})
    assert comet_run.wanted(cfg)  # a project name turns Comet on, as in Axolotl
    assert comet_run.start_kwargs(cfg) == {"workspace": "w", "project_name": "p", "experiment_key": "k" * 32,
                                           "mode": "create", "online": False}
    assert comet_run.experiment_settings(cfg) == {"name": "run", "disabled": False}
    assert not comet_run.wanted(_cfg(comet_project_name="p", use_comet=False))
    assert _cfg(use_comet=False, comet_workspace="w").comet_workspace == "w"  # turned off, keys left in place
    with pytest.raises(ConfigError, match="'comet_experiment_config': 'nmae' not accepted; accepted: .*name"):
        _cfg(use_comet=True, comet_experiment_config={"nmae": "x"})
    with pytest.raises(ConfigError, match="'comet_workspace': 'w' needs Comet on"):
        _cfg(comet_workspace="w")
    with pytest.raises(ConfigError, match="comet_mode"):
        _cfg(use_comet=True, comet_mode="append")


def test_mlflow_keys_mean_what_they_mean_in_axolotl():
    from plait.builtin.tracking import wants_mlflow

    assert wants_mlflow(_cfg(mlflow_tracking_uri="http://mlflow:5000"))
    assert wants_mlflow(_cfg(mlflow_experiment_name="e"))
    assert wants_mlflow(_cfg(use_mlflow=True))  # MLflow's default location
    assert not wants_mlflow(_cfg(mlflow_tracking_uri="http://mlflow:5000", use_mlflow=False))
    assert not wants_mlflow(_cfg())
    for key, value in (("mlflow_run_name", "r"), ("hf_mlflow_log_artifacts", True)):
        with pytest.raises(ConfigError, match=f"'{key}': {value!r} needs MLflow on: set mlflow_tracking_uri"):
            _cfg(**{key: value})
    assert _cfg(mlflow_experiment_name="e", mlflow_run_name="r", hf_mlflow_log_artifacts=True).mlflow_run_name == "r"


def test_otel_keys_need_use_otel_metrics():
    assert _cfg(use_otel_metrics=True, otel_metrics_port=9100).otel_metrics_port == 9100
    assert _cfg(otel_metrics_host="localhost", otel_metrics_port=8000).use_otel_metrics is False  # Axolotl's defaults
    with pytest.raises(ConfigError, match="'otel_metrics_port': 9100 needs use_otel_metrics: true"):
        _cfg(otel_metrics_port=9100)
    with pytest.raises(ConfigError, match="otel_metrics_port"):
        _cfg(use_otel_metrics=True, otel_metrics_port=70000)


# ---------------------------------------------------------------- real runs


def installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class PrometheusScraper:
    """Scrapes the run's endpoint over HTTP after every tracker has logged a
    step or an evaluation, as Prometheus would."""

    def __init__(self):
        self.train, self.eval = {}, {}

    def scrape(self, run) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(run.extras["otel"].url, timeout=10).read().decode()
        return {sample.name: sample.value for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name.startswith("plait_")}

    @hookimpl(trylast=True)
    def on_step_end(self, run, metrics):
        self.train[metrics["step"]] = self.scrape(run)

    @hookimpl(trylast=True)
    def on_eval_end(self, run, metrics):
        self.eval[metrics["step"]] = self.scrape(run)


@pytest.fixture(scope="module")
def tracked(tiny_model, tmp_path_factory):
    """One run logged to every tracker installed here at once (a run's time is
    the cost; trackers do not interact)."""
    tmp = tmp_path_factory.mktemp("tracked")
    keys, plugins, found = {}, [], SimpleNamespace(tmp=tmp)
    if installed("opentelemetry.exporter.prometheus"):
        found.scraper = PrometheusScraper()
        keys |= {"use_otel_metrics": True, "otel_metrics_host": "127.0.0.1", "otel_metrics_port": 0}
        plugins.append(found.scraper)
    if installed("swanlab"):
        import swanlab

        class Scalars(swanlab.Callback):
            """SwanLab's own callback API: the scalar records as they are flushed to the run."""

            records: list = []

            @property
            def name(self):
                return "plait-test-scalars"

            def on_scalar_flush(self, scalar_records, *args, **kwargs):
                self.records.extend((r.key, r.step, r.value.number) for r in scalar_records)

        swanlab.merge_callbacks(Scalars())
        found.swanlab = Scalars.records
        keys |= {"swanlab_project": "plait-test", "swanlab_mode": "offline", "swanlab_experiment_name": "tiny",
                 "swanlab_description": "a test"}
    if installed("comet_ml"):
        keys |= {"comet_project_name": "plait-test", "comet_online": False, "comet_experiment_config": {
            "offline_directory": str(tmp / "comet"), "name": "tiny", "log_code": False, "log_git_metadata": False,
            "log_git_patch": False, "log_env_details": False, "auto_output_logging": False}}
    if installed("mlflow"):
        found.mlflow = (tmp / "mlruns").as_uri()
        keys |= {"mlflow_tracking_uri": found.mlflow, "mlflow_experiment_name": "plait-test",
                 "mlflow_run_name": "tiny", "hf_mlflow_log_artifacts": True, "save_steps": 2}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # SwanLab writes ./swanlog, as in Axolotl
        mp.setenv("COMET_ERROR_TRACKING_ENABLE", "false")  # no error reports to Comet's Sentry from a test
        # MLflow 3 refuses a file store unless asked (a user logs to a server); the test needs no server
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        found.recorder = _train(tiny_model, tmp, keys, plugins)
    return found


@pytest.mark.slow
def test_otel_metrics_serve_the_runs_losses_to_prometheus(tracked):
    if not hasattr(tracked, "scraper"):
        pytest.skip("opentelemetry-exporter-prometheus is not installed")
    recorder, scraper = tracked.recorder, tracked.scraper
    for step, metrics in recorder.train.items():
        assert scraper.train[step]["plait_train_loss"] == metrics["loss"]
        assert scraper.train[step]["plait_train_lr"] == metrics["lr"]
        assert scraper.train[step]["plait_train_steps_total"] == step
    for step, metrics in recorder.eval.items():
        assert scraper.eval[step]["plait_eval_loss"] == metrics["eval_loss"]
    assert len({m["loss"] for m in recorder.train.values()}) == len(recorder.train)  # each value served in turn


@pytest.mark.slow
def test_swanlab_offline_run_logs_the_runs_losses(tracked):
    if not hasattr(tracked, "swanlab"):
        pytest.skip("swanlab is not installed")
    recorder = tracked.recorder
    logged = {(key, step): value for key, step, value in tracked.swanlab}
    assert {step: logged["train/loss", step] for step in recorder.train} == {
        step: pytest.approx(m["loss"], rel=1e-12) for step, m in recorder.train.items()}
    assert {step: logged["eval/loss", step] for step in recorder.eval} == {
        step: pytest.approx(m["eval_loss"], rel=1e-12) for step, m in recorder.eval.items()}
    assert list((tracked.tmp / "swanlog").glob("run-*/run-*.swanlab"))  # the offline record, for `swanlab sync`


@pytest.mark.slow
def test_comet_offline_archive_holds_the_runs_losses(tracked):
    if not installed("comet_ml"):
        pytest.skip("comet_ml is not installed")
    recorder = tracked.recorder
    [archive] = (tracked.tmp / "comet").glob("*.zip")  # what `comet upload` sends
    with zipfile.ZipFile(archive) as zf:
        messages = [json.loads(line) for line in zf.read("messages.json").decode().splitlines()]
    metrics = {(m["payload"]["metric"]["metricName"], m["payload"]["metric"]["step"]): m["payload"]["metric"]
               ["metricValue"] for m in messages if m["type"] == "metric_msg"}
    assert {step: metrics["train/loss", step] for step in recorder.train} == {
        step: m["loss"] for step, m in recorder.train.items()}
    assert {step: metrics["eval/loss", step] for step in recorder.eval} == {
        step: m["eval_loss"] for step, m in recorder.eval.items()}
    params = [m["payload"].get("param") or m["payload"]["params"] for m in messages if m["type"] == "parameter_msg"]
    params = {param["paramName"]: param["paramValue"] for param in params}
    assert params["comet_project_name"] == "plait-test"  # the run's config, as the experiment's parameters


@pytest.mark.slow
def test_mlflow_run_holds_the_runs_losses_config_and_artifacts(tracked):
    if not hasattr(tracked, "mlflow"):
        pytest.skip("mlflow is not installed")
    from mlflow.tracking import MlflowClient

    recorder = tracked.recorder
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracked.mlflow)
        experiment = client.get_experiment_by_name("plait-test")
        [run] = client.search_runs([experiment.experiment_id])
        history = {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
                   for name in ("train_loss", "eval_loss")}
        artifacts = {a.path: a for a in client.list_artifacts(run.info.run_id)}
        checkpoint = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint-2")}
        model = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert history["train_loss"] == {step: pytest.approx(m["loss"], rel=1e-6) for step, m in recorder.train.items()}
    assert history["eval_loss"] == {step: pytest.approx(m["eval_loss"], rel=1e-6)
                                    for step, m in recorder.eval.items()}
    assert run.data.params["mlflow_run_name"] == "tiny" and run.data.params["max_steps"] == "3"  # the run's config
    # hf_mlflow_log_artifacts: the checkpoint saved at step 2 and the final model's files, not its checkpoints
    assert artifacts["checkpoint-2"].is_dir and {"checkpoint-2/model", "checkpoint-2/manifest.json"} <= checkpoint
    assert {"model/model.safetensors", "model/config.json"} <= model
    assert not any(path.startswith("model/checkpoint-") for path in model)

"""OpenTelemetry metrics for Prometheus (Axolotl's ``use_otel_metrics``,
``otel_metrics_host``, ``otel_metrics_port``).

Every logged scalar becomes a gauge named ``plait_<train|eval>_<name>``
(``plait_train_loss``, ``plait_train_lr``, ``plait_train_grad_norm``,
``plait_eval_loss``, ...) holding its latest value, and
``plait_train_steps_total`` counts optimizer steps. An OpenTelemetry
``MeterProvider`` of the run's own (the process-wide one is left alone, so two
runs in one process do not clash) feeds a Prometheus reader, served at
``http://otel_metrics_host:otel_metrics_port/metrics`` from the start of
training to its end.
"""

from __future__ import annotations

import re

from plait.errors import ConfigError

MODULES = ("opentelemetry.sdk", "opentelemetry.exporter.prometheus", "prometheus_client")
INSTALL = "pip install 'plait[otel]' (opentelemetry-sdk, opentelemetry-exporter-prometheus)"


def wanted(cfg) -> bool:
    return cfg.use_otel_metrics


def check(cfg) -> None:
    if cfg.use_otel_metrics:
        return
    for key, default in (("otel_metrics_host", "localhost"), ("otel_metrics_port", 8000)):
        if getattr(cfg, key) != default:
            raise ConfigError(f"config key {key!r}: {getattr(cfg, key)!r} needs use_otel_metrics: true")


def metric_name(key: str) -> str:
    """``plait_train_loss`` for ``train/loss``: Prometheus names are ``[a-zA-Z_][a-zA-Z0-9_]*``."""
    return "plait_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


class OtelMetrics:
    """The run's meter, its gauges and the HTTP endpoint Prometheus scrapes."""

    def __init__(self, run) -> None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource
        from prometheus_client import start_http_server

        cfg = run.cfg
        self.provider = MeterProvider(metric_readers=[PrometheusMetricReader()],
                                      resource=Resource.create({"service.name": "plait"}))
        self.meter = self.provider.get_meter("plait.training")
        self.gauges: dict = {}
        self.steps = self.meter.create_counter("plait_train_steps", description="Optimizer steps completed")
        self.step = 0
        try:
            self.server, _ = start_http_server(cfg.otel_metrics_port, addr=cfg.otel_metrics_host)
        except OSError as exc:
            self.provider.shutdown()
            raise ConfigError(f"config key 'otel_metrics_port': cannot serve metrics on "
                              f"{cfg.otel_metrics_host}:{cfg.otel_metrics_port} ({exc.strerror or exc}); choose a "
                              "free port (0: any)") from None
        host, port = self.server.server_address[:2]
        self.url = f"http://{cfg.otel_metrics_host}:{port}/metrics"

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            name = metric_name(key)
            if name not in self.gauges:
                self.gauges[name] = self.meter.create_gauge(name, description=f"Latest {key} of the run")
            self.gauges[name].set(value)
        if step > self.step and any(key.startswith("train/") for key in scalars):
            self.steps.add(step - self.step)
            self.step = step

    def finish(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.provider.shutdown()  # also takes the reader's collector out of prometheus_client's registry

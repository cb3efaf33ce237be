"""``use_ray: true``: Ray Train starts the processes of a distributed run.

Axolotl's meaning: ``axolotl train`` with ``use_ray`` hands training to Ray
Train's ``TorchTrainer`` with ``ray_num_workers`` workers, each reserving
``resources_per_worker``. Here the driver (``plait train`` on the machine
that holds the config) validates the config, then starts the workers; each
worker runs Plait's ordinary training entry on the same config. Ray Train sets
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` and initialises
the default process group (NCCL on GPUs, gloo on CPUs) before the worker runs,
so :func:`plait.train.distributed.init_distributed` finds it and the run is the
one torchrun would give (plait-parallel shards it with FSDP2 the same way).

Ray is optional (``plait[ray]``): without it ``plait config validate`` notes
the fact and ``plait train`` refuses before any model work.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from pathlib import Path

from plait.errors import ConfigError, MachineFactError, TrainingError

logger = logging.getLogger(__name__)

#: set in every Ray Train worker: the worker trains as one process of the run and launches nothing
WORKER_ENV = "PLAIT_RAY_WORKER"


def in_ray_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def check_ray_launch(cfg) -> None:
    """What ``use_ray`` conflicts with, and whether this machine has Ray.

    A worker is one process of the run and checks nothing here. Launched by
    torchrun (``WORLD_SIZE`` set) the processes exist already, and Ray would
    start N more in each of them.
    """
    if not cfg.use_ray or in_ray_worker():
        return
    placed = [key for key in ("device_map", "max_memory") if getattr(cfg, key, None) is not None]
    if placed and cfg.ray_num_workers > 1:
        raise ConfigError(f"config key {placed[0]!r} places the model within one process, and use_ray starts "
                          f"ray_num_workers: {cfg.ray_num_workers} processes; remove {' and '.join(placed)} (shard "
                          f"with fsdp) or set ray_num_workers: 1")
    world_size = os.environ.get("WORLD_SIZE")
    if world_size not in (None, "", "1"):
        raise MachineFactError(f"config key 'use_ray': true starts its own processes through Ray Train, and this "
                               f"process is already one of {world_size} (WORLD_SIZE, set by torchrun or accelerate "
                               f"launch); run plait train once, without the launcher, or set use_ray: false")
    if importlib.util.find_spec("ray") is None:
        raise MachineFactError("config key 'use_ray': true needs Ray Train, which is not installed here; "
                               "pip install 'plait[ray]' (ray[train]), or set use_ray: false and launch with torchrun")


def scaling(cfg) -> dict:
    """``ScalingConfig`` arguments: a GPU per worker where CUDA is available
    (Axolotl's default ``{GPU: 1}``), one CPU each otherwise; a
    ``resources_per_worker`` that names GPUs asks for them whatever the driver has
    (the driver of a cluster often has none)."""
    import torch

    resources = dict(cfg.resources_per_worker) if cfg.resources_per_worker else None
    if resources is not None and "GPU" in resources:
        use_gpu = resources["GPU"] > 0
    else:
        use_gpu = torch.cuda.is_available()
    return {"num_workers": cfg.ray_num_workers, "use_gpu": use_gpu, "resources_per_worker": resources}


def train_with_ray(args, cfg) -> None:
    """Run ``plait train`` (the already validated ``cfg`` from ``args``) on
    ``ray_num_workers`` Ray Train workers and wait for them."""
    check_ray_launch(cfg)  # load_run_config filed it already; here for a caller that skipped it
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    settings = scaling(cfg)
    storage = Path(cfg.output_dir).absolute() / "ray"
    logger.info("ray: training on %d Ray Train worker(s) (%s, resources per worker: %s); Ray's run state in %s",
                settings["num_workers"], "GPU" if settings["use_gpu"] else "CPU, gloo",
                settings["resources_per_worker"] or "Ray's default", storage)
    worker_args = {
        "cwd": os.getcwd(),  # relative paths in the config mean what they mean here
        "config": str(Path(args.config).absolute()),
        "overrides": list(args.overrides),
        "allow_unsupported": bool(getattr(args, "allow_unsupported", False)),
        "extra_plugins": list(getattr(args, "extra_plugins", [])),
        "verbose": bool(getattr(args, "verbose", False)),
    }
    scaling_config = ScalingConfig(**settings)
    check_cluster_room(scaling_config.total_resources)
    trainer = TorchTrainer(
        train_worker, train_loop_config=worker_args, scaling_config=scaling_config,
        run_config=RunConfig(name=cfg.ray_run_name, storage_path=str(storage)))
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps a worker's error in its own (TrainingFailedError and kin)
        error = worker_plait_error(exc)
        if error is not None:
            raise error from exc  # the message plait train gives without Ray, and its exit status
        raise TrainingError(f"Ray training failed: {exc}") from exc


def worker_plait_error(exc: BaseException):
    """The first Plait error a worker raised (lowest rank), from Ray's
    ``WorkerGroupError.worker_failures``; None for any other failure."""
    from plait.errors import PlaitError

    failures = getattr(exc, "worker_failures", None) or {}
    for rank in sorted(failures):
        error, seen = failures[rank], set()
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            if isinstance(error, PlaitError):
                return error
            error = error.__cause__ or getattr(error, "cause", None)
    return None


def use_this_workers_gpu() -> None:
    """Plait takes this process's GPU from ``LOCAL_RANK`` (as torchrun sets it);
    under Ray the GPU Ray gave this worker is the index ``get_device()`` names
    among the visible ones, which Ray does not promise to equal its local rank."""
    import torch

    if not torch.cuda.is_available():
        return
    from ray.train.torch import get_device

    device = get_device()
    if device.type == "cuda" and device.index is not None:
        os.environ["LOCAL_RANK"] = str(device.index)


def check_cluster_room(needed: dict) -> None:
    """Refuse what the Ray cluster cannot give: Ray Train would wait for the
    resources forever. A cluster named by ``RAY_ADDRESS`` may grow
    (an autoscaler), so there it is only said."""
    import ray

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS names a running cluster; without it, a local one on this machine
    has = ray.cluster_resources()
    short = {name: amount for name, amount in needed.items() if has.get(name, 0) < amount}
    if not short:
        return
    wanted = ", ".join(f"{name} {amount:g}" for name, amount in needed.items())
    present = ", ".join(f"{name} {has.get(name, 0):g}" for name in needed)
    if os.environ.get("RAY_ADDRESS", "local") not in ("", "local"):
        logger.warning("ray: the workers need %s in all and the cluster at RAY_ADDRESS has %s now; Ray Train waits "
                       "until it has them", wanted, present)
        return
    raise MachineFactError(f"config keys 'ray_num_workers' / 'resources_per_worker': the workers need {wanted} in "
                           f"all, and the local Ray cluster has {present}; lower ray_num_workers or "
                           f"resources_per_worker, or join a larger cluster (RAY_ADDRESS)")


def train_worker(worker_args: dict) -> None:
    """One Ray Train worker: Plait's training entry as one process of the run
    (Ray has set the distributed environment and process group)."""
    os.environ[WORKER_ENV] = "1"
    os.chdir(worker_args["cwd"])
    from plait.commands.common import load_run_config
    from plait.logs import set_verbose, show_plait_logs
    from plait.train.loop import train

    use_this_workers_gpu()
    set_verbose(worker_args["verbose"])
    # Ray's worker prints every library's INFO records to the console through the root logger; Plait's
    # handler (below) shows what plait train shows. Ray's session log file handler stays.
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "stream", None) is not None and not isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
    show_plait_logs()
    args = argparse.Namespace(config=worker_args["config"], overrides=worker_args["overrides"],
                              allow_unsupported=worker_args["allow_unsupported"],
                              extra_plugins=worker_args["extra_plugins"])
    cfg, pm = load_run_config(args)
    train(cfg, pm)

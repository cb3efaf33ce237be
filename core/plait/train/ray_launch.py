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

import logging
import os
from pathlib import Path

from plait.config.ray_keys import WORKER_ENV, check_ray_launch
from plait.errors import MachineFactError, TrainingError

logger = logging.getLogger(__name__)

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


def train_with_ray(args, cfg, worker) -> None:
    """Run ``plait train`` (the already validated ``cfg`` from ``args``) on
    ``ray_num_workers`` Ray Train workers and wait for them; ``worker`` (the
    train command's :func:`plait.commands.train.ray_worker`) is what each runs,
    given the dict below."""
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
        worker, train_loop_config=worker_args, scaling_config=scaling_config,
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


def become_worker(worker_args: dict) -> None:
    """Set up this Ray Train worker process as one process of the run: marked
    as a worker (it launches nothing), in the driver's working directory, on
    the GPU Ray gave it, with Plait's log lines only."""
    os.environ[WORKER_ENV] = "1"
    os.chdir(worker_args["cwd"])
    from plait.logs import set_verbose, show_plait_logs

    use_this_workers_gpu()
    set_verbose(worker_args["verbose"])
    # Ray's worker prints every library's INFO records to the console through the root logger; Plait's
    # handler (below) shows what plait train shows. Ray's session log file handler stays.
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "stream", None) is not None and not isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
    show_plait_logs()

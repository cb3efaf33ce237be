"""The rules of ``use_ray`` (the launcher itself is :mod:`plait.train.ray_launch`).

They live with the config so that validation, in core's builtin plugin, does
not import the training package.
"""

from __future__ import annotations

import importlib.util
import os

from plait.errors import ConfigError, MachineFactError

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

"""Process group, device and seeds: the little a single loop needs to know
about running as one of several processes.

Launchers (``torchrun``, ``accelerate launch``) set ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``; when they are present and the world has more than one
process, the default process group is initialised with NCCL on GPUs and gloo
on the CPU. Everything about *how* the model is split lives in the
``wrap_parallel`` plugin (plait-parallel); core only reads the mesh it leaves
on the model (:func:`plait.model.mesh.mesh_of`) to know which ranks share a batch.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: object = None
    owns_process_group: bool = False


def init_distributed(timeout_s: int | None = None) -> World:
    """This process's place in the run; joins the default process group when a
    launcher started several. ``timeout_s`` (``ddp_timeout``): how long a
    collective waits for the other processes before it fails (torch's default
    otherwise: 10 minutes for NCCL, 30 for gloo)."""
    import datetime

    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world_size <= 1:
        return World(device=device)
    owns = False
    if not dist.is_initialized():
        timeout = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group("nccl" if cuda else "gloo", **timeout)
        owns = True
    return World(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=device,
                 owns_process_group=owns)


def close_distributed(world: World) -> None:
    import torch.distributed as dist

    if world.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def data_parallel_rank_and_size(mesh, world: World) -> tuple[int, int]:
    """Which slice of the data this rank reads: ranks of one tensor/context
    parallel group read the same batch, so the ``dp`` mesh dimension decides."""
    if mesh is not None and "dp" in _dim_names(mesh):
        return mesh["dp"].get_local_rank(), mesh["dp"].size()
    return world.rank, world.world_size


def data_parallel_group(mesh, world: World):
    """The process group of the ranks that hold different rows of a step
    (those :func:`data_parallel_rank_and_size` deals the data to: the ``dp``
    mesh dimension, or every rank without one); ``None`` when there is one
    such rank, so a statistic over the step's batch needs no collective.
    Tensor/context-parallel ranks of one data rank are not in it: they hold
    the same rows, and summing over them would count each row again."""
    import torch.distributed as dist

    if mesh is not None and "dp" in _dim_names(mesh):
        return mesh["dp"].get_group() if mesh["dp"].size() > 1 else None
    return dist.group.WORLD if world.world_size > 1 else None


def _dim_names(mesh) -> tuple[str, ...]:
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    flattened = getattr(getattr(mesh, "_get_root_mesh", lambda: mesh)(), "_flatten_mapping", None) or {}
    return names + tuple(flattened)


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum ``values`` over every rank (no-op for one process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def loss_divisor(mesh, world: World, local_tokens: int) -> float:
    """What each rank divides its summed loss by so that, after the wrapper
    averages gradients over the data (and context) parallel ranks, the
    gradient is the mean over every trained token of the global batch."""
    import torch
    import torch.distributed as dist

    if world.world_size == 1:
        return float(max(local_tokens, 1))
    count = torch.tensor([float(local_tokens)], dtype=torch.float64, device=world.device)
    names = _dim_names(mesh) if mesh is not None else ()
    if "dp" in names and "cp" in names:
        group_size = 1
        for name in ("dp", "cp"):
            if mesh[name].size() > 1:
                dist.all_reduce(count, group=mesh[name].get_group())
            group_size *= mesh[name].size()
    else:  # plain data parallel (DDP): every rank holds different data
        dist.all_reduce(count)
        group_size = world.world_size
    return max(count.item(), 1.0) / group_size

"""One ``DeviceMesh`` for every kind of parallelism, and who gets which data.

The mesh always has four named dimensions, outermost first, size-1 ones
included so code can name a dimension without checking whether it exists::

    ("dp_replicate", "dp_shard", "cp", "tp")

    world of 8 with dp_shard 2, cp 2, tp 2 (dp_replicate 1):

        rank:        0 1 | 2 3 | 4 5 | 6 7
        tp group:    [0 1] [2 3] [4 5] [6 7]    innermost: split each layer
        cp group:    [0 2] [1 3] [4 6] [5 7]    split each sequence
        dp_shard:    [0 4] [1 5] [2 6] [3 7]    disjoint data, sharded weights

Two flattened dimensions are added because the consumers need them:

``dp``          dp_replicate x dp_shard: ranks that see different batches
``dp_shard_cp`` dp_shard x cp: the ranks FSDP2 shards over; context-parallel
                ranks hold different tokens of one batch, so their gradients
                must be reduced like data-parallel ones
"""

from __future__ import annotations

from plait_parallel.config import mesh_sizes

MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")


def build_mesh(cfg, world_size: int | None = None, device_type: str | None = None):
    """Build the run's mesh from ``cfg`` (the process group must be initialised).

    ``world_size`` defaults to ``torch.distributed.get_world_size()``;
    ``device_type`` to ``"cuda"`` when CUDA is available, else ``"cpu"``.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world_size = dist.get_world_size() if world_size is None else world_size
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = mesh_sizes(cfg, world_size, "the process group's world size")
    mesh = init_device_mesh(device_type, tuple(sizes[d] for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    return mesh


def data_parallel_rank_and_size(mesh) -> tuple[int, int]:
    """``(rank, size)`` for splitting data: ranks with the same rank here (the
    TP and CP ranks of one group) must receive the same batch."""
    if mesh is None:
        return 0, 1
    return mesh["dp"].get_local_rank(), mesh["dp"].size()


def dim_size(mesh, name: str) -> int:
    """Size of a named mesh dimension (1 without a mesh)."""
    return 1 if mesh is None else mesh[name].size()


def gradient_group_size(mesh) -> int:
    """How many ranks FSDP2 averages gradients over (dp x cp): a loop that
    wants a global per-token mean divides each rank's summed loss by
    ``global_token_count / gradient_group_size(mesh)``."""
    if mesh is None:
        return 1
    return mesh["dp"].size() * mesh["cp"].size()


def loss_divisor(mesh, local_tokens):
    """The divisor that turns each rank's summed loss into a global per-token
    mean after FSDP2's gradient averaging.

    All-reduces the trained-token count over the data-parallel and
    context-parallel ranks (TP ranks hold the same tokens, so they are not
    counted twice) and returns ``global_tokens / gradient_group_size``.
    """
    import torch
    import torch.distributed as dist

    count = torch.as_tensor(local_tokens, dtype=torch.float64).reshape(1).clone()
    if mesh is None:
        return float(count.item())
    count = count.to(mesh.device_type)
    for name in ("dp", "cp"):
        if mesh[name].size() > 1:
            dist.all_reduce(count, group=mesh[name].get_group())
    return float(count.item()) / gradient_group_size(mesh)

"""FSDP2 (``fully_shard``) over the mesh's data-parallel ranks.

Every decoder layer becomes its own FSDP unit (its parameters are gathered
just before it runs and freed after), then the root takes what is left
(embeddings, final norm, head). The shard group is ``dp_shard x cp``:
context-parallel ranks hold different tokens of one batch, so their gradients
are reduced like data-parallel ones. With ``dp_replicate_size > 1`` the mesh
is 2-D and FSDP2 shards within a group and replicates across groups (HSDP).

Gradients are *averaged* over that group (FSDP2's default); see
:func:`plait_parallel.mesh.loss_divisor` for the matching loss scale.
"""

from __future__ import annotations

import warnings


def param_dtype(cfg, model):
    """The compute dtype FSDP2 casts gathered parameters to, or ``None`` to
    keep the loaded dtype. ``bf16: true`` / ``fp16: true`` on float32 weights
    ask for mixed precision; ``bf16: auto`` does only where CUDA has bf16."""
    import torch

    loaded = next(model.parameters()).dtype
    if loaded != torch.float32:
        return None
    bf16 = getattr(cfg, "bf16", False)
    if bf16 == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if bf16 is True or bf16 == "full":
        return torch.bfloat16
    if getattr(cfg, "fp16", False):
        return torch.float16
    return None


def fsdp_mesh(mesh):
    """The sub-mesh FSDP2 shards over: 1-D ``dp_shard_cp`` or 2-D HSDP."""
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard_cp"]
    return mesh["dp_shard_cp"]


def apply_fsdp(cfg, model, mesh, layers, options) -> None:
    """Shard ``layers`` one by one, then the root ``model`` (in place)."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    dtype = param_dtype(cfg, model)
    offload = options.offload_params
    if offload and mesh.device_type == "cpu":
        # CPUOffloadPolicy moves shards between the accelerator and the host; on a
        # CPU mesh the parameters already live on the host, so there is nothing to do
        warnings.warn("fsdp_offload_params has no effect on a CPU mesh (parameters are already on the CPU)",
                      stacklevel=2)
        offload = False
    reduce_dtype = getattr(torch, options.reduce_dtype) if options.reduce_dtype else (torch.float32 if dtype else None)
    kwargs = dict(
        mesh=fsdp_mesh(mesh),
        reshard_after_forward=options.reshard_after_forward,
        mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce_dtype),
        offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy(),
    )
    for layer in layers:
        fully_shard(layer, **kwargs)
    # the root's parameters are needed again at once by the loss: keep them gathered
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})

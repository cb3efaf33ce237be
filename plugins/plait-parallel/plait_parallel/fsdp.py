"""FSDP2 (``fully_shard``) over the mesh's data-parallel ranks.

Every decoder layer becomes its own FSDP unit (its parameters are gathered
just before it runs and freed after), then the root takes what is left
(embeddings, final norm, head). The shard group is ``dp_shard x cp``:
context-parallel ranks hold different tokens of one batch, so their gradients
are reduced like data-parallel ones. With ``dp_replicate_size > 1`` the mesh
is 2-D and FSDP2 shards within a group and replicates across groups (HSDP).

Frozen integer weights (``load_in_8bit``) are not sharded: every rank keeps
them whole (:func:`whole_parameters`), as FSDP2's ``ignored_params``.

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


def whole_parameters(model) -> set:
    """Frozen integer parameters (bitsandbytes' LLM.int8 weights, whose
    row scales live beside them as attributes FSDP2 would drop): left out of
    the shards, each rank keeps them whole. Nothing trains them, so they need
    no gradient reduction; the float parameters around them are sharded as
    usual."""
    return {param for param in model.parameters() if not param.is_floating_point() and not param.requires_grad}


def drop_extra_state(model, whole: set) -> None:
    """Leave out of the state dict what the modules holding ``whole``
    parameters add beside their parameters and buffers (bitsandbytes'
    ``SCB`` row scales and ``weight_format``): torch's state-dict gatherer
    (``get_model_state_dict``) cannot map such keys to a tensor of the model.
    They describe frozen base weights, which no save under an adapter (the
    adapter, a checkpoint's trainable weights) writes."""
    for module in model.modules():
        if any(param in whole for param in module.parameters(recurse=False)):
            module._register_state_dict_hook(_keep_only_own_tensors)


def _keep_only_own_tensors(module, state_dict, prefix, local_metadata):
    own = {prefix + name for name, _ in module.named_parameters(recurse=False)}
    own |= {prefix + name for name, _ in module.named_buffers(recurse=False)}
    for key in [key for key in state_dict if key.startswith(prefix) and "." not in key[len(prefix):]]:
        if key not in own:
            del state_dict[key]


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
    replicated = whole_parameters(model)
    if replicated:
        kwargs["ignored_params"] = replicated
        drop_extra_state(model, replicated)
    for layer in layers:
        fully_shard(layer, **kwargs)
    # the root's parameters are needed again at once by the loss: keep them gathered
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})

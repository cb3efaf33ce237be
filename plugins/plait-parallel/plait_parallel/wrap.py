"""``wrap_parallel``: apply TP, then context parallel, then FSDP2, on one mesh.

The order matters: tensor parallelism turns linears' weights into DTensors on
the ``tp`` dimension; FSDP2 then shards those (and the plain parameters) over
the data-parallel dimensions of the same root mesh, which is how the two
compose into 2-D parallelism. Context parallelism only swaps the attention
function, so it can come anywhere before the first forward.

``mesh`` may be ``None`` or a mesh built elsewhere without this package's
dimension names: the mesh is then built from the config
(:func:`plait_parallel.mesh.build_mesh`). Without an initialised process group
the model is returned unchanged.
"""

from __future__ import annotations

from plait.model.mesh import attach_mesh
from plait_parallel.config import fsdp_options, ring_split
from plait_parallel.mesh import MESH_DIMS, build_mesh


def wrap_model(cfg, model, mesh=None):
    """Shard ``model`` in place over ``mesh`` (built from ``cfg`` when ``None``)
    and return it; the mesh is recorded with ``plait.model.mesh.attach_mesh``."""
    import torch.distributed as dist

    if mesh is None or tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        if not dist.is_available() or not dist.is_initialized():
            return model  # one process, nothing to shard
        # no mesh, or one without this package's named dimensions (a loop's
        # plain 1-D data-parallel mesh): build the full one from the config
        mesh = build_mesh(cfg)
    from plait_parallel.layers import decoder_layer_class, decoder_layers

    options = fsdp_options(cfg)
    layers = decoder_layers(model, decoder_layer_class(cfg, model, options.layer_cls))

    # fsdp_config.activation_checkpointing was applied before any sharding, by core's model
    # pipeline (plait.model.recompute.apply_gradient_checkpointing asks this plugin's hook)

    if mesh["tp"].size() > 1:
        from plait_parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(cfg, model, mesh["tp"], layers)

    if mesh["cp"].size() > 1:
        from plait_parallel.context_parallel import enable_context_parallel

        # shard_batch reads the same split from the config (plait_parallel.config.ring_split)
        enable_context_parallel(model, mesh["cp"], split=ring_split(cfg), heads_k_stride=cfg.heads_k_stride)

    # data-parallel and context-parallel ranks must reduce gradients: FSDP2 does it
    if mesh["dp_shard_cp"].size() * mesh["dp_replicate"].size() > 1:
        from plait_parallel.fsdp import apply_fsdp

        apply_fsdp(cfg, model, mesh, layers, options)

    attach_mesh(model, mesh)
    return model

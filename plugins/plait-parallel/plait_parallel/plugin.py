"""Hookimpls of plait-parallel (entry point ``parallel``).

* ``config_schema``: the parallelism keys (:class:`~plait_parallel.config.ParallelConfig`).
* ``validate_config``: mesh sizes against ``WORLD_SIZE``, before any model work.
* ``gradient_checkpointing_mode``: on for ``fsdp_config.activation_checkpointing``
  in a run of several processes.
* ``wrap_parallel``: TP -> context parallel -> FSDP2 on the given mesh, or on
  one built from the config when ``mesh`` is ``None`` and a process group is
  initialised (:func:`plait_parallel.mesh.build_mesh`). The mesh used is
  recorded on the returned model (``plait.model.mesh.attach_mesh``).
* ``shard_batch``: the context-parallel slice of each micro-batch
  (:func:`plait_parallel.context_parallel.shard_batch_for_context_parallel`).
* ``register_commands``: ``plait merge-sharded``.

Helpers for the training loop live beside: ``mesh.data_parallel_rank_and_size``,
``mesh.loss_divisor``, ``context_parallel.shard_batch_for_context_parallel``,
``checkpoint.save_sharded`` / ``load_sharded``.
"""

from __future__ import annotations

from plait.hookspecs import hookimpl


@hookimpl
def config_schema():
    from plait_parallel.config import ParallelConfig

    return ParallelConfig


@hookimpl
def validate_config(cfg):
    from plait_parallel.config import validate

    validate(cfg)
    if cfg.deepspeed:
        from plait_parallel.deepspeed import translation_note

        cfg.add_note(translation_note(cfg.deepspeed))


@hookimpl
def gradient_checkpointing_mode(cfg):
    """``fsdp_config.activation_checkpointing`` in a run of several processes:
    recompute the decoder layers even with ``gradient_checkpointing`` off (a
    top-level ``gradient_checkpointing: offload`` keeps its offloading);
    ``None`` otherwise, leaving the answer to core (the config's value)."""
    import torch.distributed as dist

    from plait_parallel.config import fsdp_options

    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not several or not fsdp_options(cfg).activation_checkpointing:
        return None
    return cfg.gradient_checkpointing or True


@hookimpl
def wrap_parallel(cfg, model, mesh):
    from plait_parallel.wrap import wrap_model

    return wrap_model(cfg, model, mesh)


@hookimpl
def shard_batch(cfg, batch, mesh):
    """Context parallel: this rank's slice of every sequence (with
    ``shift_labels`` and ``position_ids``); ``None`` when the mesh has no
    ``cp`` dimension of size > 1, so the loop keeps the batch whole."""
    if mesh is None or "cp" not in (getattr(mesh, "mesh_dim_names", None) or ()) or mesh["cp"].size() <= 1:
        return None
    from plait_parallel.config import ring_split
    from plait_parallel.context_parallel import shard_batch_for_context_parallel

    return shard_batch_for_context_parallel(batch, mesh, ring_split(cfg))


@hookimpl
def register_commands(subparsers):
    from plait_parallel.commands import add_merge_sharded

    add_merge_sharded(subparsers)

"""The device mesh a model was sharded over: the message from the
``wrap_parallel`` plugin to the training loop (which ranks share a batch) and
to ``shard_batch``. One owner for where it is kept, so neither side spells an
attribute name."""

from __future__ import annotations

#: where :func:`attach_mesh` keeps the mesh (read it only through :func:`mesh_of`)
_MESH = "plait_mesh"


def attach_mesh(model, mesh) -> None:
    """Record the ``torch.distributed.DeviceMesh`` ``model`` is sharded over
    (a ``wrap_parallel`` implementation calls this on the model it returns)."""
    setattr(model, _MESH, mesh)


def mesh_of(model):
    """The mesh :func:`attach_mesh` recorded on ``model``, else ``None``
    (a model replicated with DDP, or a single process)."""
    return getattr(model, _MESH, None)

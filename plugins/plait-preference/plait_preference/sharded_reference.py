"""The frozen reference of full fine-tuning when FSDP2 shards the policy.

One process keeps a frozen copy of the starting model (``copy.deepcopy``,
:func:`plait_preference.objective.reference_model`). FSDP2 refuses to deep-copy
a sharded module, and a whole copy on every rank would undo the sharding, so
under FSDP2 the reference is sharded the way the policy is, in three steps:

1. ``wrap_parallel`` (this plugin's wrapper around whichever plugin shards):
   before the policy is sharded, a copy of its modules on the ``meta`` device
   (:func:`meta_copy`: the structure, patched kernels and all, no memory);
   after, when the policy came back sharded by FSDP2, each rank's local
   shards of the starting weights (:class:`PendingReference`).
2. ``build_objective`` takes the pending reference for this model
   (:func:`pending_for`).
3. ``on_train_start`` shards the meta copy through the same ``wrap_parallel``
   hook on the run's mesh (same layout, same mixed precision), allocates its
   shards and copies the starting shards in (:meth:`PendingReference.build`).
   By then a resumed run's policy holds trained weights; the copied shards
   were taken before the checkpoint was loaded, so the reference is the
   starting model either way.

Each rank holds ``1 / shards`` of the reference, without gradients; after
each reference forward its gathered root parameters are freed again
(:func:`free_gathered`).
"""

from __future__ import annotations

import weakref

#: sharded policy -> its PendingReference, from wrap_parallel until build_objective takes it
_PENDING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def meta_copy(model):
    """A deep copy of ``model`` whose parameters and buffers live on the
    ``meta`` device (frozen), so copying costs no memory; tied parameters stay
    tied (one meta tensor per original tensor)."""
    import copy

    import torch

    memo = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in memo:
            continue
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = torch.nn.Parameter(empty, requires_grad=False) \
            if isinstance(tensor, torch.nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def is_fsdp_sharded(model) -> bool:
    """Whether FSDP2 (``fully_shard``) manages some module of ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def gathered_dtype(model) -> str | None:
    """The dtype FSDP2's mixed precision casts ``model``'s gathered
    parameters to for the forward, as a string; ``None`` when no module is
    sharded or the policy keeps the stored dtype. Read from the root unit's
    policy (one policy for every unit: plait-parallel shards them alike)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            # no public getter in torch 2.x; an attribute it lacks reads as "not cast"
            policy = getattr(module._get_fsdp_state(), "_mp_policy", None)
            dtype = getattr(policy, "param_dtype", None)
            return None if dtype is None else str(dtype)
    return None


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class PendingReference:
    """The reference before ``on_train_start`` shards it: the policy's
    structure on ``meta`` and this rank's shards of the starting weights."""

    def __init__(self, skeleton, policy):
        self.skeleton = skeleton
        # this rank's part only: what the reference's shards will hold
        self.starting = {name: _local(param.detach()).clone() for name, param in policy.named_parameters()}
        self.buffers = {name: buffer.detach().clone() for name, buffer in policy.named_buffers()}

    def build(self, run):
        """Shard the copy on ``run.mesh`` through ``wrap_parallel`` and fill
        its shards with the starting weights; returns the frozen reference."""
        import torch

        from plait.errors import PluginError
        from plait.model.forward import share_head_plan

        reference = run.pm.hook.wrap_parallel(cfg=run.cfg, model=self.skeleton, mesh=run.mesh)
        if reference is None or not is_fsdp_sharded(reference):
            raise PluginError("plait-preference: the policy is sharded by FSDP2, but wrap_parallel did not shard "
                              "the reference copy the same way; set precompute_ref_log_probs: true instead")
        reference.to_empty(device=run.device)
        with torch.no_grad():
            for name, param in reference.named_parameters():
                shard = _local(param)
                start = self.starting.pop(name)
                if shard.shape != start.shape:
                    raise PluginError(f"plait-preference: the reference's shard of {name} is {tuple(shard.shape)}, "
                                      f"the policy's {tuple(start.shape)}; the two are not sharded alike")
                shard.copy_(start)
            for name, buffer in reference.named_buffers():
                buffer.copy_(self.buffers[name])
        reference.requires_grad_(False)
        reference.eval()
        share_head_plan(reference, run.model)
        self.skeleton = self.starting = self.buffers = None
        return reference


def remember(skeleton, policy) -> None:
    """After ``wrap_parallel``: keep the reference's makings for a policy FSDP2 sharded."""
    if is_fsdp_sharded(policy):
        _PENDING[policy] = PendingReference(skeleton, policy)


def pending_for(model):
    """The :class:`PendingReference` kept for ``model`` (taken: a second call gets ``None``)."""
    return _PENDING.pop(model, None)


def free_gathered(reference) -> None:
    """Free the parameters a reference forward left gathered: FSDP2 keeps the
    root's (embeddings, head) after forward for the loss, which the reference
    has already computed."""
    from torch.distributed.fsdp import FSDPModule

    for module in reference.modules():  # every unit: shard_grad_op keeps the layers' gathered too
        if isinstance(module, FSDPModule):
            module.reshard()

"""The CPU tensor a batch's device tensor was copied from, kept on it.

At the start of a forward transformers and Plait ask questions of a batch's
mask and positions (does the mask hold padding? where do the packed rows
start?). Answered from the device tensor, each question makes the host wait
for everything queued on the GPU before it. As a collated batch moves to the
device (:func:`plait.data.batching.to_device`), :func:`keep_host_copies`
leaves on each moved ``attention_mask`` and ``position_ids`` the CPU tensor it
came from, and :func:`host_copy` finds it, so the answers come from the host:
:mod:`plait.model.mask_checks` and :func:`plait.model.forward.packed_segments`.
"""

from __future__ import annotations

#: the batch keys whose host copies are kept
KEPT_KEYS = ("attention_mask", "position_ids")
#: attribute of a moved tensor holding the CPU tensor it was copied from
_ATTRIBUTE = "_plait_host_copy"


def keep_host_copies(host_batch: dict, device_batch: dict) -> dict:
    """Keep, on each of ``device_batch``'s :data:`KEPT_KEYS` tensors that left
    the CPU, ``host_batch``'s tensor it was copied from; returns
    ``device_batch``."""
    for key in KEPT_KEYS:
        host, moved = host_batch.get(key), device_batch.get(key)
        if host is None or moved is None or moved is host or not hasattr(host, "device"):
            continue
        if host.device.type == "cpu" and moved.device.type != "cpu" and tuple(host.shape) == tuple(moved.shape):
            setattr(moved, _ATTRIBUTE, host)
    return device_batch


def host_copy(tensor):
    """``tensor`` itself when it is on the CPU; else the CPU tensor it was
    copied from where :func:`keep_host_copies` kept it; else ``None``."""
    if tensor is None or not hasattr(tensor, "device"):
        return None
    if tensor.device.type == "cpu":
        return tensor
    return getattr(tensor, _ATTRIBUTE, None)

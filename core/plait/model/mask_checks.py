"""transformers' mask checks answered from what the host knows, without a device read.

transformers (5.17 to 5.25) decides at the start of each forward how to build
the attention mask by reading device tensors in Python ``if``s: on a GPU each
read makes the host wait for everything queued before it (about a millisecond
per forward on an H100; a DPO step has two forwards, policy and reference).
Plait knows both answers on the host, before the batch moves:

* **token ids alone** (no ``attention_mask``, no ``position_ids``, no cache, no
  other input): the model makes its position ids itself, ``arange(seq)`` per
  row, and ``masking_utils.find_packed_sequence_indices`` tests them for
  packed rows (``(packed_sequence_mask[:, -1] == 0).all()``). For such
  positions its answer is ``None`` (one sequence per row), given here without
  reading them.
* **a padding mask with padding** (a 2-D mask whose host copy holds a 0:
  :func:`host_has_padding`, :mod:`plait.model.host_copies`): SDPA's ``_ignore_causal_mask_sdpa`` reads the
  mask (``fast_all``, up to twice) to see whether it can drop it for
  ``is_causal``; with a masked position in a ``[batch, seq]`` mask over the
  whole query (no cache, no offset) its answer is ``False`` (keep the mask),
  given here without reading it.

:func:`answered_on_host` wraps a forward; the wrappers around transformers'
two functions are installed once, read a thread-local state, and leave every
other call (another thread, other shapes, positions the caller passed, as
packed batches and the windowed models of
:func:`plait.data.packing.masks_from_positions` pass them) to the original.
"""

from __future__ import annotations

import contextlib
import threading

from plait.model.host_copies import host_copy

_state = threading.local()


def takes_ids_only(inputs: dict) -> bool:
    """Whether a forward's keyword arguments are the token ids alone (other
    keys set to ``None`` do not count)."""
    return inputs.get("input_ids") is not None and all(
        value is None for key, value in inputs.items() if key != "input_ids")


def host_has_padding(mask) -> bool:
    """Whether ``mask``, a 2-D integer or bool padding mask, holds a masked
    position, told by its copy on the host (the mask itself on the CPU, the
    tensor it was copied from on a device); False where no host copy is known."""
    host = host_copy(mask)
    return host is not None and host.dim() == 2 and not host.dtype.is_floating_point and bool((host == 0).any())


@contextlib.contextmanager
def answered_on_host(inputs: dict):
    """Run a forward of ``inputs`` (its keyword arguments, as the caller gave
    them) with the checks the host can answer answered (the module docstring)."""
    ids_only = takes_ids_only(inputs)
    mask = inputs.get("attention_mask")
    padded_width = None
    if host_has_padding(mask) and inputs.get("past_key_values") is None:
        padded_width = mask.shape[-1]
    if not (ids_only or padded_width) or not _install():
        yield
        return
    before = getattr(_state, "ids_only", False), getattr(_state, "padded_width", None)
    _state.ids_only, _state.padded_width = ids_only, padded_width
    try:
        yield
    finally:
        _state.ids_only, _state.padded_width = before


def _install() -> bool:
    """Wrap transformers' two functions once; False where this transformers has neither."""
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    found = False
    for name, make in (("find_packed_sequence_indices", _packed_check), ("_ignore_causal_mask_sdpa", _sdpa_skip)):
        original = getattr(masking_utils, name, None)
        if original is None:
            continue
        found = True
        if not getattr(original, "_plait_answered_on_host", False):
            wrapper = make(original)
            wrapper._plait_answered_on_host = True
            wrapper.__wrapped__, wrapper.__doc__, wrapper.__name__ = original, original.__doc__, original.__name__
            setattr(masking_utils, name, wrapper)
    return found


def _packed_check(original):
    def find_packed_sequence_indices(position_ids, *args, **kwargs):
        if getattr(_state, "ids_only", False):
            return None  # positions the model made itself: arange per row, one sequence each
        return original(position_ids, *args, **kwargs)

    return find_packed_sequence_indices


def _sdpa_skip(original):
    def _ignore_causal_mask_sdpa(padding_mask, q_length, kv_length, q_offset=0, kv_offset=0, *args, **kwargs):
        width = getattr(_state, "padded_width", None)
        if width is not None and padding_mask is not None and padding_mask.dim() == 2 \
                and padding_mask.shape[-1] == width == kv_length == q_length \
                and isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0:
            return False  # a masked position in the mask over the whole query: the mask stays
        return original(padding_mask, q_length, kv_length, q_offset, kv_offset, *args, **kwargs)

    return _ignore_causal_mask_sdpa

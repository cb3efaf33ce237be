"""A forward of token ids alone, told to transformers without a host sync.

With no ``attention_mask`` and no cache, transformers' mask code (5.17 to
5.25: ``masking_utils._preprocess_mask_arguments``) checks the position ids
for packed rows: ``find_packed_sequence_indices`` tests
``(packed_sequence_mask[:, -1] == 0).all()`` in a Python ``if``, which on a
GPU makes the host wait for everything queued before it (about a millisecond
per forward on an H100, twice a DPO step: policy and reference). When the
caller passed no ``position_ids``, the model made them itself,
``arange(seq)`` for every row, and the answer is known before asking: no
packed rows (``None``), the very value the check returns for such positions.

:func:`ids_only` marks a forward whose inputs are ``input_ids`` and nothing
else (no positions, no mask, no images, no cache), and while it runs
transformers' ``find_packed_sequence_indices`` answers ``None`` without
reading the device. A forward with ``position_ids`` (packed batches; the
windowed models whose masks transformers builds from them,
:func:`plait.data.packing.masks_from_positions`) is asked as before. The
wrapper is installed once, reads a thread-local flag, and leaves any other
caller of the function, in any thread, to the original.
"""

from __future__ import annotations

import contextlib
import threading

_state = threading.local()


def takes_ids_only(inputs: dict) -> bool:
    """Whether a forward's keyword arguments are the token ids alone (other
    keys set to ``None`` do not count)."""
    return inputs.get("input_ids") is not None and all(
        value is None for key, value in inputs.items() if key != "input_ids")


@contextlib.contextmanager
def ids_only(active: bool = True):
    """Inside: transformers' packed-row check answers ``None`` on this thread
    (see the module docstring); ``active=False`` changes nothing."""
    if not active or not _install():
        yield
        return
    before = getattr(_state, "active", False)
    _state.active = True
    try:
        yield
    finally:
        _state.active = before


def _install() -> bool:
    """Wrap ``transformers.masking_utils.find_packed_sequence_indices`` once;
    False where this transformers has no such function."""
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        return False
    if getattr(original, "_plait_ids_only", False):
        return True

    def find_packed_sequence_indices(position_ids, *args, **kwargs):
        if getattr(_state, "active", False):
            return None  # positions the model made itself: arange per row, one sequence each
        return original(position_ids, *args, **kwargs)

    find_packed_sequence_indices._plait_ids_only = True
    find_packed_sequence_indices.__wrapped__ = original
    find_packed_sequence_indices.__doc__ = original.__doc__
    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    return True

"""Python's cyclic garbage collector, paused while a batch is tokenized.

Tokenizing a batch of conversations makes tens of thousands of small
containers (message dicts, span tuples, the rows' id and label lists) that
live until the batch is done. Each makes the collector's young generations
fill up again, so a 1000-row batch set off ~180 young and ~15 middle
collections, each walking the batch's survivors so far: measured with
``gc.callbacks`` on the 2-core CPU, ~0.03 CPU s of a ~0.6 CPU s 2000-row pass
of the chat_template hook (an earlier version froze the older objects, which
only kept the rare full collections away).

None of it finds anything: the batch's objects form no reference cycles
(``gc.collect()`` after a batch run with the collector off finds 0
unreachable objects; a test keeps it so), so reference counting frees all of
them. The collector is therefore off inside the block and back on after it;
were a template to make cycles, they would wait for the next full collection.

Its counts would still say that a whole batch of objects was made, so the
first allocation after the block set off a young collection walking the
batch's output lists (every id of every row; ~5 ms a 1000-row batch), though
they are data headed for Arrow. So the block ends by moving what survived it
to the oldest generation (``gc.freeze`` then ``gc.unfreeze``: two list merges,
counts reset), unless someone else froze objects, whose freeze it would undo.
Nothing is done when the collector is already off.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def collector_paused():
    """Within the block, no automatic collection runs."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if not gc.get_freeze_count():
            # the batch's survivors (its output lists) straight to the oldest generation, uncounted
            gc.freeze()
            gc.unfreeze()
        gc.enable()

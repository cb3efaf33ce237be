"""Python's cyclic garbage collector, kept to the objects a batch makes.

Tokenizing a batch of conversations makes tens of thousands of small
containers (message dicts, span tuples, the rows' lists), enough to set off an
automatic full collection every few thousand rows. A full collection walks
every object of the process -- the imported libraries, the dataset -- and
measured on the 2-core CPU one took ~0.17 s, as long as a third of a
2000-row pass of the chat_template hook.

So while a batch is tokenized, the objects alive before it are in the
collector's permanent generation (``gc.freeze``) and collections only walk
what the batch made; afterwards they go back (``gc.unfreeze``). Nothing is
done when something else already froze objects (plait's training loop does)
or the collector is off: the unfreeze would undo theirs.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def collections_of_new_objects_only():
    """Within the block, automatic collections leave older objects alone."""
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()

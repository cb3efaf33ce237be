"""Python's cyclic garbage collector, kept from pausing training steps.

By the first step a run holds hundreds of thousands of long-lived Python
objects: torch, transformers and Triton modules, the model's modules and
parameters, the tokenizer, the datasets. An automatic full collection walks
every one of them; measured on the device, one such collection made one step
of a 1B LoRA run about twice as long as its neighbours (0.25 s -> 0.5 s), at a
random step of each run. Objects made per step are few and short-lived.

So the objects alive before the loop go to the collector's permanent
generation (``gc.freeze``): collections during the loop only look at what the
loop itself made. Frozen objects that become garbage are kept until the loop
ends (``gc.unfreeze``), which for objects alive through setup is the run.
"""

from __future__ import annotations

import gc


def freeze_setup_objects() -> None:
    """Collect once, then leave every object alive now out of later collections."""
    gc.collect()
    gc.freeze()


def unfreeze_setup_objects() -> None:
    """Return the frozen objects to the collector (at the end of the loop)."""
    gc.unfreeze()

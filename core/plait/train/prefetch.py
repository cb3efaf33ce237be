"""Collate the next optimizer step's micro-batches while the current one runs.

Building a step's tensors (reading rows, padding or packing them) is CPU work
of a few milliseconds. Done between steps it leaves the accelerator idle every
step; done on a worker thread during the current step's backward pass, when
the main thread is only waiting on the device, it costs nothing. Collation
stays in Python and reads the datasets only, so one worker thread is safe and
keeps the order.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class StepPrefetcher:
    """``get(epoch, windows, index)`` returns window ``index`` collated and starts on ``index + 1``.

    Only the next window of the same epoch is prepared ahead: the next epoch's
    plan is not known until the epoch starts.
    """

    def __init__(self, collate_window: Callable[[list], list]):
        self._collate_window = collate_window
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plait-collate")
        self._ahead: tuple[tuple[int, int], Future] | None = None

    def get(self, epoch: int, windows: list, index: int) -> list:
        batches = None
        if self._ahead is not None:
            key, future = self._ahead
            self._ahead = None
            if key == (epoch, index):
                batches = future.result()  # a data error raised in the worker surfaces here
            else:
                future.cancel()
        if batches is None:
            batches = self._collate_window(windows[index])
        if index + 1 < len(windows):
            self._ahead = ((epoch, index + 1), self._pool.submit(self._collate_window, windows[index + 1]))
        return batches

    def close(self) -> None:
        self._ahead = None
        self._pool.shutdown(wait=True, cancel_futures=True)

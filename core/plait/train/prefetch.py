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
    """``start(epoch, windows, index)`` begins collating window ``index`` on a
    worker thread; ``get(epoch, windows, index)`` returns it, collated here if
    it was not started (the first step, a resumed one).

    The loop starts the next window as the current step's last backward pass
    begins, not at the step's start: the forward keeps the host busy launching
    kernels, and a worker holding the interpreter lock there would slow it.
    Only windows of the current epoch are started ahead: the next epoch's plan
    is not known until it begins.
    """

    def __init__(self, collate_window: Callable[[list], list]):
        self._collate_window = collate_window
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plait-collate")
        self._ahead: tuple[tuple[int, int], Future] | None = None

    def start(self, epoch: int, windows: list, index: int) -> None:
        if index < len(windows):
            self._discard()
            self._ahead = ((epoch, index), self._pool.submit(self._collate_window, windows[index]))

    def get(self, epoch: int, windows: list, index: int) -> list:
        if self._ahead is not None and self._ahead[0] == (epoch, index):
            future = self._ahead[1]
            self._ahead = None
            return future.result()  # a data error raised in the worker surfaces here
        self._discard()
        return self._collate_window(windows[index])

    def _discard(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None

    def close(self) -> None:
        self._discard()
        self._pool.shutdown(wait=True, cancel_futures=True)

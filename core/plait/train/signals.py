"""Save a checkpoint and stop when the scheduler asks (SIGTERM, SIGUSR1).

A cluster scheduler preempting a job sends SIGTERM (SLURM can send SIGUSR1
ahead of time with ``--signal``), then SIGKILL a while later. While the loop
runs, the signals named by ``save_on_signals`` only set a flag; the loop looks
at it at the next step boundary (every rank agrees through the step's
all-reduce), writes ``checkpoint-<step>`` and raises :class:`TrainingStopped`,
so the rerun with ``auto_resume_from_checkpoints: true`` continues from there.
"""

from __future__ import annotations

import signal
import threading

from plait.config.schema import ACCEPTED_SIGNALS as ACCEPTED  # the ones schedulers send to ask a job to stop
from plait.errors import PlaitError


class TrainingStopped(PlaitError):
    """The run stopped on a signal after saving a checkpoint; the exit status
    is the shell's for that signal (143 for SIGTERM)."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.exit_code = 128 + int(getattr(signal, signal_name))


class StopOnSignals:
    """Once installed, the named signals set :attr:`received` instead of ending
    the process; :meth:`restore` puts the previous handlers back. Only the main
    thread can install handlers: elsewhere (a notebook's worker thread) nothing changes."""

    def __init__(self, names):
        self.names = [name for name in names if hasattr(signal, name)]
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for name in self.names:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

"""Show Plait's and its plugins' log lines on stderr.

Plugins log with ``logging.getLogger(__name__)`` (``plait_kernels.patch``,
``plait.peft``, ...). Python shows nothing below WARNING without a handler,
so a plugin's "using the saved adapter's settings" or "chose this kernel"
line would vanish. The CLI installs one handler on the root logger that
prints INFO and above from loggers whose top-level name starts with
``plait``, and WARNING and above from everything else (as Python would
anyway). Other ranks than 0 of a distributed run print warnings only, so
lines are not repeated once per process.
"""

from __future__ import annotations

import logging
import os
import sys


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, so output
    redirected later (tests, the in-process CLI runner) still receives it."""

    def __init__(self):
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def is_plait_logger(name: str) -> bool:
    return name.split(".", 1)[0].startswith("plait")


def show_plait_logs() -> None:
    """Install the handler once per process (calling it again does nothing)."""
    root = logging.getLogger()
    if any(isinstance(h, CurrentStderrHandler) for h in root.handlers):
        return
    main_rank = os.environ.get("RANK", "0") == "0"
    plait_level = logging.INFO if main_rank else logging.WARNING
    handler = CurrentStderrHandler()
    handler.addFilter(lambda record: record.levelno >= (plait_level if is_plait_logger(record.name)
                                                        else logging.WARNING))
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        # loggers left at NOTSET take the root's level: let INFO reach the filter above
        root.setLevel(logging.INFO)

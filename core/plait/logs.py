"""Show Plait's and its plugins' log lines on stderr.

Plugins log with ``logging.getLogger(__name__)`` (``plait_kernels.patch``,
``plait.peft``, ...). Python shows nothing below WARNING without a handler,
so a plugin's "using the saved adapter's settings" or "chose this kernel"
line would vanish. The CLI installs one handler on the root logger that
prints INFO and above from loggers whose top-level name starts with
``plait``, and WARNING and above from everything else (as Python would
anyway). Other ranks than 0 of a distributed run print warnings only, so
lines are not repeated once per process.

Quiet by default: without ``--verbose`` the CLI hides other libraries'
warnings (Python ``warnings`` and transformers' logger), transformers' and
huggingface_hub's progress bars ("Loading weights", "Writing model shards")
and ``datasets``' progress bars other than the one for tokenizing, so a run
shows one bar per stage. ``--verbose`` shows all of them.
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


_verbose = False


def verbose() -> bool:
    """Whether ``--verbose`` was given (library bars and warnings shown)."""
    return _verbose


def set_verbose(on: bool) -> None:
    """Show or hide other libraries' warnings; called once by the CLI.

    Hiding them needs no import of torch or transformers: Python's warning
    filters are process-wide and ``TRANSFORMERS_VERBOSITY`` is read when
    transformers is first imported (a value the user exported wins).
    """
    import warnings

    global _verbose
    _verbose = on
    # warnings that pass the filters go through the handler below, one line each
    warnings.showwarning = _warning_to_log
    if on:
        warnings.simplefilter("default")  # deprecations included, each once per place
        for name in QUIET_LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        return
    warnings.filterwarnings("ignore")
    # inserted in front, so Plait's and its plugins' own warnings still show
    warnings.filterwarnings("default", module=r"plait")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in QUIET_LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


#: library loggers whose warnings bypass the handler below (torch's logging gives the
#: ``torch`` logger a handler of its own) or come before it exists, and that speak at
#: every start: torchao's enum registrations warn through torch's pytree logger, and
#: torchao reports the optional native libraries it could not load. A level set on
#: these child loggers now holds after torch's logging sets up its parent's.
QUIET_LIBRARY_LOGGERS = ("torch.utils._pytree", "torchao")


def show_library_bars(on: bool) -> None:
    """Show or hide transformers' and huggingface_hub's own tqdm bars (per-file
    "Loading weights" and "Writing model shards", downloads); called by the CLI
    once its arguments are parsed, so ``plait --help`` imports neither library.

    ``datasets``' bars have a switch of their own (:mod:`plait.data.prepare`
    decides those). transformers copies the hub's setting when it is first
    imported, so a transformers imported already (by a plugin, or an earlier
    in-process run) is switched as well. An ``HF_HUB_DISABLE_PROGRESS_BARS``
    the user exported has priority: the hub keeps to it, and so does this.
    """
    import warnings

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    with warnings.catch_warnings():  # the hub warns when the user's variable overrules the call
        warnings.simplefilter("ignore")
        (enable_progress_bars if on else disable_progress_bars)()
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        hidden = are_progress_bars_disabled()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (hf_logging.disable_progress_bar if hidden else hf_logging.enable_progress_bar)()


def _warning_to_log(message, category, filename, lineno, file=None, line=None) -> None:
    logging.getLogger(WARNINGS_LOGGER).warning("%s: %s", category.__name__, message)


#: the logger Python warnings are sent to; the warning filters already chose them
WARNINGS_LOGGER = "warning"


def show_plait_logs() -> None:
    """Install the handler once per process (calling it again does nothing)."""
    root = logging.getLogger()
    if any(isinstance(h, CurrentStderrHandler) for h in root.handlers):
        return
    main_rank = os.environ.get("RANK", "0") == "0"
    plait_level = logging.INFO if main_rank else logging.WARNING

    def shown(record: logging.LogRecord) -> bool:
        if is_plait_logger(record.name) or record.name == WARNINGS_LOGGER:
            return record.levelno >= plait_level
        # other libraries: warnings with --verbose, errors only without
        return record.levelno >= (logging.WARNING if _verbose else logging.ERROR)

    handler = CurrentStderrHandler()
    handler.addFilter(shown)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        # loggers left at NOTSET take the root's level: let INFO reach the filter above
        root.setLevel(logging.INFO)

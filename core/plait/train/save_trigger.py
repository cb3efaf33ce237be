"""Axolotl's ``dynamic_checkpoint``: a checkpoint on request, the run going on.

Every ``check_interval`` steps the main rank looks for the trigger file in
``output_dir`` (``.axolotl_save_checkpoint``, Axolotl's name, unless
``trigger_file_path`` names another) and deletes it when it is there; every
rank then saves a checkpoint after that step. The ranks agree through the
step's one all-reduce (:func:`plait.train.loop.reduce_and_check`), so no
extra collective runs.
"""

from __future__ import annotations

from pathlib import Path

#: Axolotl's file name, so a user's ``touch`` carries over
DEFAULT_TRIGGER_FILE = ".axolotl_save_checkpoint"


def trigger_path(cfg, output_dir) -> Path | None:
    """The file that asks for a checkpoint; None when the feature is off."""
    settings = cfg.dynamic_checkpoint
    if settings is None or not settings.enabled:
        return None
    return Path(output_dir) / (settings.trigger_file_path or DEFAULT_TRIGGER_FILE)


def looks_at(cfg, step: int) -> bool:
    """Whether the trigger file is looked for after ``step``."""
    settings = cfg.dynamic_checkpoint
    return bool(settings is not None and settings.enabled and step % settings.check_interval == 0)


def take_request(run, step: int) -> bool:
    """On the main rank after a step it looks at: whether the file is there (it is deleted)."""
    if not (run.is_main and looks_at(run.cfg, step)):
        return False
    path = trigger_path(run.cfg, run.output_dir)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True

"""The loss plot is optional: matplotlib comes with ``plait[plot]``."""

from __future__ import annotations

import logging
import sys

from plait.output import plot_loss

RECORDS = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}]


def test_the_plot_is_drawn_when_matplotlib_is_installed(tmp_path):
    path = plot_loss(RECORDS, tmp_path / "loss.png")
    assert path == tmp_path / "loss.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_plot_is_skipped_with_a_note(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is absent
    with caplog.at_level(logging.INFO, logger="plait.output"):
        assert plot_loss(RECORDS, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()
    assert "loss.png skipped: matplotlib is not installed (pip install 'plait[plot]')" in caplog.text

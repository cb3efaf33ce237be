"""The documentation site: every config key is described, every error class
has its troubleshooting section, and the site builds with warnings as errors
(`make docs` does the same)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "gen"))


def test_every_declared_config_key_has_a_description():
    from config_reference import rows

    from plait.plugins import build_plugin_manager

    undocumented = [f"{r.owner}: {r.section + '.' if r.section else ''}{r.key}"
                    for r in rows(build_plugin_manager()) if not r.description]
    assert not undocumented, ("config keys without description= (they are the config reference and "
                              f"`plait config schema`): {undocumented}")


def test_every_error_class_has_a_troubleshooting_section():
    from errors_table import error_classes

    page = (DOCS / "troubleshooting.md").read_text()
    missing = [cls.__name__ for cls in error_classes()
               if cls.__name__ != "PlaitError" and not any(line.startswith("## ") and cls.__name__ in line
                                                          for line in page.splitlines())]
    assert not missing, f"error classes without a section in docs/troubleshooting.md: {missing}"


def test_the_config_reference_names_owner_type_default_and_allowed_values():
    from config_reference import rows

    from plait.plugins import build_plugin_manager

    by_key = {(r.section, r.key): r for r in rows(build_plugin_manager())}
    bf16 = by_key[("", "bf16")]
    assert (bf16.owner, bf16.default, bf16.allowed) == ("plait", '"auto"', '"auto", "full"')
    assert by_key[("", "sequence_len")].allowed == ">= 8"
    assert by_key[("", "base_model")].default == "required"
    assert by_key[("datasets[]", "path")].owner == "plait"
    assert by_key[("", "lora_r")].owner == "plait-peft"
    assert by_key[("", "varlen_attention")].axolotl == "Plait only"
    assert by_key[("", "strict")].axolotl.endswith("no effect in Plait")


@pytest.mark.slow
def test_the_site_builds_with_warnings_as_errors(tmp_path):
    pytest.importorskip("mkdocs")
    generate = subprocess.run([sys.executable, str(DOCS / "gen" / "build_pages.py")], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
    assert generate.returncode == 0, generate.stderr[-3000:]
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert build.returncode == 0, build.stderr[-3000:]
    reference = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    assert "learning_rate" in reference and "lora_r" in reference
    inspect_page = (tmp_path / "site" / "datasets" / "index.html").read_text()
    assert "[[" in inspect_page and "t a c" in inspect_page  # the real plait inspect output is on the page

"""Every package builds an sdist and a wheel that ``twine check`` accepts, with
a license and consistent dependency ranges; the core wheel carries the example
configs. Run by ``make dist`` (``-m packaging``; left out of ``make test``, where
the builds' minutes would not buy a different answer from one commit to the next)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.parent for pattern in ("core/pyproject.toml", "plugins/*/pyproject.toml",
                                           "contrib/*/pyproject.toml") for p in ROOT.glob(pattern))
#: one range per shared dependency, the same in every package that declares it
SHARED = ("torch", "transformers", "peft", "datasets")


def _project(package: Path) -> dict:
    return tomllib.loads((package / "pyproject.toml").read_text())["project"]


def _requirements(project: dict) -> list[str]:
    extras = [req for reqs in project.get("optional-dependencies", {}).values() for req in reqs]
    return [*project.get("dependencies", []), *extras]


def test_every_package_declares_a_license_and_the_same_ranges():
    ranges: dict[str, set[str]] = {}
    for package in PACKAGES:
        project = _project(package)
        assert project.get("license") == "Apache-2.0", package
        for requirement in _requirements(project):
            name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
            if name in SHARED:
                ranges.setdefault(name, set()).add(requirement.removeprefix(name))
    assert {name: len(found) for name, found in ranges.items()} == {name: 1 for name in ranges}, ranges


def test_accelerate_is_declared_only_by_plait_bnb():
    # Plait imports it nowhere, but transformers' bitsandbytes loading and TrainingArguments (plait-bnb's
    # optimizers) raise ImportError without accelerate>=1.1.0; users who launch with `accelerate launch`
    # have it already
    declaring = {package.name for package in PACKAGES
                 if any(r.startswith("accelerate") for r in _requirements(_project(package)))}
    assert declaring == {"plait-bnb"}, declaring


@pytest.mark.packaging
@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_package_builds_and_passes_twine_check(package, tmp_path):
    pytest.importorskip("build")
    pytest.importorskip("twine")
    built = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(tmp_path),
                            str(package)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    files = sorted(tmp_path.iterdir(), key=lambda f: f.suffix)  # the sdist (.gz), then the wheel
    assert [f.suffix for f in files] == [".gz", ".whl"], files
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, files)],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    with zipfile.ZipFile(files[1]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    if package.name == "core":
        assert "plait/examples/quickstart.yml" in names and "plait/examples/llama3-lora.yml" in names

"""Make this checkout's packages importable and discoverable on a machine
where they cannot be pip-installed (the GPU device has no network, so no build
backend can be fetched).

    eval "$(python3 bench/device_env.py /tmp/site)"

For every package of the repository (core/, plugins/*, contrib/* with a
pyproject.toml) it writes a minimal ``<name>-<version>.dist-info`` (METADATA
and entry_points.txt) into the given folder, so ``importlib.metadata`` finds
the plugins' ``plait`` entry points as it does for an installed package, and
prints the ``export PYTHONPATH=...`` line that puts the folder and every
package directory on the path. Tests that load plugins by entry point then run
as they do after ``make install``.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def packages() -> list[Path]:
    found = [ROOT / "core"] + sorted((ROOT / "plugins").iterdir()) + sorted((ROOT / "contrib").iterdir())
    return [p for p in found if (p / "pyproject.toml").is_file() and p.name != "plait-plugin-template"]


def write_dist_info(package: Path, site: Path) -> None:
    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project.get("version", "0")
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    groups = dict(project.get("entry-points", {}))
    if project.get("scripts"):
        groups["console_scripts"] = project["scripts"]
    lines = []
    for group, entries in groups.items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    site = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/site")
    site.mkdir(parents=True, exist_ok=True)
    for package in packages():
        write_dist_info(package, site)
    path = [str(site)] + [str(p) for p in packages()]
    print(f"export PYTHONPATH={':'.join(path)}${{PYTHONPATH:+:$PYTHONPATH}}")


if __name__ == "__main__":
    main()

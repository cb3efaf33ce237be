"""`plait examples [NAME]`: list the example configs, or copy one here.

The examples ship inside the ``plait`` package (``plait/examples/*.yml``), so
the command works from a wheel as well as from a clone. Each names a hub
model and dataset; the first comment line says what it is for.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("name", nargs="?", help="the example to copy (without .yml); none: list them")
    parser.add_argument("--dir", default=".", help="where to copy it (default: the current directory)")
    parser.add_argument("--force", action="store_true", help="overwrite a file of the same name")


def examples_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("plait") / "examples"))


def available() -> dict[str, Path]:
    """Example name -> its file, sorted by name."""
    return {path.stem: path for path in sorted(examples_dir().glob("*.yml"))}


def summary(path: Path) -> str:
    """The first comment line of an example: what it is for."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def run(args, pm) -> int:
    from plait.errors import PlaitError, did_you_mean

    found = available()
    if not args.name:
        width = max(map(len, found))
        for name, path in found.items():
            print(f"{name:<{width}}  {summary(path)}")
        print("\ncopy one into this directory: plait examples NAME")
        return 0
    name = args.name.removesuffix(".yml")
    if name not in found:
        raise PlaitError(f"no example named {args.name!r}{did_you_mean(name, found)}\n"
                         f"examples: {', '.join(found)}")
    target = Path(args.dir) / f"{name}.yml"
    if target.exists() and not args.force:
        raise PlaitError(f"{target} exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(found[name], target)
    print(f"wrote {target}: {summary(found[name])}")
    print(f"next: plait config explain {target}   then   plait train {target}")
    return 0

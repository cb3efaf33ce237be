"""Plugins import from core only the published plugin API.

The list of public modules is the "The plugin API" section of CONTRIBUTING.md
(every backticked ``plait...`` name of its bullets); the test reads it from
there, so the documentation and the check cannot drift apart. Every module of
every plugin package under ``plugins/`` and ``contrib/`` (their tests may use
anything) is parsed with :mod:`ast`, and each absolute import of a ``plait``
module must name a public one.
"""

import ast
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def public_modules() -> set[str]:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text.split("## The plugin API", 1)[1].split("\n## ", 1)[0]
    bullets = re.findall(r"^- (.*(?:\n  .*)*)", section, flags=re.MULTILINE)
    names = {name for bullet in bullets for name in re.findall(r"`(plait(?:\.\w+)*)`", bullet)}
    return names


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def core_imports(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` for every absolute import of a ``plait`` module in
    ``source``; ``from plait.x import y`` counts as ``plait.x.y`` when ``y`` is
    a submodule."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names
                      if alias.name == "plait" or alias.name.startswith("plait.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and (node.module == "plait" or node.module.startswith("plait.")):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append((node.lineno, submodule if _is_module(submodule) else node.module))
    return found


def forbidden_imports(source: str, public: set[str]) -> list[str]:
    return [f"line {line}: {module}" for line, module in core_imports(source) if module not in public]


def plugin_package_files() -> list[Path]:
    files = []
    for dist in sorted([*ROOT.glob("plugins/*/pyproject.toml"), *ROOT.glob("contrib/*/pyproject.toml")]):
        for package in sorted(p.parent for p in dist.parent.glob("*/__init__.py") if p.parent.name != "tests"):
            files += sorted(package.rglob("*.py"))
    return files


def test_plugins_import_only_the_published_api():
    public = public_modules()
    assert {"plait", "plait.hookspecs", "plait.errors", "plait.registries", "plait.model.recompute"} <= public
    files = plugin_package_files()
    assert len({f.relative_to(ROOT).parts[1] for f in files}) >= 8  # every plugin and contrib package is seen
    bad = {str(f.relative_to(ROOT)): forbidden_imports(f.read_text(), public) for f in files}
    bad = {path: lines for path, lines in bad.items() if lines}
    assert not bad, ("plugins import core internals (publish a home for them and list it in CONTRIBUTING's "
                     f"'The plugin API'): {bad}")


def test_every_published_module_exists():
    missing = [name for name in public_modules() if not _is_module(name)]
    assert not missing, f"CONTRIBUTING's plugin API lists modules that do not exist: {missing}"


def test_the_check_catches_internal_imports():
    public = public_modules()
    source = ("import plait.train.loop\n"
              "from plait.builtin.model import load_model\n"
              "from plait import hookimpl\n"
              "from plait.config import StrictModel\n"
              "from plait.config.schema import CoreConfig\n"
              "from plait import data\n"
              "from plait.model.recompute import is_recomputing\n"
              "from .local import thing\n")
    assert forbidden_imports(source, public) == [
        "line 1: plait.train.loop", "line 2: plait.builtin.model", "line 5: plait.config.schema", "line 6: plait.data"]

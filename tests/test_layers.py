"""Core's layers point one way.

Every import in ``core/plait`` (module level or inside a function: a deferred
import is still a dependency) is read with :mod:`ast`. The checks:

- ``plait.train`` and ``plait.builtin`` do not import each other (the loop
  drives hooks; core's default hookimpls do not know the loop);
- the modules of ``plait.data`` have no import cycle;
- the subpackages of core have no import cycle between them;
- core imports no plugin package.
"""

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "core"
PACKAGES = ("builtin", "commands", "config", "data", "model", "train")


def module_name(path: Path) -> str:
    parts = path.relative_to(CORE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute module names ``path`` imports (``from a import b`` counts as
    ``a.b`` when that is a module of core, else ``a``)."""
    names = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                names.add(candidate if _core_module(candidate) else base)
    return names


def _core_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (CORE / rel).with_suffix(".py").is_file() or (CORE / rel / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in (CORE / "plait").rglob("*.py")}
    return {name: {i for i in imports_of(path) if i in modules} for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``edges`` as a path ``[a, b, ..., a]``, or ``None``."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in PACKAGES else module


def test_train_and_builtin_do_not_import_each_other():
    edges = graph()
    crossing = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                      if {package_of(a), package_of(b)} == {"train", "builtin"})
    assert not crossing, f"train and builtin import each other: {crossing}"


def test_data_modules_have_no_cycle():
    edges = graph()
    data = {a: {b for b in targets if b.startswith("plait.data.")} for a, targets in edges.items()
            if a.startswith("plait.data.")}
    assert len(data) >= 8
    assert find_cycle(data) is None, f"import cycle in plait.data: {' -> '.join(find_cycle(data))}"


def test_core_packages_have_no_cycle():
    edges = graph()
    packages: dict[str, set[str]] = {}
    for a, targets in edges.items():
        if package_of(a) in PACKAGES:
            packages.setdefault(package_of(a), set()).update(
                package_of(b) for b in targets if package_of(b) in PACKAGES and package_of(b) != package_of(a))
    cycle = find_cycle(packages)
    assert cycle is None, f"import cycle between core packages: {' -> '.join(cycle)}"


def test_core_imports_no_plugin():
    plugins = [p.name for p in (CORE.parent / "plugins").glob("*/plait_*")] + \
              [p.name for p in (CORE.parent / "contrib").glob("*/plait_*")]
    assert "plait_formats" in plugins
    found = sorted(f"{module_name(p)} imports {name}" for p in (CORE / "plait").rglob("*.py")
                   for name in imports_of(p) if name.split(".")[0] in plugins)
    assert not found, f"core imports plugins: {found}"


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None

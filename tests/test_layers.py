"""The package's layering: what is installed under which name, and who may import or touch what.

The rules (README "Layout"): `streamem` never imports the connectors or Kafka; no two modules
import each other, directly or around a circle; no module imports another's private names; and
the connectors use the estimators only through their public interface (no `model._engine`).
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"streamem": ROOT / "streamem", "streamem_connectors": ROOT / "connectors"}


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the project, by its installed dotted name."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) of every import in a module, lazy ones included."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [alias.name for alias in node.names]
            # `from package import module` imports the module
            modules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            found.extend((m, [], node.lineno) for m in modules)
            others = [n for n in names if f"{base}.{n}" not in MODULES]
            if others:
                found.append((base, others, node.lineno))
    return found


def _project_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {target for target, _, _ in _imports(name, path) if target in MODULES and target != name}
    return graph


def test_connectors_install_under_the_project_namespace():
    """Outside the repository, the connectors import as `streamem_connectors`, and no bare `connectors` exists."""
    code = (
        "import importlib.util, streamem_connectors.kafka.cli as c; "
        "print(importlib.util.find_spec('connectors') is None, c.register_run.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "streamem_connectors.kafka.cli"]


def test_every_package_folder_is_in_the_wheel():
    """pyproject.toml lists packages by hand (connectors/ installs under another name): every folder with an
    __init__.py is listed, so a new subpackage cannot silently miss the wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join([package, *init.parent.relative_to(folder).parts])
        for package, folder in PACKAGES.items()
        for init in folder.rglob("__init__.py")
    }
    assert found == listed


def test_the_library_never_imports_the_connectors_or_kafka():
    """`streamem` stands alone: no import of the connectors or a Kafka client from any of its modules."""
    offenders = [
        f"{name}:{line} imports {target}"
        for name, path in MODULES.items()
        if name.startswith("streamem.") or name == "streamem"
        for target, _, line in _imports(name, path)
        if target.split(".")[0] in {"streamem_connectors", "connectors", "kafka", "confluent_kafka"}
    ]
    assert offenders == []


def test_no_import_circles():
    """No module depends on itself through its imports (lazy imports inside functions count too)."""
    graph = _project_graph()
    circles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(" -> ".join([*trail, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
    assert circles == []


def test_no_module_imports_another_modules_private_names():
    """`from x import _name` across modules would tie them to each other's insides."""
    offenders = [
        f"{name}:{line} imports {n} from {target}"
        for name, path in MODULES.items()
        for target, names, line in _imports(name, path)
        if target in MODULES or target.split(".")[0] in PACKAGES
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert offenders == []


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("streamem_connectors")))
def test_connectors_touch_no_private_attributes(name):
    """The connectors reach models only through public methods: no `other._attribute` outside `self`/`cls`."""
    tree = ast.parse(MODULES[name].read_text())
    offenders = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls", "os", "sys"})
    ]
    assert offenders == []

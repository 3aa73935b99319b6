"""The layers, checked on the source: the library, the services and the application stay apart.

- the library (`shared/` = `cadence.*` outside `cadence.app`) imports neither the application nor a service;
- a service (`services/<name>/` = `cadence.<name>`) imports the library and the stubs only;
- only the application (`shared/app/` = `cadence.app`) wires service cores together.

Every import counts, also those inside functions or under `TYPE_CHECKING`; imports among `cadence`
modules (deferred ones too, type-checking ones not) must not form a circle. The package → folder mapping
comes from pyproject.toml.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
APP = "cadence.app"


def package_dirs(root: Path) -> dict[str, Path]:
    """`package-dir` of pyproject.toml: top package name → its folder."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    return {name: root / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def modules(dirs: dict[str, Path]) -> dict[str, Path]:
    """Every module's dotted name → its file (a folder mapped on its own is left to its own package)."""
    mapped = set(dirs.values())
    found: dict[str, Path] = {}
    for package, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            if any(parent in mapped and parent != folder for parent in path.parents):
                continue
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def services(dirs: dict[str, Path], root: Path) -> set[str]:
    """The packages whose folder lies under services/."""
    return {name for name, folder in dirs.items() if folder.is_relative_to(root / "services")}


def layer(module: str, service_packages: set[str]) -> str:
    """`app`, `library`, or the service package the module belongs to."""
    if module == APP or module.startswith(APP + "."):
        return "app"
    for package in service_packages:
        if module == package or module.startswith(package + "."):
            return package
    return "library"


def imports(path: Path, module: str, known: set[str], typing: bool = True) -> list[tuple[str, int]]:
    """The `cadence` modules a file imports, with line numbers; `typing=False` skips `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree) if typing else _runtime(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((target if target in known else base, node.lineno))
    return [(name, line) for name, line in found if name == "cadence" or name.startswith("cadence.")]


def _runtime(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under `if TYPE_CHECKING:` (imports only type checkers run)."""
    pending, found = [tree], []
    while pending:
        node = pending.pop()
        found.append(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            pending += node.orelse
        else:
            pending += ast.iter_child_nodes(node)
    return found


def rule_broken(importer: str, imported: str) -> str | None:
    """Which layer rule an import from layer `importer` of layer `imported` breaks, if any."""
    if importer == "library" and imported != "library":
        return "the library imports " + ("the application" if imported == "app" else "a service")
    if importer not in ("library", "app") and imported == "app":
        return "a service imports the application"
    if importer not in ("library", "app") and imported not in ("library", importer):
        return "a service imports another service"
    return None


def layer_violations(root: Path) -> list[str]:
    """One line per import that breaks a layer rule: the module, the import and the rule."""
    dirs = package_dirs(root)
    found, service_packages = modules(dirs), services(dirs, root)
    broken = []
    for module, path in found.items():
        for target, line in imports(path, module, set(found)):
            rule = rule_broken(layer(module, service_packages), layer(target, service_packages))
            if rule:
                broken.append(f"{module} ({path.relative_to(root)}:{line}) imports {target}: {rule}")
    return broken


def import_circles(root: Path) -> list[list[str]]:
    """Groups of modules whose imports reach each other (Tarjan's strongly connected components).

    Imports deferred into a function count: they hide a circle from the interpreter, not from the reader.
    """
    found = modules(package_dirs(root))
    graph = {m: {t for t, _ in imports(p, m, set(found), typing=False) if t in found} for m, p in found.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1 or node in graph[node]:
                circles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_library_services_and_application_stay_apart() -> None:
    broken = layer_violations(REPO)
    assert not broken, "imports that break the layers (move the code or invert the dependency):\n" + "\n".join(broken)


def test_no_import_circles() -> None:
    circles = import_circles(REPO)
    assert not circles, "modules that import each other (move the shared part down a layer):\n" + "\n".join(
        " <-> ".join(group) for group in circles
    )


def _tree(root: Path, files: dict[str, str]) -> Path:
    (root / "pyproject.toml").write_text(
        '[tool.setuptools]\npackage-dir = { "cadence" = "shared", "cadence.reward" = "services/reward",'
        ' "cadence.trainer" = "services/trainer" }\n'
    )
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_check_names_the_module_the_import_and_the_rule(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "shared/__init__.py": "",
            "shared/streams.py": "def f():\n    from cadence.app import cli\n",
            "shared/app/__init__.py": "",
            "shared/app/cli.py": "import cadence.trainer.loop\nimport cadence.reward\n",
            "services/reward/__init__.py": "",
            "services/trainer/__init__.py": "",
            "services/trainer/loop.py": "from cadence import streams\nfrom ..reward import x\nfrom . import feeder\n",
            "services/trainer/feeder.py": "from cadence.app.cli import main\n",
        },
    )
    assert layer_violations(root) == [
        "cadence.streams (shared/streams.py:2) imports cadence.app.cli: the library imports the application",
        "cadence.trainer.feeder (services/trainer/feeder.py:1) imports cadence.app.cli: "
        "a service imports the application",
        "cadence.trainer.loop (services/trainer/loop.py:2) imports cadence.reward: a service imports another service",
    ]


def test_the_check_finds_circles_deferred_or_not_but_not_through_type_checking(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "shared/__init__.py": "",
            "shared/a.py": "from cadence import b\n",
            "shared/b.py": "import cadence.c\n",
            "shared/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cadence import a\n",
            "shared/d.py": "from cadence.e import x\n",
            "shared/e.py": "def f():\n    from cadence import d\n",
            "services/trainer/__init__.py": "",
            "services/trainer/p.py": "try:\n    from .q import y\nexcept ImportError:\n    pass\n",
            "services/trainer/q.py": "from cadence.trainer import p\n",
        },
    )
    assert import_circles(root) == [["cadence.d", "cadence.e"], ["cadence.trainer.p", "cadence.trainer.q"]]

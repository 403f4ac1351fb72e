"""The shape of kissray/media (STYLE.md): its modules import one another without a circle, and
nothing in it imports the layers above (batch, serve, commands, scoring, outputs)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import kissray

PACKAGE = Path(kissray.__file__).parent
ABOVE_MEDIA = ("kissray.batch", "kissray.serve", "kissray.commands", "kissray.cli", "kissray.pipeline",
               "kissray.score", "kissray.model", "kissray.train", "kissray.evaluate", "kissray.excerpts",
               "kissray.export", "kissray.report", "kissray.outputs", "kissray.training", "kissray.scoring")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The kissray modules ``path`` imports, anywhere in it (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    """One import circle among ``nodes``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node] & nodes):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(nodes):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_media_package_has_no_import_circle():
    graph = _graph()
    media = {name for name in graph if name == "kissray.media" or name.startswith("kissray.media.")}
    assert len(media) >= 10
    assert _cycle(graph, media) is None
    # a room importing the package's public face would import every room (a circle at run time)
    assert not [name for name in media - {"kissray.media"} if "kissray.media" in graph[name]]


def test_media_imports_nothing_above_it():
    graph = _graph()
    upward = {name: sorted(dep for dep in deps if dep.startswith(ABOVE_MEDIA))
              for name, deps in graph.items() if name.startswith("kissray.media")}
    assert {name: deps for name, deps in upward.items() if deps} == {}


def test_every_media_module_imports_first():
    """Each room imported first (no kissray module loaded before it): no import order is needed to
    get round a circle. One new interpreter; kissray's modules are dropped before each import."""
    names = sorted(name for name in _graph() if name.startswith("kissray.media."))
    script = ("import importlib, sys\n"
              "for name in sys.argv[1:]:\n"
              "    for loaded in [m for m in sys.modules if m == 'kissray' or m.startswith('kissray.')]:\n"
              "        del sys.modules[loaded]\n"
              "    importlib.import_module(name)\n")
    subprocess.run([sys.executable, "-c", script, *names], check=True, capture_output=True, timeout=300)

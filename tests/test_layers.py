"""The import graph of fastws/ keeps to the layers of docs/architecture.md.

Every ``import``/``from … import`` of a fastws module counts, at module level or
lazily inside a function; only imports under ``if TYPE_CHECKING:`` are exempt.
A lower layer never imports a higher one, no module imports itself through others
(no cycle), no module of fastws/ is over 800 lines, and the sans-I/O session
imports nothing that does I/O.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "fastws"
MAX_LINES = 800

#: layer of each module (a package's modules share its layer unless named); a module
#: may import modules of its own layer or below, never above.  docs/architecture.md
#: draws the same table.
LAYERS: dict[str, int] = {
    # 0 — names, codes and wire formats: no fastws import above them
    "fastws._version": 0, "fastws.codes": 0, "fastws.errors": 0, "fastws.channels": 0,
    "fastws._match": 0, "fastws._glob_ref": 0, "fastws.limits": 0, "fastws.protocol": 0,
    "fastws._frames": 0, "fastws.frames": 0, "fastws.extras": 0, "fastws.usage": 0,
    "fastws.cursor": 0,
    # 1 — rules: configuration, tokens, permissions
    "fastws.config_kinds": 1, "fastws.config": 1, "fastws.config_docs": 1, "fastws.auth": 1,
    "fastws.permissions": 1,
    # 2 — the sans-I/O session
    "fastws.session": 2,
    # 3 — moving publications: brokers, the hub (registrations and fan-out)
    "fastws.broker": 3, "fastws._fanout": 3,
    # 4 — orchestration of one process
    "fastws.recovery": 4, "fastws.presence": 4, "fastws.revocations": 4, "fastws.node": 4,
    "fastws.proxy": 4,
    # 5 — the edge: HTTP/1.1, the server API, metrics, workers, logs, echo mode
    "fastws.metrics": 5, "fastws.workers": 5, "fastws.http": 5, "fastws.api": 5,
    "fastws.logs": 5, "fastws.echo": 5,
    # 6 — the process: lifecycle (startup, drain, shutdown) and what runs beside it
    "fastws.lifecycle": 6, "fastws.demo": 6, "fastws.indexer": 6,
    # 7 — the WebSocket transport and the app that ties one port together
    "fastws.server": 7, "fastws.fallback": 7, "fastws.relay": 7,
    # 8 — entry points
    "fastws.cli": 8, "fastws.__main__": 8, "fastws": 8,
    # the client library shares only layer-0 rules with the server
    "fastws.client": 1,
}

#: what the sans-I/O layers may not import (directly)
IO_MODULES = {"asyncio", "picows", "uvloop", "socket", "redis", "aiohttp", "selectors"}
SANS_IO = ("fastws.session", "fastws.permissions", "fastws.protocol", "fastws.channels",
           "fastws.codes", "fastws.limits", "fastws.cursor")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")) + sorted(PKG.rglob("*.pyx")):
        out[_module_name(path)] = path
    return out


def _layer(name: str) -> int:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in LAYERS:
            return LAYERS[key]
    raise AssertionError(f"{name} has no layer in tests/test_layers.py (and docs/architecture.md)")


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
                (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
                or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules ``name`` imports (fastws ones resolved to known modules, others by
    their top-level name), lazy ones included, TYPE_CHECKING ones not."""
    if path.suffix == ".pyx":
        text = "\n".join(line for line in path.read_text().splitlines()
                         if line.startswith(("import ", "from ")) and " cimport " not in line)
        tree = ast.parse(text)
    else:
        tree = ast.parse(path.read_text())
    skip = _type_checking_blocks(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(mod: str) -> None:
        if mod.startswith("fastws"):
            while mod not in known and "." in mod:
                mod = mod.rpartition(".")[0]
        found.add(mod if mod.startswith("fastws") else mod.split(".")[0])

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("fastws"):
                for alias in node.names:  # `from fastws import auth` imports fastws.auth
                    sub = f"{mod}.{alias.name}"
                    add(sub if sub in known else mod)
            else:
                add(mod)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {name: {m for m in _imports(name, path, known) if m.startswith("fastws")}
            for name, path in sources.items()}


def test_no_module_over_800_lines() -> None:
    long = {name: n for name, path in _sources().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_lower_layers_never_import_higher_ones() -> None:
    bad = []
    for name, deps in _graph().items():
        for dep in deps:
            if dep == "fastws" or name.startswith(dep + ".") or dep.startswith(name + "."):
                continue  # a package and its own modules
            if _layer(dep) > _layer(name):
                bad.append(f"{name} (layer {_layer(name)}) imports {dep} "
                           f"(layer {_layer(dep)})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep == "fastws" or node.startswith(dep + "."):
                continue  # a module importing its own package's __init__
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", SANS_IO)
def test_the_sans_io_layers_import_no_io(name: str) -> None:
    sources = _sources()
    direct = _imports(name, sources[name], set(sources))
    assert not direct & IO_MODULES, f"{name} imports {sorted(direct & IO_MODULES)}"


def test_every_module_has_a_layer() -> None:
    for name in _sources():
        _layer(name)

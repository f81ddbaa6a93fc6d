"""Layers that only point down: the import graph of ``xenpv/``, read statically.

The rules are data (:data:`LAYERS`, :data:`ISOLATED`, :data:`FORBIDDEN`, :data:`SANS_IO`)
and docs/architecture.md shows the same picture.  Every ``import`` counts: module-level,
function-level and type-only ones, because a function-level import is still a dependency,
only a hidden one.  The checker is run on the real tree and, as a test of the test, on small
synthetic packages with a deliberate violation.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The layers, bottom first.  A module may import its own layer and any layer below it;
#: a module belongs to the layer of the longest name listed that is a prefix of its name.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("xenpv", "xenpv._lazy", "xenpv.compiled", "xenpv.errors", "xenpv.loops",
                    "xenpv.peers", "xenpv.pidlock")),
    # rings import only the foundation: the xenstore page is a byte ring too
    ("rings", ("xenpv.rings",)),
    ("xenstore", ("xenpv.xenstore",)),
    ("platform interfaces", ("xenpv.platforms", "xenpv.platforms.base",
                             "xenpv.platforms.dispatch", "xenpv.platforms.fdwait")),
    ("platforms", ("xenpv.platforms.loopback", "xenpv.platforms.xen")),
    ("platform choice", ("xenpv.platforms.choose",)),
    ("protocols", ("xenpv.protocols",)),
    ("xenbus", ("xenpv.xenbus",)),
    ("driver base", ("xenpv.drivers",)),
    ("drivers", ("xenpv.frontends", "xenpv.backends", "xenpv.vchan")),
    ("tools", ("xenpv.bench", "xenpv.fuzz", "xenpv.testing")),
    ("cli", ("xenpv.cli", "xenpv.__main__")),
)

#: Layers whose members must not import each other (no sideways imports): one platform
#: does not use another, a backend does not use its frontend (what both need lives in the
#: driver base or the protocol module).
ISOLATED = frozenset({"platforms", "drivers"})

#: Downward imports that skip what should sit between: drivers get their platform as the
#: interfaces of ``platforms/base.py``, passed in; a program picks one with
#: ``xenpv.platforms.choose.open_platform``.
FORBIDDEN: frozenset[tuple[str, str]] = frozenset({
    ("drivers", "platforms"),
    ("driver base", "platforms"),
})

#: Sans-IO modules: importing them must not load an event loop, not even through a package
#: ``__init__`` or another module they import.
SANS_IO = (
    "xenpv.errors",
    "xenpv.rings",
    "xenpv.protocols",
    "xenpv.xenbus.states",
    "xenpv.xenbus.machine",
    "xenpv.xenbus.keys",
    "xenpv.xenbus.paths",
    "xenpv.xenbus.diagram",
    "xenpv.xenstore.wire",
    "xenpv.xenstore.ops",
    "xenpv.xenstore.paths",
    "xenpv.xenstore.store",
    "xenpv.xenstore.page",
    "xenpv.vchan.ring",
)
EVENT_LOOPS = ("asyncio", "uvloop")

#: Documented exceptions ``(importer, imported): why``; keep this short.
EXCEPTIONS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    """One import statement's target, as seen from the importing module."""

    importer: str
    target: str
    line: int
    runtime: bool  # False under ``if TYPE_CHECKING:``
    top_level: bool  # False inside a function body


def _module_name(package_root: Path, path: Path) -> str:
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, runtime: bool, top: bool) -> Iterator[tuple[ast.AST, bool, bool]]:
    for child in ast.iter_child_nodes(node):
        yield child, runtime, top
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield stmt, False, top
                yield from _walk(stmt, False, top)
            for stmt in child.orelse:
                yield stmt, runtime, top
                yield from _walk(stmt, runtime, top)
            continue
        inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _walk(child, runtime, inner)


def read_graph(package_root: Path) -> tuple[set[str], list[Import]]:
    """Every module under ``package_root`` and every import they make (absolute names)."""
    files = sorted(package_root.rglob("*.py"))
    modules = {_module_name(package_root, f) for f in files}
    imports: list[Import] = []
    for path in files:
        name = _module_name(package_root, path)
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node, runtime, top in _walk(tree, True, True):
            targets: list[tuple[str, int]] = []
            if isinstance(node, ast.Import):
                targets = [(alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    targets.append((sub if sub in modules else module, node.lineno))
            imports += [Import(name, t, line, runtime, top) for t, line in dict.fromkeys(targets)]
    return modules, imports


def _within(module: str, prefix: str) -> bool:
    # the package itself ("xenpv") is listed for its __init__ only, not for what it contains
    return module == prefix or ("." in prefix and module.startswith(prefix + "."))


def layer_of(module: str) -> str | None:
    """The layer of a module of the package (``None``: not placed in :data:`LAYERS`)."""
    best: tuple[int, str] | None = None
    for layer, prefixes in LAYERS:
        for prefix in prefixes:
            if _within(module, prefix) and (
                best is None or len(prefix) > best[0]
            ):
                best = (len(prefix), layer)
    return None if best is None else best[1]


def _unit_of(module: str) -> str:
    """The member of its layer a module belongs to (``xenpv.platforms.xen``, …)."""
    prefixes = [p for _layer, members in LAYERS for p in members if _within(module, p)]
    return max(prefixes, key=len, default=module)


def _parents(module: str) -> Iterable[str]:
    parts = module.split(".")
    return (".".join(parts[:i]) for i in range(1, len(parts)))


def layer_violations(modules: set[str], imports: list[Import]) -> list[str]:
    """Upward, sideways and skipping imports, one line each."""
    rank = {layer: i for i, (layer, _prefixes) in enumerate(LAYERS)}
    out = [f"{m}: not in any layer (add it to LAYERS)" for m in sorted(modules)
           if layer_of(m) is None]
    package = min(modules, key=len)
    for imp in imports:
        if imp.target != package and not imp.target.startswith(package + "."):
            continue  # outside the package
        if (imp.importer, imp.target) in EXCEPTIONS:
            continue
        src, dst = layer_of(imp.importer), layer_of(imp.target)
        if src is None or dst is None:
            continue
        where = f"{imp.importer}:{imp.line} imports {imp.target}"
        if rank[dst] > rank[src]:
            out.append(f"{where}: upward ({src} -> {dst})")
        elif src == dst and src in ISOLATED and _unit_of(imp.importer) != _unit_of(imp.target):
            out.append(f"{where}: sideways within {src}")
        elif (src, dst) in FORBIDDEN:
            out.append(f"{where}: {src} must not use {dst} directly")
    return out


def event_loop_violations(modules: set[str], imports: list[Import]) -> list[str]:
    """Sans-IO modules whose import loads an event loop, with the chain that does it."""
    loaded: dict[str, list[str]] = {}  # module -> what importing it executes
    for imp in imports:
        if imp.runtime and imp.top_level:
            loaded.setdefault(imp.importer, []).append(imp.target)
    out = []
    for module in sorted(m for m in modules if any(
            m == s or m.startswith(s + ".") for s in SANS_IO)):
        own = [i.target for i in imports if i.importer == module and i.runtime]
        start = [*own, *_parents(module)]
        chain: dict[str, str | None] = {}
        todo = []
        for target in start:
            for name in [*_parents(target), target]:
                if name not in chain:
                    chain[name] = module
                    todo.append(name)
        while todo:
            current = todo.pop()
            if current.split(".")[0] in EVENT_LOOPS:
                path = [current]
                step = chain[current]
                while step is not None and step != module:
                    path.append(step)
                    step = chain[step]
                out.append(f"{module} loads {' <- '.join(path)}")
                break
            for target in loaded.get(current, []):
                for name in [*_parents(target), target]:
                    if name not in chain:
                        chain[name] = current
                        todo.append(name)
    return out


def check(package_root: Path) -> list[str]:
    """Every layer rule broken by the package at ``package_root``."""
    modules, imports = read_graph(package_root)
    return layer_violations(modules, imports) + event_loop_violations(modules, imports)


# -- the real tree ------------------------------------------------------------------------------


def test_xenpv_layers_only_point_down() -> None:
    problems = check(ROOT / "xenpv")
    assert not problems, "\n".join(problems)


def test_exceptions_are_still_needed() -> None:
    _modules, imports = read_graph(ROOT / "xenpv")
    seen = {(i.importer, i.target) for i in imports}
    assert not [pair for pair in EXCEPTIONS if pair not in seen]


@pytest.mark.parametrize("module", SANS_IO)
def test_sans_io_module_imports_without_an_event_loop(module: str) -> None:
    """The same rule, checked by importing in a fresh interpreter (third-party code too)."""
    code = (f"import sys, {module}\n"
            f"bad = [m for m in {EVENT_LOOPS!r} if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- the test of the test: a synthetic package ---------------------------------------------------


def _package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "xenpv"
    for rel, text in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for directory in [pkg, *(p for p in pkg.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    return pkg


CLEAN = {
    "errors.py": "class PeerError(Exception):\n    pass\n",
    "cli/loopback.py": "from xenpv.platforms.loopback import env\n",
    "platforms/base.py": "import asyncio\n",
    "platforms/loopback/env.py": "from xenpv.platforms import base\n",
    "platforms/xen/grants.py": "from xenpv.platforms.base import *\n",
    "xenbus/machine.py": "from xenpv.xenbus import states\n",
    "xenbus/states.py": "from xenpv.errors import PeerError\n",
    "xenbus/driver.py": "import asyncio\nfrom . import machine\n",
    "frontends/console.py": "from xenpv.xenbus import driver\n",
    "backends/console.py": "from ..xenbus import driver\n",
}


def test_checker_passes_a_clean_package(tmp_path: Path) -> None:
    assert check(_package(tmp_path, CLEAN)) == []


@pytest.mark.parametrize(
    ("rel", "text", "expect"),
    [
        # a platform reading the CLI for an environment variable, hidden in a function
        ("platforms/xen/__init__.py", "def f():\n    from xenpv.cli.loopback import x\n",
         "xenpv.platforms.xen:2 imports xenpv.cli.loopback: upward (platforms -> cli)"),
        ("frontends/console.py", "import xenpv.cli\n", "upward (drivers -> cli)"),
        ("backends/console.py", "from xenpv.frontends.console import Pump\n",
         "sideways within drivers"),
        ("platforms/xen/events.py", "from ..loopback.env import wait\n",
         "xenpv.platforms.xen.events:1 imports xenpv.platforms.loopback.env: sideways"),
        ("frontends/console.py", "from xenpv.platforms.loopback import env\n",
         "drivers must not use platforms directly"),
        ("newpkg/thing.py", "x = 1\n", "xenpv.newpkg: not in any layer"),
        # a sans-IO module loading asyncio through its package's __init__
        ("xenbus/__init__.py", "from xenpv.xenbus.driver import *\n",
         "xenpv.xenbus.machine loads asyncio <- xenpv.xenbus.driver <- xenpv.xenbus"),
        # … or directly, even inside a function
        ("xenbus/states.py", "def f():\n    import asyncio\n",
         "xenpv.xenbus.states loads asyncio"),
    ],
)
def test_checker_fails_on_a_violation(tmp_path: Path, rel: str, text: str, expect: str) -> None:
    problems = check(_package(tmp_path, {**CLEAN, rel: text}))
    assert any(expect in p for p in problems), problems


def test_type_only_import_still_counts_for_layers(tmp_path: Path) -> None:
    text = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from xenpv.cli import loopback\n")
    problems = check(_package(tmp_path, {**CLEAN, "platforms/base.py": text}))
    assert problems == ["xenpv.platforms.base:3 imports xenpv.cli.loopback: upward "
                        "(platform interfaces -> cli)"]


def test_type_only_import_does_not_load_an_event_loop(tmp_path: Path) -> None:
    text = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from xenpv.xenbus import driver\n")
    assert check(_package(tmp_path, {**CLEAN, "xenbus/states.py": text})) == []

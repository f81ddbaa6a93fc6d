"""The compiled modules: one switch for their pure-Python twins, a matching stub for each."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Names Cython adds to every module or extension type, not part of any API.
CYTHON_INTERNALS = r".*\.(__test__|__reduce_cython__|__setstate_cython__)"


def compiled_modules() -> list[str]:
    """``CYTHON_MODULES`` of setup.py (read, not executed)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and node.target.id == "CYTHON_MODULES" and node.value is not None):
            value = ast.literal_eval(node.value)
            assert isinstance(value, dict)
            return sorted(value)
    raise AssertionError("setup.py has no CYTHON_MODULES")


def test_every_compiled_module_has_a_stub() -> None:
    modules = compiled_modules()
    assert "xenpv.xenstore._xsconn" in modules and "xenpv.vchan._vring" in modules
    missing = [m for m in modules if not (ROOT / (m.replace(".", "/") + ".pyi")).exists()]
    assert not missing


def test_stubs_match_the_built_modules(tmp_path: Path) -> None:
    """mypy's stubtest against the compiled modules (they must be built: setup.py
    build_ext --inplace)."""
    allow = tmp_path / "allowlist"
    allow.write_text(CYTHON_INTERNALS + "\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "--ignore-disjoint-bases",
         "--allowlist", str(allow), *compiled_modules()],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_the_pure_python_switch_is_read_in_one_place() -> None:
    readers = []
    for path in sorted((ROOT / "xenpv").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value == "XENPV_PURE_PYTHON":
                readers.append(str(path.relative_to(ROOT)))
    assert readers == ["xenpv/compiled.py"]


def test_the_switch_turns_every_twin_to_python() -> None:
    code = ("from xenpv import rings\n"
            "from xenpv.vchan import ring\n"
            "from xenpv.xenstore import server\n"
            "print(rings.IMPLEMENTATION, ring.IMPLEMENTATION, server.SERVE_IMPL)")
    for value, want in (("1", "reference reference python"), ("0", "cython cython cython")):
        env = dict(os.environ, PYTHONPATH=str(ROOT), XENPV_PURE_PYTHON=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=60, check=True).stdout
        assert out.split() == want.split()

"""Every script in ``examples/`` runs as a user would run it, exits 0 and says what it did.

Each example runs in a fresh interpreter (``python examples/NAME.py``) with this tree
first on ``PYTHONPATH``; its output must contain the lines listed here, which are the
facts the example demonstrates (data echoed intact, a refusal seen, nothing left held).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

#: example -> lines its output must contain
EXPECTED: dict[str, list[str]] = {
    "vchan_echo.py": [
        "dom2 sent b'hello', dom1 echoed it back",
        "dom2 sent 102400 bytes in 1 KiB pieces, all echoed back intact",
        "vchan echo done: no grant, mapping or port left",
    ],
    "console_pair.py": [
        "backend got from console 0: 'guest: console 0 says hello'",
        "guest read from console 0: b'root\\n'",
        "/local/domain/1/device/console/1 is Connected",
        "backend got from console 1: 'guest: console 1 works too'",
        "console pair done: no grant, mapping or port left",
    ],
    "xenstore_watch.py": [
        "dom0 saw /local/domain/2/data/greeting = hello",
        "dom0 saw /local/domain/2/data/temperature = 21",
        "dom2 may not write dom1's data: EACCES",
        "watch done: events for greeting, temperature, unit, done",
    ],
    "custom_backend.py": [
        "/local/domain/3/device/upper/0 and /local/domain/0/backend/upper/3/0 are Connected",
        "guest sent b'hello', backend answered b'HELLO'",
        "a 60-byte text is refused: EINVAL",
        "device removed after 4 requests",
        "custom backend done: no grant, mapping or port left",
    ],
}


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in a fresh interpreter with this tree importable; bounded."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def run_example(name: str) -> subprocess.CompletedProcess[str]:
    """``python examples/NAME``."""
    return run_python(str(EXAMPLES / name))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs_and_reports_what_it_did(name: str) -> None:
    proc = run_example(name)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    for want in EXPECTED[name]:
        assert want in lines, f"{name} did not print {want!r}; it printed:\n{proc.stdout}"
    assert "Traceback" not in proc.stderr


def test_every_example_is_run_here_and_explains_itself() -> None:
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == sorted(EXPECTED), "add new examples to EXPECTED"
    for name in scripts:
        doc = ast.get_docstring(ast.parse((EXAMPLES / name).read_text()))
        assert doc and "Run it:" in doc, f"{name} needs a docstring saying what it shows"


def test_readme_python_api_snippet_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "b'hello'"

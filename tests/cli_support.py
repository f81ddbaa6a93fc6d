"""Running the ``xenpv`` command as a separate process in tests (importable from any test
directory: ``tests/`` is on ``sys.path`` once its conftest is loaded).

* :func:`xenpv` -- the argument list that runs ``python -m xenpv ARGS`` in this
  interpreter;
* :func:`json_line` -- the next JSON line a running ``xenpv`` process prints (its
  ``ready``/``done`` events), with a bound on the wait;
* :func:`session_members` -- the live processes of a session (a test starts a command
  in a session of its own to find everything it started, and to end it by pid).
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path


def xenpv(*args: str) -> list[str]:
    """``python -m xenpv ARGS`` with this interpreter (so the tree under test runs)."""
    return [sys.executable, "-m", "xenpv", *args]


def json_line(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, object]:
    """The next line ``proc`` prints on its stdout pipe, parsed as a JSON object;
    ``AssertionError`` if none comes within ``timeout`` seconds or the process exits."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no JSON line from the process"
    line = proc.stdout.readline()
    assert line, f"process exited with {proc.wait(5)}"
    event: dict[str, object] = json.loads(line)
    return event


def session_members(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live (not zombie) process of session ``sid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append((int(entry.name), cmdline))
    return out

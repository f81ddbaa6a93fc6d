"""xenpv.pidlock: one live owner per lock file, stale files taken over, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from xenpv.pidlock import InUseError, PidLock


def test_a_held_lock_refuses_a_second_owner_naming_the_pid(tmp_path: Path) -> None:
    first = PidLock(tmp_path / "x.lock", "thing X")
    first.acquire()
    second = PidLock(tmp_path / "x.lock", "thing X")
    with pytest.raises(InUseError) as info:
        second.acquire()
    assert info.value.pid == os.getpid()
    assert str(info.value) == f"thing X is in use by running process {os.getpid()}"
    assert not second.held
    first.release()
    assert not (tmp_path / "x.lock").exists()
    second.acquire()
    assert (tmp_path / "x.lock").read_text() == f"{os.getpid()}\n"
    second.release()


def _holder(path: Path, then: str) -> list[str]:
    """A Python command that takes the lock ``path`` and then runs ``then``."""
    code = f"import os, sys; from xenpv.pidlock import PidLock; PidLock(sys.argv[1], 'x').acquire(); {then}"
    return [sys.executable, "-c", code, str(path)]


def test_the_lock_of_a_dead_process_is_stale_and_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    subprocess.run(_holder(path, "os._exit(0)"), check=True, timeout=30)
    assert path.read_text().strip().isdigit()  # left behind by a process that is gone
    lock = PidLock(path, "x")
    lock.acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    lock.release()


def test_a_lock_held_by_another_process_names_it(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    proc = subprocess.Popen(
        _holder(path, "print('held', flush=True); sys.stdin.read()"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        with pytest.raises(InUseError) as info:
            PidLock(path, "x").acquire()
        assert info.value.pid == proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)
    lock = PidLock(path, "x")
    lock.acquire()
    lock.release()


def test_a_missing_directory_is_an_os_error_naming_what_is_locked(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="the lock of socket S"):
        PidLock(tmp_path / "no-such-dir" / "s.lock", "socket S").acquire()

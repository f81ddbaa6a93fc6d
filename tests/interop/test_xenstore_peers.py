"""Xen's own test-xenstore and the pyxs client against our embedded xenstored."""

from __future__ import annotations

import subprocess
import threading
from typing import Any

import pytest
import pyxs

from xenpv import peers

TIMEOUT = 60
TESTS = ["read 1", "read 2000", "write 1", "write 2000", "dir", "rm node", "rm dir",
         "ta empty", "ta empty x", "ta rmw", "ta rmw x", "ta err"]


def test_xenstore(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run Xen's test-xenstore with ``args``."""
    exe = str(peers.find("test-xenstore"))
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=TIMEOUT)


test_xenstore.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def test_test_xenstore_lists_its_twelve_tests(xs_env: dict[str, str]) -> None:
    result = test_xenstore(xs_env, "-l")
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0].strip() for line in result.stdout.splitlines()] == TESTS


def test_test_xenstore_all_tests_pass(xs_env: dict[str, str]) -> None:
    result = test_xenstore(xs_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split(":")[0].strip() for line in result.stdout.splitlines()] == TESTS


def test_test_xenstore_20_iterations(xs_env: dict[str, str]) -> None:
    result = test_xenstore(xs_env, "-i", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all("avg:" in line for line in result.stdout.splitlines())
    assert len(result.stdout.splitlines()) == len(TESTS)


def test_test_xenstore_each_test_alone(xs_env: dict[str, str]) -> None:
    for name in ("ta err", "ta rmw", "rm dir"):
        result = test_xenstore(xs_env, "-t", name, "-i", "3")
        assert result.returncode == 0, (name, result.stdout + result.stderr)


def test_test_xenstore_random_mode_5_seconds(xs_env: dict[str, str]) -> None:
    result = test_xenstore(xs_env, "-r", "5")
    assert result.returncode == 0, result.stdout + result.stderr


def test_test_xenstore_without_server_exits_2(xs_server: Any) -> None:
    env = xs_server.env()
    env["XENSTORED_PATH"] = xs_server.socket + ".absent"
    assert test_xenstore(env).returncode == 2


@pytest.mark.timeout(TIMEOUT)  # pyxs calls block without a timeout of their own
def test_pyxs_client_operations(xs_server: Any) -> None:
    with pyxs.Client(unix_socket_path=xs_server.socket) as c:
        c[b"/pyxs/a"] = b"1"
        c.write(b"/pyxs/b", b"two\x00bytes")
        assert c[b"/pyxs/a"] == b"1"
        assert c.read(b"/pyxs/b") == b"two\x00bytes"
        assert sorted(c.list(b"/pyxs")) == [b"a", b"b"]
        assert c.exists(b"/pyxs/a") and not c.exists(b"/pyxs/zz")
        c.mkdir(b"/pyxs/d")
        assert c[b"/pyxs/d"] == b""
        c.set_perms(b"/pyxs/d", [b"b0", b"r5"])
        assert c.get_perms(b"/pyxs/d") == [b"b0", b"r5"]
        assert c.get_domain_path(3) == b"/local/domain/3"
        assert c.is_domain_introduced(0)
        c.delete(b"/pyxs/a")
        assert not c.exists(b"/pyxs/a")
        try:
            c[b"/nonexistent/key"]
        except pyxs.PyXSError as exc:
            assert exc.args[0] == 2  # ENOENT
        else:
            raise AssertionError("reading a missing key must fail")


@pytest.mark.timeout(TIMEOUT)  # pyxs calls block without a timeout of their own
def test_pyxs_transactions_commit_abort_and_conflict(xs_server: Any) -> None:
    with pyxs.Client(unix_socket_path=xs_server.socket) as c, \
            pyxs.Client(unix_socket_path=xs_server.socket) as other:
        c[b"/tx/n"] = b"0"
        c.transaction()
        c[b"/tx/n"] = b"1"
        assert other[b"/tx/n"] == b"0"  # isolated until commit
        assert c.commit() is True
        assert other[b"/tx/n"] == b"1"
        c.transaction()
        c[b"/tx/gone"] = b"x"
        c.rollback()
        assert not other.exists(b"/tx/gone")
        c.transaction()
        value = int(c[b"/tx/n"])
        other[b"/tx/n"] = b"99"  # a conflicting write outside the transaction
        c[b"/tx/n"] = str(value + 1).encode()
        assert c.commit() is False  # EAGAIN
        assert other[b"/tx/n"] == b"99"


@pytest.mark.timeout(TIMEOUT)  # pyxs calls block without a timeout of their own
def test_pyxs_monitor_watches(xs_server: Any) -> None:
    with pyxs.Client(unix_socket_path=xs_server.socket) as c:
        c[b"/mon/x"] = b"0"
        with c.monitor() as m:
            m.watch(b"/mon", b"tok")
            events = m.wait()
            got: list[Any] = []
            done = threading.Event()

            def collect() -> None:
                for ev in events:
                    got.append(ev)
                    if len(got) == 3:
                        done.set()
                        return

            t = threading.Thread(target=collect, daemon=True)
            t.start()
            c[b"/mon/x"] = b"1"
            c[b"/mon/y"] = b"2"
            assert done.wait(TIMEOUT)
            assert [(e.path, e.token) for e in got] == [
                (b"/mon", b"tok"), (b"/mon/x", b"tok"), (b"/mon/y", b"tok")
            ]
            m.unwatch(b"/mon", b"tok")

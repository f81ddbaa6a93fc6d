"""The ``xenpv xenstored`` daemon as a real process: state across restarts, signals, options."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hostile"))

from test_xenstore_support import RawClient, setup_home

from xenpv.xenstore import wire
from xenpv.xenstore.wire import XsType as T


@contextmanager
def daemon(
    tmp: Path, *extra: str, fd_limit: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``xenpv xenstored`` until the block ends (SIGKILL if it is still there); with
    ``fd_limit`` its soft descriptor limit is lowered to that."""
    pid_file = tmp / "xenstored.pid"
    args = [
        sys.executable, "-m", "xenpv", "xenstored",
        "--socket", str(tmp / "dom0.sock"),
        "--domain", f"5={tmp / 'dom5.sock'}",
        "--pid-file", str(pid_file),
        *extra,
    ]  # fmt: skip

    def limit() -> None:
        if fd_limit is not None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, hard))

    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit
    )
    try:
        deadline = time.monotonic() + 20
        while not pid_file.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=20)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> tuple[int, bytes, bytes]:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=20)
    return proc.returncode, out, err


def dump(c: RawClient) -> dict[str, tuple[bytes, bytes, bytes]]:
    """Every node: value, permissions and generation (from DIRECTORY_PART)."""
    tree: dict[str, tuple[bytes, bytes, bytes]] = {}
    todo = ["/"]
    while todo:
        path = todo.pop()
        gen = c.ok(T.DIRECTORY_PART, path, "0").split(b"\0", 1)[0]
        tree[path] = (c.read(path), c.ok(T.GET_PERMS, path), gen)
        names = wire.fields(c.ok(T.DIRECTORY, path))
        todo += [(path.rstrip("/") + "/" + n.decode()) for n in names]
    return tree


def test_state_survives_a_restart_of_the_daemon(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    with daemon(tmp_path, "--state-file", str(state)) as proc:
        with RawClient(str(tmp_path / "dom0.sock")) as dom0:
            setup_home(dom0, 5)
            odd = [bytes(range(256)), b"", b"\0", b"\xff" * 2000, "ünïcødé".encode(), b"a\nb\tc"]
            for i in range(300):
                dom0.write(f"/data/{i % 7}/node-{i}", odd[i % len(odd)] + str(i).encode())
            dom0.ok(T.SET_PERMS, "/data/3", "r0", "b5", "w9")
            dom0.ok(T.SET_PERMS, "@releaseDomain", "n0", "r5")
            dom0.ok(T.INTRODUCE, "9", "100", "1")
            with RawClient(str(tmp_path / "dom5.sock")) as guest:
                assert guest.write("mine/x", b"guest\x00bytes") == "OK"
                assert guest.write("/data/3/by-guest", b"1") == "OK"
            before = dump(dom0)
        code, out, err = stop(proc)
    assert code == 0, err
    assert out == b""
    assert not (tmp_path / "dom0.sock").exists() and not (tmp_path / "dom5.sock").exists()
    assert not (tmp_path / "xenstored.pid").exists()
    assert state.exists() and not Path(f"{state}.tmp").exists()

    with daemon(tmp_path, "--state-file", str(state)) as proc:
        with RawClient(str(tmp_path / "dom0.sock")) as dom0:
            assert dump(dom0) == before
            assert dom0.ok(T.GET_PERMS, "@releaseDomain") == b"n0\0r5\0"
            assert dom0.ok(T.IS_DOMAIN_INTRODUCED, "9") == b"T\0"
            assert dom0.ok(T.CONTROL, "check") == b"OK\0"
            dom0.write("/after-restart", b"1")
            gens = {int(g) for _, _, g in dump(dom0).values()}
            assert max(gens) > max(int(g) for _, _, g in before.values())
        with RawClient(str(tmp_path / "dom5.sock")) as guest:
            assert guest.read("mine/x") == b"guest\x00bytes"
            assert guest.read("/data/3/by-guest") == b"1"
            assert guest.ok(T.GET_PERMS, "/data/3/by-guest") == b"r5\0b5\0w9\0"
        assert stop(proc, signal.SIGINT)[0] == 0


def test_changes_are_saved_while_running_and_survive_sigkill(tmp_path: Path) -> None:
    """With --save-interval the tree is saved while it changes, so a daemon that is
    killed (no chance to save at exit) loses at most the last interval."""
    state = tmp_path / "state.json"
    opts = ("--state-file", str(state), "--save-interval", "0.2")
    with daemon(tmp_path, *opts) as proc:
        with RawClient(str(tmp_path / "dom0.sock")) as dom0:
            setup_home(dom0, 5)
            for i in range(50):
                dom0.write(f"/kept/{i}", str(i).encode())
            dom0.ok(T.INTRODUCE, "9", "100", "1")
            before = dump(dom0)
            deadline = time.monotonic() + 20
            while b"/kept/49" not in (state.read_bytes() if state.exists() else b""):
                assert time.monotonic() < deadline, "the state was never saved"
                time.sleep(0.05)
            mtime = state.stat().st_mtime_ns
            time.sleep(0.6)  # nothing changed: nothing is written again
            assert state.stat().st_mtime_ns == mtime
        proc.kill()
        proc.wait(20)
    (tmp_path / "xenstored.pid").unlink()  # left by the killed daemon
    with daemon(tmp_path, *opts) as proc:
        with RawClient(str(tmp_path / "dom0.sock")) as dom0:
            assert dump(dom0) == before
            assert dom0.ok(T.IS_DOMAIN_INTRODUCED, "9") == b"T\0"
        assert stop(proc)[0] == 0


def test_daemon_exits_cleanly_on_sigint_without_state_file(tmp_path: Path) -> None:
    with daemon(tmp_path) as proc:
        with RawClient(str(tmp_path / "dom0.sock")) as dom0:
            assert dom0.ok(T.GET_DOMAIN_PATH, "5") == b"/local/domain/5\0"
        code, out, _ = stop(proc, signal.SIGINT)
    assert code == 0 and out == b""
    assert not any(p.name.endswith(".sock") for p in tmp_path.iterdir())


def test_quota_options_apply_to_domains(tmp_path: Path) -> None:
    with daemon(tmp_path, "--quota", "nodes=3", "--quota", "write-rate=0") as proc:
        with (
            RawClient(str(tmp_path / "dom0.sock")) as dom0,
            RawClient(str(tmp_path / "dom5.sock")) as guest,
        ):
            setup_home(dom0, 5)
            assert guest.write("a") == "OK"
            assert guest.write("b") == "OK"
            assert guest.write("c") == "ENOSPC"  # home + a + b = 3
            dom0.write("/local/domain/5/by-dom0")  # dom0 is exempt
        assert stop(proc)[0] == 0


def test_bad_options_are_usage_errors(tmp_path: Path) -> None:
    for bad in (["--quota", "bogus=1"], ["--domain", "0=/x"], ["--domain", "five"]):
        out = subprocess.run(
            [sys.executable, "-m", "xenpv", "xenstored", "--socket", str(tmp_path / "s"), *bad],
            capture_output=True,
            timeout=30,
        )
        assert out.returncode == 2, bad
    assert not os.path.exists(tmp_path / "s")


def test_always_eagain_option(tmp_path: Path) -> None:
    with daemon(tmp_path, "--always-eagain") as proc:
        with RawClient(str(tmp_path / "dom0.sock")) as dom0:
            tx = int(dom0.ok(T.TRANSACTION_START, "")[:-1])
            assert dom0.write("/x", b"1", tx=tx) == "OK"
            assert dom0.err(T.TRANSACTION_END, "T", tx=tx) == "EAGAIN"
            assert dom0.err(T.READ, "/x") == "ENOENT"
        assert stop(proc)[0] == 0


def test_unusable_state_file_or_socket_is_a_clean_error(tmp_path: Path) -> None:
    bad_state = tmp_path / "state.json"
    bad_state.write_text('{"version": 1, "nodes": [["/"]]}')
    cases = [
        ["--socket", str(tmp_path / "s"), "--state-file", str(bad_state)],
        ["--socket", str(tmp_path / "no-such-dir" / "s")],
    ]
    for args in cases:
        out = subprocess.run(
            [sys.executable, "-m", "xenpv", "xenstored", *args], capture_output=True, timeout=30
        )
        assert out.returncode == 1, out.stderr
        assert b"Traceback" not in out.stderr


def test_scenario_21_guest_connections_never_lock_dom0_out(tmp_path: Path) -> None:
    """A guest opens connections on its own socket until it is refused, with the
    connection quota disabled and the daemon's descriptor limit low: it never gets the
    last descriptors, so dom0 (and a fresh dom0 connection) is still answered (issue 14
    item 4; before, the daemon ran out of descriptors and dom0 could not connect)."""
    held: list[socket.socket] = []
    with daemon(tmp_path, "--quota", "connections=0", fd_limit=160) as proc:
        try:
            for _ in range(300):
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.settimeout(2.0)
                held.append(c)
                try:
                    c.connect(str(tmp_path / "dom5.sock"))
                    c.sendall(wire.HEADER.pack(T.GET_DOMAIN_PATH, 1, 0, 2) + b"5\0")
                    if not c.recv(4096):
                        break  # refused: closed at once
                except OSError:  # refused (reset, broken pipe) or never accepted (timeout)
                    break
            else:
                raise AssertionError("300 guest connections were all served")
            assert len(held) > 50  # the guest got many before being refused
            with RawClient(str(tmp_path / "dom0.sock"), timeout=5.0) as dom0:
                assert dom0.ok(T.GET_DOMAIN_PATH, "5") == b"/local/domain/5\0"
                dom0.write("/still", b"answered")
                assert dom0.read("/still") == b"answered"
        finally:
            for c in held:
                c.close()
        code, _, err = stop(proc)
    assert code == 0
    assert b"refused a connection of domain 5" in err
    assert err.count(b"\n") < 20  # the warning is rate-limited


def _second(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "xenpv", "xenstored", "--pid-file", str(tmp_path / "b.pid"), *args],
        capture_output=True,
        timeout=30,
    )


def test_second_daemon_on_a_live_socket_or_state_file_refuses(tmp_path: Path) -> None:
    """A second ``xenpv xenstored`` on the socket (or the state file) of a live one exits
    with status 1 and one line naming the live daemon's pid, and changes nothing: the
    first keeps its sockets and pid file and saves the tree with everything written to
    it (issue 14 item 7; before, the second took the socket over, the first became
    unreachable and a key written to the second was lost)."""
    state = tmp_path / "state.json"
    with daemon(tmp_path, "--state-file", str(state)) as proc:
        with RawClient(str(tmp_path / "dom0.sock")) as dom0:
            dom0.write("/first", b"1")
        attempts = [
            ["--socket", str(tmp_path / "dom0.sock")],
            ["--socket", str(tmp_path / "other.sock"), "--state-file", str(state)],
            ["--socket", str(tmp_path / "other.sock"), "--domain", f"5={tmp_path / 'dom5.sock'}"],
        ]
        for args in attempts:
            out = _second(tmp_path, *args)
            assert out.returncode == 1, out
            lines = out.stderr.decode().strip().splitlines()
            assert len(lines) == 1 and f"running process {proc.pid}" in lines[0], lines
            assert not (tmp_path / "other.sock").exists() and not (tmp_path / "b.pid").exists()
        assert (tmp_path / "xenstored.pid").read_text() == f"{proc.pid}\n"
        with RawClient(str(tmp_path / "dom0.sock"), timeout=5.0) as dom0:
            assert dom0.read("/first") == b"1"
            dom0.write("/second", b"2")
        with RawClient(str(tmp_path / "dom5.sock"), timeout=5.0) as guest:
            assert guest.ok(T.GET_DOMAIN_PATH, "5") == b"/local/domain/5\0"
        assert stop(proc)[0] == 0
    saved = state.read_text()
    assert "/first" in saved and "/second" in saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_daemon_replaces_the_stale_socket_of_a_killed_one(tmp_path: Path) -> None:
    """A socket (and lock file) left by a daemon that was killed has no live owner: the
    next daemon replaces it and serves."""
    with daemon(tmp_path) as proc:
        proc.kill()
        proc.wait(20)
    assert (tmp_path / "dom0.sock").is_socket() and (tmp_path / "dom0.sock.lock").exists()
    (tmp_path / "xenstored.pid").unlink()
    with daemon(tmp_path) as proc:
        with RawClient(str(tmp_path / "dom0.sock"), timeout=5.0) as dom0:
            assert dom0.ok(T.GET_DOMAIN_PATH, "5") == b"/local/domain/5\0"
        assert stop(proc)[0] == 0

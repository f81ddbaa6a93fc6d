"""Xen's xenstore-utils against our xenstored, and ``xenpv xenstore`` against them.

Every check runs the real Debian tool and our CLI on the same server and demands the
same stdout and exit status (stderr wording differs only in the program name).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from xenpv import peers

TIMEOUT = 30


def real(env: dict[str, str], tool: str, *args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    """Run Xen's ``xenstore-<tool>``."""
    exe = str(peers.find(f"xenstore-{tool}"))
    return subprocess.run([exe, *args], env=env, capture_output=True, timeout=TIMEOUT)


def ours(env: dict[str, str], mode: str, *args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    """Run ``xenpv xenstore <mode>``."""
    cmd: list[str | bytes] = [sys.executable, "-m", "xenpv", "xenstore", mode, *args]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=TIMEOUT)


def same(env: dict[str, str], mode: str, *args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    """Run both; assert equal stdout and exit status; return the real tool's result."""
    a = real(env, mode, *args)
    b = ours(env, mode, *args)
    assert (b.returncode, b.stdout) == (a.returncode, a.stdout), (a.stderr, b.stderr)
    return a


def check(result: subprocess.CompletedProcess[bytes]) -> bytes:
    assert result.returncode == 0, result.stderr
    return result.stdout


def populate(env: dict[str, str], base: str = "/t") -> None:
    check(real(env, "write",
               f"{base}/a", "plain value",
               f"{base}/a/deep/er/still", "x",
               f"{base}/esc", "tab\\there\\nnl\\\\bs\\x01\\x7f\\xff\\001end",
               f"{base}/empty", "",
               f"{base}/long", "L" * 150,
               f"{base}/b/" + "n" * 90, "name too long for the line"))


def test_write_then_read_match(xs_env: dict[str, str]) -> None:
    populate(xs_env)
    keys = ["/t/a", "/t/esc", "/t/empty", "/t/long", "/t/a/deep/er/still"]
    out = same(xs_env, "read", *keys).stdout
    assert out.splitlines()[0] == b"plain value"
    same(xs_env, "read", "-p", *keys)
    same(xs_env, "read", "-R", "/t/esc")
    same(xs_env, "read", "-p", "-R", "/t/esc", "/t/a")
    assert check(ours(xs_env, "read", "-R", "/t/esc")) == b"tab\there\nnl\\bs\x01\x7f\xff\x01end"


def test_our_write_escapes_like_xenstore_write(xs_env: dict[str, str]) -> None:
    spec = "a\\tb\\x41\\x4g\\101\\7\\q\\\\z\\"
    check(real(xs_env, "write", "/w/real", spec, "/w/realraw", "-", "/w/e", ""))
    check(ours(xs_env, "write", "/w/ours", spec, "/w/oursraw", "-", "/w/e2", ""))
    check(real(xs_env, "write", "-R", "/w/real-R", spec))
    check(ours(xs_env, "write", "-R", "/w/ours-R", spec))
    r = check(real(xs_env, "read", "-R", "/w/real", "/w/real-R"))
    o = check(ours(xs_env, "read", "-R", "/w/ours", "/w/ours-R"))
    assert r == o and b"\x41" in r


def test_read_missing_key_fails_the_same(xs_env: dict[str, str]) -> None:
    populate(xs_env)
    a = same(xs_env, "read", "/t/a", "/nope", "/t/esc")
    assert a.returncode == 1
    b = ours(xs_env, "read", "/nope")
    assert b"couldn't read path /nope" in b.stderr


def test_ls_tree_formats(xs_env: dict[str, str]) -> None:
    populate(xs_env)
    check(real(xs_env, "chmod", "/t/esc", "b0", "r5", "w7"))
    for opts in ([], ["-p"], ["-f"], ["-f", "-p"]):
        same(xs_env, "ls", *opts)
        out = same(xs_env, "ls", *opts, "/t").stdout
        assert out
    assert b"\\..." in check(ours(xs_env, "ls", "/t"))  # the long value was truncated
    assert b"(b0,r5,w7)" in check(ours(xs_env, "ls", "-p", "/t"))
    a = same(xs_env, "ls", "/missing")
    assert a.returncode == 1


def test_list_and_prefix(xs_env: dict[str, str]) -> None:
    populate(xs_env)
    assert same(xs_env, "list", "/t").stdout.split() == [b"a", b"esc", b"empty", b"long", b"b"]
    same(xs_env, "list", "-p", "/t", "/t/a")
    same(xs_env, "list", "-p", "/")
    same(xs_env, "list", "/t/empty")
    assert same(xs_env, "list", "/t", "/nothing").returncode == 1


BIG_NAMES = [f"child-number-{i:05d}" for i in range(400)]


def make_big_directory(env: dict[str, str]) -> None:
    """A directory whose child list (8000 bytes) does not fit in one 4096-byte reply."""
    pairs = [x for n in BIG_NAMES for x in (f"/big/{n}", n[-3:])]
    for i in range(0, len(pairs), 100):
        check(ours(env, "write", *pairs[i : i + 100]))


def test_ls_of_directory_too_big_for_one_reply(xs_env: dict[str, str]) -> None:
    """libxenstore and our client both fall back to DIRECTORY_PART on E2BIG."""
    make_big_directory(xs_env)
    out = same(xs_env, "ls", "/big").stdout
    assert [line.split(b" = ")[0].decode() for line in out.splitlines()] == BIG_NAMES


def test_list_of_directory_too_big_for_one_reply(xs_env: dict[str, str]) -> None:
    """xenstore-list runs in a transaction: the DIRECTORY_PART fallback must commit."""
    make_big_directory(xs_env)
    out = same(xs_env, "list", "/big").stdout
    assert out.decode().split() == BIG_NAMES


def test_exists_exit_codes(xs_env: dict[str, str]) -> None:
    populate(xs_env)
    assert same(xs_env, "exists", "/t/a").returncode == 0
    assert same(xs_env, "exists", "/t/nothing").returncode == 1
    assert same(xs_env, "exists", "/t/a", "/t/esc").returncode == 0
    assert same(xs_env, "exists", "/t/a", "/t/nothing").returncode == 1
    assert same(xs_env, "exists", "-p", "/t/empty").returncode == 1  # -p: usage error


def test_rm_and_tidy(xs_env: dict[str, str]) -> None:
    for base in ("/r1", "/r2"):
        check(real(xs_env, "write", f"{base}/x/y/z", "v", f"{base}/keep", "k",
                   f"{base}/valued", "v", f"{base}/valued/leaf", "1"))
    check(real(xs_env, "rm", "-t", "/r1/x/y/z", "/r1/valued/leaf"))
    check(ours(xs_env, "rm", "-t", "/r2/x/y/z", "/r2/valued/leaf"))
    r1 = check(real(xs_env, "ls", "/r1"))
    assert r1 == check(ours(xs_env, "ls", "/r2")) == b'keep = "k"\nvalued = "v"\n'
    check(ours(xs_env, "rm", "/r2/keep"))
    check(real(xs_env, "rm", "/r1/keep"))
    assert check(ours(xs_env, "ls", "/r1")) == check(real(xs_env, "ls", "/r2"))
    # absent node with an existing parent: OK; with a missing parent: failure
    assert same(xs_env, "rm", "/r1/absent").returncode == 0
    assert same(xs_env, "rm", "/r1/no/such").returncode == 1


def test_chmod_recurse_and_upto(xs_env: dict[str, str]) -> None:
    for base in ("/c1", "/c2"):
        check(real(xs_env, "write", f"{base}/p/q/r", "v", f"{base}/p/q/t", "", f"{base}/p/s", "w"))
    for tool, base in ((real, "/c1"), (ours, "/c2")):
        check(tool(xs_env, "chmod", "-r", f"{base}/p", "b7", "r0"))
        check(tool(xs_env, "chmod", "-u", f"{base}/p/q/r", "n3"))
        check(tool(xs_env, "chmod", f"{base}/p/s", "w9", "b11"))
    a = check(real(xs_env, "ls", "-p", "/c1"))
    b = check(ours(xs_env, "ls", "-p", "/c2"))
    assert a == b and b"(n3)" in a and b"(w9,b11)" in a and b"(b7,r0)" in a
    bad = same(xs_env, "chmod", "/c1/p", "x5")
    assert bad.returncode == 1
    assert same(xs_env, "chmod", "/c1/missing", "b0").returncode == 1


def _first_line(proc: subprocess.Popen[bytes], deadline: float) -> bytes:
    assert proc.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "watcher printed nothing in time"
        chunk = os.read(proc.stdout.fileno(), 1)
        assert chunk, "watcher exited early"
        line += chunk
    return line


def watch_both(
    env: dict[str, str], key: str, count: int, trigger: Callable[[], None]
) -> list[bytes]:
    """Run xenstore-watch and ours on ``key`` for ``count`` events; ``trigger`` makes them.

    Both must print the initial event (the key itself) first; returns both outputs.
    """
    exe = str(peers.find("xenstore-watch"))
    n = str(count)
    procs = [
        subprocess.Popen([exe, "-n", n, key], env=env, stdout=subprocess.PIPE),
        subprocess.Popen([sys.executable, "-m", "xenpv", "xenstore", "watch", "-n", n, key],
                         env=env, stdout=subprocess.PIPE),
    ]
    try:
        deadline = time.monotonic() + TIMEOUT
        firsts = [_first_line(p, deadline) for p in procs]
        assert firsts == [key.encode() + b"\n"] * 2
        trigger()
        outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0]
        return outs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


def test_watch_prints_the_same_events(xs_env: dict[str, str]) -> None:
    check(real(xs_env, "write", "/wt/x", "0"))

    def trigger() -> None:
        check(real(xs_env, "write", "/wt/x", "1"))
        check(real(xs_env, "write", "/wt/y/z", "2"))
        check(real(xs_env, "rm", "/wt/x"))

    outs = watch_both(xs_env, "/wt", 4, trigger)
    assert outs[0] == outs[1] == b"/wt/x\n/wt/y/z\n/wt/x\n"


def test_guest_watch_on_relative_path_reports_relative_paths(
    xs_server: Any, xs_env: dict[str, str]
) -> None:
    check(real(xs_env, "write", "/local/domain/5/data/k", "0"))
    check(real(xs_env, "chmod", "-r", "/local/domain/5", "b5"))
    guest = dict(xs_env, XENSTORED_PATH=xs_server.guest_socket)

    def trigger() -> None:
        check(real(xs_env, "write", "/local/domain/5/data/k", "1"))
        check(real(guest, "write", "data/new", "2"))

    outs = watch_both(guest, "data", 3, trigger)
    assert outs[0] == outs[1] == b"data/k\ndata/new\n"


def test_usage_errors_exit_1(xs_env: dict[str, str]) -> None:
    for mode, args in (("read", []), ("write", ["/k"]), ("rm", []), ("list", []),
                       ("exists", []), ("chmod", [])):
        assert real(xs_env, mode, *args).returncode == 1
        assert ours(xs_env, mode, *args).returncode == 1


def test_relative_paths_act_as_the_connection_domain(xs_server: Any, xs_env: dict[str, str]) -> None:
    """Through a domain's own endpoint, relative keys land under /local/domain/<domid>."""
    check(real(xs_env, "write", "/local/domain/5/name", "guest"))
    check(real(xs_env, "chmod", "-r", "/local/domain/5", "b5"))
    guest = dict(xs_env, XENSTORED_PATH=xs_server.guest_socket)
    assert check(real(guest, "read", "name")) == b"guest\n"
    assert check(ours(guest, "read", "name")) == b"guest\n"
    check(ours(guest, "write", "data/x", "1"))
    assert check(real(xs_env, "read", "/local/domain/5/data/x")) == b"1\n"
    same(guest, "list", "-p", "data")


@pytest.mark.parametrize("mode", ["read", "ls"])
def test_no_server_is_an_error(mode: str, tmp_path: os.PathLike[str]) -> None:
    env = peers.run_env()
    env["XENSTORED_PATH"] = os.path.join(tmp_path, "absent.sock")
    assert real(env, mode, "/x").returncode == 1
    assert ours(env, mode, "/x").returncode == 1


def _run_on_terminal(cmd: list[str], env: dict[str, str], cols: int) -> bytes:
    """Run ``cmd`` with stdout on a pty ``cols`` wide; return what it printed."""
    import fcntl
    import pty
    import struct
    import termios
    import tty

    master, slave = pty.openpty()
    try:
        tty.setraw(slave)  # no newline translation
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
        proc = subprocess.Popen(cmd, env=env, stdout=slave, stderr=subprocess.DEVNULL)
        os.close(slave)
        slave = -1
        out = bytearray()
        deadline = time.monotonic() + TIMEOUT
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                proc.kill()
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the program closed the terminal
                break
            if not chunk:
                break
            out += chunk
        proc.wait(TIMEOUT)
        return bytes(out)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


@pytest.mark.parametrize("cols", [50, 120])
def test_ls_on_a_terminal_uses_its_width(xs_env: dict[str, str], cols: int) -> None:
    populate(xs_env)
    exe = str(peers.find("xenstore-ls"))
    for opts in ([], ["-p"]):
        a = _run_on_terminal([exe, *opts, "/t"], xs_env, cols)
        b = _run_on_terminal([sys.executable, "-m", "xenpv", "xenstore", "ls", *opts, "/t"],
                             xs_env, cols)
        assert a == b and a


def test_multicall_xenstore_binary_agrees(xs_env: dict[str, str]) -> None:
    """Xen's ``xenstore MODE …`` front end gives what ``xenpv xenstore MODE …`` gives."""
    populate(xs_env)
    exe = str(peers.find("xenstore"))
    for mode, *args in (["read", "-p", "/t/a", "/t/esc"], ["list", "/t"], ["ls", "-f", "/t"],
                        ["exists", "/t/long"], ["exists", "/t/none"]):
        a = subprocess.run([exe, mode, *args], env=xs_env, capture_output=True, timeout=TIMEOUT)
        b = ours(xs_env, mode, *args)
        assert (a.returncode, a.stdout) == (b.returncode, b.stdout), (mode, a.stderr, b.stderr)


@pytest.mark.parametrize("spec", ["n99999999999", "n65536", "n-1", "r4294967297", "nabc"])
def test_chmod_refuses_out_of_range_domids(xs_env: dict[str, str], spec: str) -> None:
    """Issue 14 item 9: a domid beyond the wire's range is refused, never masked to 16
    bits (``n99999999999`` used to set ``n59391``)."""
    check(real(xs_env, "write", "/chmod/k", "v"))
    before = check(real(xs_env, "ls", "-p", "/chmod"))
    b = ours(xs_env, "chmod", "/chmod/k", spec)
    assert b.returncode == 1 and b"Invalid argument" in b.stderr, b.stderr
    if spec in ("n99999999999", "n65536", "n-1"):  # atoi: "abc" is 0, 4294967297 is 1
        a = real(xs_env, "chmod", "/chmod/k", spec)
        assert a.returncode == 1 and b"Invalid argument" in a.stderr
    assert check(real(xs_env, "ls", "-p", "/chmod")) == before


def test_chmod_of_a_missing_path_gives_the_reason(xs_env: dict[str, str]) -> None:
    """Issue 14 item 12: the reason is printed, as xenstore-chmod prints it."""
    a = real(xs_env, "chmod", "/no/such/node", "n0")
    b = ours(xs_env, "chmod", "/no/such/node", "n0")
    assert a.returncode == b.returncode == 1
    assert b"No such file or directory" in a.stderr
    assert b.stderr.count(b"\n") == 1 and b"No such file or directory" in b.stderr

"""Grant and event-channel paths of the replacement libraries that need volume or
failure: mappings split across replies and chunks, and a daemon that goes away.  Driven
through :class:`~xenpv.platforms.xen.XenPlatform`, several domains in this process (each
platform keeps the connection it opened)."""

from __future__ import annotations

import asyncio
import errno
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from shim_peers import LoopbackRun
from shim_support import act_as, daemon_stats, loopback_fixture

from xenpv import peers
from xenpv.errors import LocalError
from xenpv.platforms.base import GrantCopy, GrantPtr, LocalPtr, PlatformGone, PortError, UnmapNotify
from xenpv.platforms.choose import open_platform
from xenpv.platforms.loopback.env import shim_dir
from xenpv.platforms.loopback.harness import stop_daemon
from xenpv.platforms.xen import XenPlatform, default_xenstore_path

PAGE = 4096


#: A daemon with domains 1 and 2 (shared by the module; tests close what they open).
loopback = loopback_fixture({1: "one", 2: "two"})


@pytest.fixture
def platform(
    loopback: LoopbackRun, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[int], XenPlatform]]:
    """``platform(N)``: a real-Xen platform acting as domain N (closed afterwards)."""
    opened: list[XenPlatform] = []

    def make(domid: int) -> XenPlatform:
        act_as(monkeypatch, loopback, domid)
        p = XenPlatform(domid, lib_dir=shim_dir())
        opened.append(p)
        return p

    yield make
    for p in opened:
        p.close()


def test_a_map_needing_more_descriptors_than_a_reply_carries_is_split(
    platform: Callable[[int], XenPlatform],
) -> None:
    a, b = platform(1), platform(2)
    # 300 separate shares: one descriptor each, more than one reply may carry (250)
    shares = [b.grants.grant(1) for _ in range(300)]
    for i, s in enumerate(shares):
        s.mem[0:2] = i.to_bytes(2, "little")
    m = a.grants.map(2, [s.refs[0] for s in shares])
    assert [int.from_bytes(m.mem[i * PAGE : i * PAGE + 2], "little") for i in range(300)] == list(
        range(300)
    )
    a.grants.unmap(m)
    for s in shares:
        b.grants.end_access(s)


def test_shares_and_maps_beyond_one_request_are_chunked(
    platform: Callable[[int], XenPlatform],
) -> None:
    a, b = platform(1), platform(2)
    pages = b.grants.grant(1, 1100)  # more than one GNT_SHARE may allocate (1024)
    assert len(set(pages.refs)) == 1100
    for i in (0, 1023, 1024, 1099):
        pages.mem[i * PAGE + 5 : i * PAGE + 7] = i.to_bytes(2, "little")
    m = a.grants.map(2, pages.refs)
    for i in (0, 1023, 1024, 1099):
        assert int.from_bytes(m.mem[i * PAGE + 5 : i * PAGE + 7], "little") == i
    m.mem[1024 * PAGE - 1 : 1024 * PAGE + 1] = b"xy"  # across the chunk boundary
    assert bytes(pages.mem[1024 * PAGE - 1 : 1024 * PAGE + 1]) == b"xy"
    a.grants.unmap(m)
    b.grants.end_access(pages)


def test_a_lost_daemon_is_reported_as_platform_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    run = LoopbackRun({1: "one", 2: "two"})  # its own daemon: this test stops it
    try:
        act_as(monkeypatch, run, 1)
        a = XenPlatform(1, lib_dir=shim_dir())
        port = a.events.alloc_unbound(2)
        stop_daemon(run.daemon)
        with pytest.raises(PlatformGone) as info:
            a.events.alloc_unbound(2)
        assert info.value.errno == errno.ENOTCONN
        with pytest.raises(PlatformGone):
            a.grants.grant(2)
        with pytest.raises(PlatformGone):
            a.events.unbind(port)
        a.close()  # releasing with no daemon neither hangs nor raises
    finally:
        run.close()


def test_restricted_event_channels_bind_only_to_that_domain(
    platform: Callable[[int], XenPlatform],
) -> None:
    zero, one, two = platform(0), platform(1), platform(2)
    from_zero = zero.events.alloc_unbound(1)
    from_two = two.events.alloc_unbound(1)
    one.events.restrict(2)
    with pytest.raises(PortError):
        one.events.bind_interdomain(0, from_zero)
    port = one.events.bind_interdomain(2, from_two)
    assert one.events.pending(5) == port


def test_discover_learns_the_domid_from_xenstore(
    loopback: LoopbackRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = loopback.rundir / "dom2"
    monkeypatch.setenv("XENPV_LOOPBACK_SOCKET", str(base / "control"))
    monkeypatch.setenv("XENSTORED_PATH", str(base / "xenstore"))
    p = asyncio.run(XenPlatform.discover(lib_dir=shim_dir()))
    try:
        assert p.domid == 2 and p.xenstore_path == str(base / "xenstore")
        assert p.grants.grant(1).refs[0] >= 8
    finally:
        p.close()


def test_close_releases_what_is_still_shared_and_mapped_and_stale_views_read_zeros(
    loopback: LoopbackRun, platform: Callable[[int], XenPlatform]
) -> None:
    a, b = platform(1), platform(2)
    pages = b.grants.grant(1, 2)
    pages.mem[0:4] = b"data"
    m = a.grants.map(2, pages.refs)
    view = m.mem[0:4]  # a slice that outlives the mapping
    a.close()
    b.close()
    assert bytes(view) == bytes(4)
    assert bytes(pages.mem[0:4]) == bytes(4)
    for domid in (1, 2):
        assert {k: v for k, v in daemon_stats(loopback, domid).items() if k != "handles"} == {
            "grants": 0, "revoking": 0, "mappings": 0, "ports": 0, "shares": 0,
        }
    with pytest.raises(LocalError):
        a.grants.grant(2)


def test_grant_copy_argument_errors_are_local(platform: Callable[[int], XenPlatform]) -> None:
    a = platform(1)
    buf = bytearray(8)
    with pytest.raises(LocalError):
        a.grants.copy([GrantCopy(LocalPtr(b"abcd"), LocalPtr(buf), 4)])
    with pytest.raises(LocalError):
        a.grants.copy([GrantCopy(GrantPtr(2, 8, 0), LocalPtr(buf, 6), 4)])
    with pytest.raises(LocalError):
        a.grants.copy([GrantCopy(GrantPtr(2, 8, 0), LocalPtr(buf), 70_000)])
    with pytest.raises(LocalError):
        a.grants.map(2, [])
    with pytest.raises(LocalError):
        a.grants.grant(2, 0)
    with pytest.raises(LocalError):
        a.grants.map(2, [8], notify=UnmapNotify(4096))
    assert a.grants.copy([]) == []


def test_pending_without_timeout_blocks_until_an_event(
    platform: Callable[[int], XenPlatform],
) -> None:
    a, b = platform(1), platform(2)
    pb = b.events.alloc_unbound(1)
    pa = a.events.bind_interdomain(2, pb)
    assert a.events.pending(None) == pa  # the bind left it pending
    a.events.unmask(pa)
    b.events.notify(pb)
    assert a.events.pending(None) == pa


def test_domid_and_xenstore_path_come_from_the_environment(
    loopback: LoopbackRun, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    act_as(monkeypatch, loopback, 2)
    monkeypatch.setenv("XENPV_XEN_LIB_DIR", str(shim_dir()))
    monkeypatch.setenv("XENPV_LOOPBACK_DOMID", "2")
    monkeypatch.setenv("XENSTORED_PATH", "/somewhere/xs")
    p = open_platform("xen")
    try:
        assert isinstance(p, XenPlatform)
        assert p.domid == 2 and p.xenstore_path == "/somewhere/xs"
    finally:
        p.close()
    # without the emulator's variable, the domid is read as a guest reads it: xenstore
    monkeypatch.delenv("XENPV_LOOPBACK_DOMID")
    monkeypatch.setenv("XENSTORED_PATH", str(loopback.rundir / "dom2" / "xenstore"))
    p = open_platform("xen")
    try:
        assert p.domid == 2
    finally:
        p.close()
    monkeypatch.delenv("XENSTORED_PATH")
    monkeypatch.setenv("XENSTORED_RUNDIR", str(tmp_path))
    (tmp_path / "socket").touch()
    assert default_xenstore_path() == str(tmp_path / "socket")


def test_a_grant_copy_larger_than_one_request_is_split(
    platform: Callable[[int], XenPlatform],
) -> None:
    a, b = platform(1), platform(2)
    pages = b.grants.grant(1, 40)
    for i in range(40):
        pages.mem[i * PAGE : (i + 1) * PAGE] = bytes([i]) * PAGE
    out = bytearray(40 * PAGE)  # 160 KiB each way: more than one request may carry
    status = a.grants.copy(
        [GrantCopy(GrantPtr(2, ref, 0), LocalPtr(out, i * PAGE), PAGE) for i, ref in enumerate(pages.refs)]
    )
    assert status == [0] * 40
    assert all(out[i * PAGE : (i + 1) * PAGE] == bytes([i]) * PAGE for i in range(40))
    back = bytes(reversed(out))
    status = a.grants.copy(
        [GrantCopy(LocalPtr(back, i * PAGE), GrantPtr(2, ref, 0), PAGE) for i, ref in enumerate(pages.refs)]
    )
    assert status == [0] * 40 and bytes(pages.mem) == back
    b.grants.end_access(pages)


def test_on_debians_own_libraries_without_xen_the_platform_fails_cleanly() -> None:
    # Debian's libxengnttab opens /dev/xen/gntdev, which this host does not have: the
    # platform must report that as a PlatformError, not crash.
    code = (
        "import errno\n"
        "from xenpv import peers\n"
        "from xenpv.errors import PlatformError\n"
        "from xenpv.platforms.xen import XenPlatform\n"
        "try:\n"
        "    XenPlatform(0, lib_dir=peers.lib_dir())\n"
        "except PlatformError as exc:\n"
        "    print(str(exc).split(':')[0], errno.errorcode.get(exc.errno, exc.errno))\n"
    )
    env = peers.run_env()
    for key in ("XENPV_LOOPBACK_SOCKET", "XENPV_XEN_LIB_DIR"):
        env.pop(key, None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    # loaded fine (with Debian's own dependencies), then refused by the missing device
    assert out.stdout.split() in [["xengnttab_open", e] for e in ("ENOENT", "EACCES", "ENXIO")]

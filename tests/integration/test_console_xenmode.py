"""The console pair on the real-Xen platform mode of the emulator.

Theory of operation: a loopback daemon (``xenpv loopback up``) plays hypervisor and
xenstored.  The backend (dom0) runs in the test process on
:class:`~xenpv.platforms.xen.XenPlatform`, i.e. cffi on ``libxengnttab.so.1`` and
``libxenevtchn.so.1`` — here the emulator's replacement libraries.  The guest runs in its
own process, started in its domain's environment, with this file as its program
(``python test_console_xenmode.py guest …``): it opens its console on ``XenPlatform``
too, prints a greeting, answers every line typed on the console with ``echo <line>``,
and ends cleanly when its stdin closes.  The test types on the backend's pty and reads
the answers there, so bytes cross the ring both ways.

Console 0 has one part Xen's library API cannot express: its page sits at grant ref 0
(``GNTTAB_RESERVED_CONSOLE``), which Xen's domain builder writes; ``xengntshr_share_pages``
only hands out free refs.  The guest's console 0 therefore takes its page from the
emulator's domain-builder call (``grant_reserved``) and everything else — its event
channel, and the whole backend — from ``XenPlatform`` (``PrimaryConsole(...,
builder=...)``).  The secondary console (xenbus handshake) is ``XenPlatform`` end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_console_pair import wait_key

from xenpv.backends.console import ConsoleBackend, ConsoleConfig, publish_primary_console
from xenpv.cli.demo import Pty
from xenpv.errors import LocalError
from xenpv.frontends.console import GNTTAB_RESERVED_CONSOLE, ConsoleFrontend, PrimaryConsole
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.testing.vchan import VchanLab
from xenpv.testing.xenmode import xen_platform
from xenpv.xenbus.toolstack import add_device, remove_device
from xenpv.xenstore.client import connect

GUEST = 7
WAIT = 15.0
BULK = 256 * 1024


# --------------------------------------------------------------------------- the guest


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def bulk(n: int) -> bytes:
    """``n`` bytes of printable text without a newline."""
    return (bytes(range(33, 127)) * (n // 94 + 1))[:n]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"hello from the guest\n")
    while line := await reader.readline():
        if line.startswith(b"send "):
            left = int(line[5:])
            while left:
                n = min(left, 94 * 512)  # whole periods: the text runs on across chunks
                writer.write(bulk(n))
                await writer.drain()
                left -= n
            writer.write(b"<done>\n")
        else:
            writer.write(b"echo " + line)


async def _stdin_closed() -> None:
    await asyncio.to_thread(sys.stdin.buffer.read)


async def guest_main(rundir: str, domid: int, devid: int | None) -> int:
    """Open console 0 (or ``device/console/<devid>``) on ``XenPlatform``, echo lines,
    end when stdin closes (after the backend let go, for a secondary console)."""
    xen = xen_platform(rundir, domid)
    builder: ClientPlatform | None = None
    primary: PrimaryConsole | None = None
    driver: ConsoleFrontend | None = None
    xs: Any = None
    try:
        if devid is None:
            # the domain builder's part: the page at grant ref 0 (see the module docstring)
            builder = ClientPlatform.for_domain(rundir, domid)
            primary = PrimaryConsole(xen, 0, builder=builder.grants).setup()
            reader, writer = await primary.open()
            _emit(event="ready", port=primary.port, ring_ref=primary.ring_ref)
        else:
            xs = await connect(str(Path(rundir) / f"dom{domid}" / "xenstore"))
            path = f"/local/domain/{domid}/device/console/{devid}"
            driver = ConsoleFrontend(xen, xs, path)
            await driver.start()
            reader, writer = await driver.streams(WAIT)
            _emit(event="ready", path=path)
        echo = asyncio.create_task(_echo(reader, writer))
        await _stdin_closed()
        if driver is not None:
            await driver.wait_done(WAIT)  # the toolstack removed the device first
        echo.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await echo
        _emit(event="done")
    finally:
        if driver is not None:
            await driver.close()
        if xs is not None:
            await xs.close()
        if primary is not None:
            primary.close()
        if builder is not None:
            builder.close()
        xen.close()
    return 0


# --------------------------------------------------------------------------- the tests


@pytest.fixture
def lab() -> Iterator[VchanLab]:
    with VchanLab((GUEST,), max_grants=128, max_ports=64) as lab:
        yield lab


def start_guest(lab: VchanLab, devid: int | None = None) -> Any:
    """This file as the guest program, in ``GUEST``'s environment."""
    argv = [sys.executable, __file__, "guest", "--rundir", lab.rundir, "--domid", str(GUEST)]
    if devid is not None:
        argv += ["--devid", str(devid)]
    return lab.spawn(GUEST, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     bufsize=0)


async def converse(pty: Pty) -> None:
    """Guest to host (the greeting), host to guest and back (two typed lines, one longer
    than the 1 KiB input ring), then 256 KiB of guest output (many times the ring)."""
    assert await asyncio.to_thread(pty.read_until, b"\n", WAIT) == b"hello from the guest\n"
    for line in (b"ping\n", b"x" * 3000 + b"\n"):
        pty.write(line)
        assert await asyncio.to_thread(pty.read_until, b"\n", WAIT) == b"echo " + line
    pty.write(b"send %d\n" % BULK)
    got = await asyncio.to_thread(pty.read_until, b"<done>\n", WAIT)
    assert got == bulk(BULK) + b"<done>\n"


def end_guest(lab: VchanLab, guest: Any) -> None:
    """Close the guest's stdin; it reports done and exits 0."""
    guest.stdin.close()
    assert lab.read_json(guest, WAIT)["event"] == "done"
    assert guest.wait(WAIT) == 0


@contextlib.asynccontextmanager
async def dom0_backend(lab: VchanLab, config: ConsoleConfig, **kw: Any
                       ) -> AsyncIterator[Any]:
    """dom0's xenstore client, with a console backend on ``XenPlatform`` started."""
    dom0 = xen_platform(lab.rundir, 0)
    xs = await connect(str(Path(lab.rundir) / "dom0" / "xenstore"))
    backend = ConsoleBackend(dom0, xs, config, **kw)
    try:
        await backend.start()
        yield xs
    finally:
        await backend.close()
        await xs.close()
        dom0.close()


async def open_tty(xs: Any, path: str) -> Pty:
    """The pty the backend names in ``path``."""
    return Pty.open((await wait_key(xs, path, WAIT)).decode())


def test_primary_console_on_the_xen_platform(lab: VchanLab, tmp_path: Path) -> None:
    guest = start_guest(lab)
    ready = lab.read_json(guest, WAIT)
    assert ready["event"] == "ready" and ready["ring_ref"] == GNTTAB_RESERVED_CONSOLE

    async def body() -> None:
        config = ConsoleConfig(log_dir=str(tmp_path))
        async with dom0_backend(lab, config, domids=[GUEST], secondary=False) as xs:
            await publish_primary_console(xs, GUEST, port=ready["port"], ring_ref=0)
            tty = await open_tty(xs, f"/local/domain/{GUEST}/console/tty")
            with contextlib.closing(tty) as pty:
                await converse(pty)
            log = (tmp_path / f"guest-{GUEST}.log").read_bytes()
            assert log.startswith(b"hello from the guest\necho ping\n")
            assert log.endswith(bulk(BULK) + b"<done>\n")

    asyncio.run(asyncio.wait_for(body(), 60))
    end_guest(lab, guest)
    lab.assert_released()


def test_secondary_console_on_the_xen_platform(lab: VchanLab) -> None:
    async def body() -> None:
        async with dom0_backend(lab, ConsoleConfig(), secondary=True) as xs:
            info = await add_device(xs, "console", GUEST, 0, 1, frontend_keys={"type": "xenpv"})
            guest = start_guest(lab, 1)
            ready = await asyncio.to_thread(lab.read_json, guest, WAIT)
            assert ready == {"event": "ready", "path": info.frontend_path}
            with contextlib.closing(await open_tty(xs, f"{info.frontend_path}/tty")) as pty:
                await converse(pty)
            assert await remove_device(xs, "console", GUEST, 1, 0, timeout=WAIT)
            await asyncio.to_thread(end_guest, lab, guest)

    asyncio.run(asyncio.wait_for(body(), 60))
    lab.assert_released()


def test_guest_killed_mid_output_lets_the_backend_release_everything(lab: VchanLab) -> None:
    """The guest process dies while it floods its secondary console: the toolstack's
    removal still completes and the backend lets go of the page and the port."""
    async def body() -> None:
        async with dom0_backend(lab, ConsoleConfig(), secondary=True) as xs:
            info = await add_device(xs, "console", GUEST, 0, 2, frontend_keys={"type": "xenpv"})
            guest = start_guest(lab, 2)
            assert (await asyncio.to_thread(lab.read_json, guest, WAIT))["event"] == "ready"
            with contextlib.closing(await open_tty(xs, f"{info.frontend_path}/tty")) as pty:
                await asyncio.to_thread(pty.read_until, b"hello from the guest\n", WAIT)
                pty.write(b"send %d\n" % (1 << 40))
                await asyncio.to_thread(pty.read_until, bulk(4096), WAIT)
                guest.kill()
                await asyncio.to_thread(guest.wait, WAIT)
            # the dead frontend never answers Closing: the toolstack forces the removal
            assert not await remove_device(xs, "console", GUEST, 2, 0, timeout=1.0)
            # before the backend itself closes (its watches stay): the removal alone made
            # it let go of the page and the port
            deadline = time.monotonic() + WAIT
            while held := {k: v for k, v in lab.outstanding().items() if v and k != "watches"}:
                assert time.monotonic() < deadline, f"still held after the removal: {held}"
                await asyncio.sleep(0.05)

    asyncio.run(asyncio.wait_for(body(), 60))
    lab.assert_released()


def test_primary_console_without_a_builder_is_refused(lab: VchanLab) -> None:
    """Xen's library API cannot place the page at grant ref 0: a clear ``LocalError``,
    nothing left allocated."""
    guest = xen_platform(lab.rundir, GUEST)
    try:
        with pytest.raises(LocalError, match="reserved console ref"):
            PrimaryConsole(guest, 0).setup()
    finally:
        guest.close()
    lab.assert_released()


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="the guest side of the xen-mode console tests")
    cli.add_argument("role", choices=["guest"])
    cli.add_argument("--rundir", required=True)
    cli.add_argument("--domid", type=int, required=True)
    cli.add_argument("--devid", type=int)
    opts = cli.parse_args()
    sys.exit(asyncio.run(guest_main(opts.rundir, opts.domid, opts.devid)))

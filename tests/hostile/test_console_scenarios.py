"""Hostile-inputs scenario 27: a hostile guest console against our console backend.

The guest here is hand-made: it shares a page at grant ref 0 and allocates a port like a
real guest, then writes whatever it likes into the page and the event channel.  The
backend must ignore corrupt indexes, keep its buffers and its log bounded, never take a
host decision from the guest's xenstore nodes, and rate-limit event storms; nothing may
escape into the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from xenpv.backends.console import (
    ConsoleConfig,
    PrimaryConsoleServer,
    console_path,
    publish_primary_console,
    serve_console,
)
from xenpv.drivers import ConsoleRing
from xenpv.frontends.console import GNTTAB_RESERVED_CONSOLE
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.platforms.loopback.harness import DaemonMachine, InProcessMachine
from xenpv.protocols.console import XENCONS_OUT_CONS_OFFSET, XENCONS_OUT_PROD_OFFSET
from xenpv.xenstore.client import Perm, connect
from xenpv.xenstore.wire import XenstoreError

GUEST = 9
WAIT = 10.0


class HostileGuest:
    """A guest that shares the console page and port and then misbehaves at will."""

    def __init__(self, platform: Any, backend_domid: int = 0) -> None:
        self.platform = platform
        self.pages = platform.grants.grant_reserved(GNTTAB_RESERVED_CONSOLE, backend_domid)
        self.port = platform.events.alloc_unbound(backend_domid)
        self.mem = self.pages.mem
        self.ring = ConsoleRing(self.mem, backend=False)

    def set_out(self, cons: int, prod: int) -> None:
        words = self.mem.cast("I")
        words[XENCONS_OUT_CONS_OFFSET // 4] = cons & 0xFFFFFFFF
        words[XENCONS_OUT_PROD_OFFSET // 4] = prod & 0xFFFFFFFF
        words.release()

    def out_cons(self) -> int:
        return int(struct.unpack_from("<I", self.mem, XENCONS_OUT_CONS_OFFSET)[0])

    def notify(self) -> None:
        self.platform.events.notify(self.port)

    def close(self) -> None:
        self.ring.release()
        with contextlib.suppress(Exception):
            self.platform.events.unbind(self.port)
        with contextlib.suppress(Exception):
            self.platform.grants.end_access(self.pages)


class Served:
    """Our backend's session over the hostile guest's page (in process; it starts at once)."""

    def __init__(self, machine: InProcessMachine, config: ConsoleConfig) -> None:
        self.guest = HostileGuest(machine.domain(GUEST))
        self.out = bytearray()
        self.session = serve_console(machine.domain(0), GUEST, GNTTAB_RESERVED_CONSOLE,
                                     self.guest.port, config, "hostile", self.out.extend)

    def close(self) -> None:
        self.session.close()
        self.guest.close()


def run_checked(coro_fn: Any) -> Any:
    """Run a coroutine; fail if anything reached the loop's exception handler."""
    errors: list[dict[str, Any]] = []

    async def main() -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: errors.append(ctx))
        return await coro_fn()

    result = asyncio.run(main())
    assert not errors, errors
    return result


async def settle(cond: Any, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("excess", [1, 2**31, 2**32 - 1 - 2048])
def test_scenario_27_out_prod_beyond_ring_is_ignored(inprocess_machine: InProcessMachine,
                                                      excess: int) -> None:
    async def body() -> None:
        s = Served(inprocess_machine, ConsoleConfig(pty=False))
        try:
            s.guest.set_out(1000, 1000 + 2048 + excess)  # prod - cons > sizeof(out)
            for _ in range(5):
                s.guest.notify()
                await asyncio.sleep(0.02)
            await settle(lambda: s.session.stats["insane"] > 0)
            assert s.out == b""
            assert s.guest.out_cons() == 1000  # the backend did not move anything
            # the guest repairs its ring: the console works again (ignored, not failed)
            s.guest.set_out(1000, 1000)
            assert s.guest.ring.write(b"sane again\n") == 11
            s.guest.notify()
            await settle(lambda: bytes(s.out) == b"sane again\n")
        finally:
            s.close()

    run_checked(body)
    inprocess_machine.release()
    inprocess_machine.assert_released()


@pytest.mark.parametrize("policy", ["discard", "block"])
def test_scenario_27_output_flood_keeps_buffer_and_log_bounded(
        inprocess_machine: InProcessMachine, tmp_path: Path, policy: str) -> None:
    limit, log_max, total = 8192, 16384, 2 << 20
    cfg = ConsoleConfig(limit=limit, policy=policy, log_dir=str(tmp_path), log_max=log_max,
                        rate_allowance=1 << 20)  # the bound under test is memory, not events

    async def body() -> int:
        s = Served(inprocess_machine, cfg)
        # the session's pty is read by nobody: it fills, then the buffer takes the rest
        sent = 0
        try:
            chunk = b"flood " * 300
            deadline = time.monotonic() + 30
            while sent < total and time.monotonic() < deadline:
                n = s.guest.ring.write(chunk)
                if n:
                    sent += n
                    s.guest.notify()
                await asyncio.sleep(0)  # let the backend run
                if policy == "block" and not n and s.session.stats["max_buffered"] >= limit:
                    break  # the guest is held back, as it should be
            stats = dict(s.session.stats)
            assert stats["max_buffered"] <= limit
            assert len(s.session.buffer) <= limit
            logs = list(tmp_path.iterdir())
            assert sum(p.stat().st_size for p in logs) <= 2 * log_max
            if policy == "discard":
                assert sent >= total  # the guest never stalls
                assert stats["discarded"] > 0
            else:
                assert stats["discarded"] == 0
                assert sent < total  # the backend stopped consuming
        finally:
            s.close()
        return sent

    run_checked(body)
    inprocess_machine.release()
    inprocess_machine.assert_released()


def test_scenario_27_event_storm_is_rate_limited(inprocess_machine: InProcessMachine) -> None:
    allowance, period = 30, 0.2

    async def body() -> None:
        s = Served(inprocess_machine, ConsoleConfig(pty=False, rate_allowance=allowance,
                                                    rate_period=period))
        try:
            t0 = time.monotonic()
            sent = 0
            while time.monotonic() - t0 < 0.6:
                for _ in range(200):
                    s.guest.notify()  # no data at all: a pure storm
                sent += 200
                await asyncio.sleep(0)
            elapsed = time.monotonic() - t0
            stats = s.session.stats
            assert stats["rate_limited"] > 0
            assert s.session.limiter.limited_periods >= 1
            # each period admits `allowance` events, then one more delivery is taken and
            # the port stays masked: the work done is bounded by the budget, not the storm
            periods = elapsed / period + 2
            assert stats["events"] <= (allowance + 1) * periods
            assert stats["events"] < sent
            # the console still works after the storm
            assert s.guest.ring.write(b"still here\n") == 11
            s.guest.notify()
            await settle(lambda: bytes(s.out).endswith(b"still here\n"))
        finally:
            s.close()

    run_checked(body)
    inprocess_machine.release()
    inprocess_machine.assert_released()


@pytest.fixture
def daemon(daemon_machine: Callable[..., DaemonMachine]) -> DaemonMachine:
    """A loopback daemon with the hostile guest's domain."""
    return daemon_machine(GUEST, max_grants=64, max_ports=32)


@contextlib.asynccontextmanager
async def console_on_daemon(daemon: DaemonMachine, cfg: ConsoleConfig, *,
                            writable_nodes: bool = False) -> AsyncIterator[dict[str, Any]]:
    """A hostile guest's console 0 published by the toolstack and served by our
    :class:`PrimaryConsoleServer`; ``writable_nodes`` mimics a careless toolstack that
    leaves the guest write access to its console nodes."""
    guest = ClientPlatform.for_domain(daemon.rundir, GUEST)
    dom0 = ClientPlatform.for_domain(daemon.rundir, 0)
    xs0 = await connect(str(Path(daemon.rundir) / "dom0" / "xenstore"))
    xsg = await connect(str(Path(daemon.rundir) / f"dom{GUEST}" / "xenstore"))
    hostile = HostileGuest(guest)
    out = bytearray()
    server = PrimaryConsoleServer(dom0, xs0, GUEST, cfg, sink=out.extend)
    path = console_path(GUEST)
    try:
        await publish_primary_console(xs0, GUEST, port=hostile.port, ring_ref=0)
        if writable_nodes:
            for node in (path, *(f"{path}/{k}" for k in ("tty", "output", "limit", "type"))):
                await xs0.set_perms(node, [Perm("n", 0), Perm("b", GUEST)])
        await server.start()
        session = await server.wait_ready(WAIT)
        yield {"path": path, "xs0": xs0, "xsg": xsg, "server": server, "session": session,
               "guest": hostile, "out": out}
    finally:
        await server.close()
        hostile.close()
        await xsg.close()
        await xs0.close()
        dom0.close()
        guest.close()


GUEST_WRITES = (("tty", b"/dev/null"), ("output", b"file:/etc/passwd"),
                ("limit", b"999999999"), ("type", b"ioemu"))


def test_scenario_27_guest_cannot_rewrite_its_console_nodes(daemon: DaemonMachine) -> None:
    async def body() -> None:
        async with console_on_daemon(daemon, ConsoleConfig(limit=4096)) as c:
            path, xs0, xsg = c["path"], c["xs0"], c["xsg"]
            tty_before = await xs0.read(f"{path}/tty")
            assert tty_before
            for key, value in GUEST_WRITES:
                with pytest.raises(XenstoreError) as exc:
                    await xsg.write(f"{path}/{key}", value)
                assert exc.value.errno_name == "EACCES"
            with pytest.raises(XenstoreError):
                await xsg.rm(f"{path}/tty")
            assert await xs0.read(f"{path}/tty") == tty_before
            assert c["server"].session is c["session"]

    run_checked(body)
    daemon.assert_released()


def test_scenario_27_guest_written_nodes_never_drive_host_decisions(
        daemon: DaemonMachine) -> None:
    """Even with a careless toolstack that left the nodes writable by the guest."""
    cfg = ConsoleConfig(limit=4096, rate_allowance=1 << 20)

    async def body() -> None:
        async with console_on_daemon(daemon, cfg, writable_nodes=True) as c:
            session, hostile, out = c["session"], c["guest"], c["out"]
            for key, value in GUEST_WRITES:
                await c["xsg"].write(f"{c['path']}/{key}", value)
            await asyncio.sleep(0.2)  # the watch fired; the server re-read what it reads
            assert c["server"].session is session  # still served, same pty, same page
            assert session.config.limit == 4096
            assert session.tty_path is not None and session.tty_path != "/dev/null"
            # a flood is still bounded by the backend's own limit, not the guest's
            sent = 0
            while sent < 64 << 10:
                sent += hostile.ring.write(b"x" * 2048)
                hostile.notify()
                await asyncio.sleep(0)
            await settle(lambda: len(out) == sent)
            assert len(session.buffer) <= 4096

    run_checked(body)
    daemon.assert_released()


def test_scenario_16_backend_event_storm_on_the_console_frontend(
        inprocess_machine: InProcessMachine) -> None:
    """The guest side has the same budget: a backend flooding its port is rate-limited."""
    from xenpv.drivers import EventRateLimiter
    from xenpv.frontends.console import PrimaryConsole

    allowance, period = 30, 0.2

    async def body() -> None:
        console = PrimaryConsole(inprocess_machine.domain(GUEST), 0).setup()
        dom0 = inprocess_machine.domain(0)
        port = dom0.events.bind_interdomain(GUEST, console.port)
        mapping = dom0.grants.map(GUEST, [GNTTAB_RESERVED_CONSOLE])
        backend_ring = ConsoleRing(mapping.mem, backend=True)
        try:
            reader, _writer = await console.open(limiter=EventRateLimiter(allowance, period))
            transport = console.transport
            assert transport is not None
            t0 = time.monotonic()
            storm = 0
            while time.monotonic() - t0 < 0.6:
                for _ in range(200):
                    dom0.events.notify(port)  # hostile backend: events, no data
                storm += 200
                await asyncio.sleep(0)
            periods = (time.monotonic() - t0) / period + 2
            stats = transport.stats
            assert stats["rate_limited"] > 0
            assert stats["events"] <= (allowance + 1) * periods < storm
            assert stats["spurious"] >= stats["events"] - 2
            # the guest side is still responsive afterwards
            assert backend_ring.write(b"after the storm\n") == 16
            dom0.events.notify(port)
            assert await asyncio.wait_for(reader.readline(), WAIT) == b"after the storm\n"
        finally:
            backend_ring.release()
            dom0.grants.unmap(mapping)
            dom0.events.unbind(port)
            console.close()

    run_checked(body)
    inprocess_machine.release()
    inprocess_machine.assert_released()


def test_scenario_29_guest_dies_mid_output_then_its_domain_goes(daemon: DaemonMachine) -> None:
    """The guest process is killed while it floods its console; the backend keeps
    serving what is left, then lets go of everything when the domain is destroyed."""
    import json
    import subprocess
    import sys

    async def body() -> None:
        dom0 = ClientPlatform.for_domain(daemon.rundir, 0)
        xs0 = await connect(str(Path(daemon.rundir) / "dom0" / "xenstore"))
        out = bytearray()
        server = PrimaryConsoleServer(dom0, xs0, GUEST, ConsoleConfig(limit=4096),
                                      sink=out.extend)
        guest = subprocess.Popen(
            [sys.executable, "-m", "xenpv", "console", "frontend", "--rundir", daemon.rundir,
             "--domid", str(GUEST), "--send", str(64 << 20)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert guest.stdout is not None
            ready = json.loads(await asyncio.to_thread(guest.stdout.readline))
            await publish_primary_console(xs0, GUEST, port=ready["port"], ring_ref=0)
            await server.start()
            session = await server.wait_ready(WAIT)
            await settle(lambda: len(out) > 100_000)
            guest.kill()  # mid-stream
            guest.wait(WAIT)
            await asyncio.sleep(0.1)
            assert server.session is session and not session.closed
            daemon.destroy_domain(GUEST)  # its home (and console directory) goes
            await settle(lambda: server.session is None)
            assert session.closed
        finally:
            if guest.poll() is None:
                guest.kill()
                guest.wait(WAIT)
            for f in (guest.stdin, guest.stdout):
                if f is not None:
                    f.close()
            await server.close()
            await xs0.close()
            dom0.close()

    run_checked(body)
    daemon.assert_released()

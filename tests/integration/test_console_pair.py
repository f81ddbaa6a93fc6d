"""The console pair end to end: our frontend with our backend, on the loopback emulator.

In process (no xenstore) the ring, events and session are exercised directly; on the
loopback daemon the whole path runs: toolstack keys, primary console at grant ref 0,
secondary consoles through the xenbus handshake, the pty, the log file, and the
emulator's accounting afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from xenpv.backends.console import (
    ConsoleBackend,
    ConsoleConfig,
    publish_primary_console,
    serve_console,
)
from xenpv.cli.demo import Pty
from xenpv.drivers import EventRateLimiter
from xenpv.frontends.console import (
    GNTTAB_RESERVED_CONSOLE,
    ConsoleFrontend,
    PrimaryConsole,
)
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.platforms.loopback.harness import DaemonMachine, InProcessMachine
from xenpv.xenbus.toolstack import add_device, remove_device
from xenpv.xenstore.client import connect

GUEST = 7
WAIT = 10.0


@pytest.fixture
def machine(daemon_machine: Callable[..., DaemonMachine]) -> DaemonMachine:
    """A loopback daemon with the guest's domain."""
    return daemon_machine(GUEST, max_grants=64, max_ports=32)


async def wait_key(client: Any, path: str, timeout: float = WAIT) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            value: bytes = await client.read(path)
            if value:
                return value
        assert time.monotonic() < deadline, f"{path} never got a value"
        await asyncio.sleep(0.02)


def test_primary_console_moves_bytes_both_ways_in_process() -> None:
    m = InProcessMachine()
    try:
        guest, dom0 = m.domain(GUEST), m.domain(0)

        async def body() -> None:
            console = PrimaryConsole(guest, 0).setup()
            assert console.ring_ref == GNTTAB_RESERVED_CONSOLE
            out: list[bytes] = []
            session = serve_console(dom0, GUEST, GNTTAB_RESERVED_CONSOLE, console.port,
                                    ConsoleConfig(pty=False), "test", out.append)
            reader, writer = await console.open()
            writer.write(b"guest says hi\n")
            session.feed(b"host types\n")
            assert await asyncio.wait_for(reader.readline(), WAIT) == b"host types\n"
            deadline = time.monotonic() + WAIT
            while b"".join(out) != b"guest says hi\n":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            session.close()
            console.close()

        asyncio.run(body())
        m.release()
        m.assert_released()
    finally:
        m.close()


def test_a_megabyte_of_output_arrives_intact_and_in_order() -> None:
    m = InProcessMachine()
    try:
        guest, dom0 = m.domain(GUEST), m.domain(0)
        data = os.urandom(1 << 20)

        async def body() -> bytes:
            console = PrimaryConsole(guest, 0).setup()
            got = bytearray()
            session = serve_console(dom0, GUEST, GNTTAB_RESERVED_CONSOLE, console.port,
                                    ConsoleConfig(pty=False, rate_allowance=1 << 20), "test",
                                    got.extend)
            _reader, writer = await console.open(limiter=EventRateLimiter(1 << 20, 1.0))
            for i in range(0, len(data), 10_000):
                writer.write(data[i : i + 10_000])
                await writer.drain()
            deadline = time.monotonic() + 30
            while len(got) < len(data):
                assert time.monotonic() < deadline, f"only {len(got)} bytes arrived"
                await asyncio.sleep(0.01)
            session.close()
            console.close()
            return bytes(got)

        assert asyncio.run(body()) == data
    finally:
        m.close()


def test_primary_console_served_on_a_pty_with_a_log(machine: DaemonMachine,
                                                     tmp_path: Path) -> None:
    async def body() -> None:
        guest = ClientPlatform.for_domain(machine.rundir, GUEST)
        dom0 = ClientPlatform.for_domain(machine.rundir, 0)
        xs = await connect(str(Path(machine.rundir) / "dom0" / "xenstore"))
        console = PrimaryConsole(guest, 0).setup()
        backend = ConsoleBackend(dom0, xs, ConsoleConfig(log_dir=str(tmp_path)),
                                 domids=[GUEST], secondary=False)
        pty: Pty | None = None
        try:
            await publish_primary_console(xs, GUEST, port=console.port, ring_ref=0)
            await backend.start()
            tty_path = (await wait_key(xs, f"/local/domain/{GUEST}/console/tty")).decode()
            pty = Pty.open(tty_path)
            reader, writer = await console.open()
            writer.write(b"login: ")
            await asyncio.to_thread(pty.read_until, b"login: ", WAIT)
            pty.write(b"root\n")
            assert await asyncio.wait_for(reader.readline(), WAIT) == b"root\n"
            log = (tmp_path / f"guest-{GUEST}.log").read_bytes()
            assert log == b"login: "
        finally:
            if pty is not None:
                pty.close()
            await backend.close()
            console.close()
            await xs.close()
            dom0.close()
            guest.close()

    asyncio.run(body())
    machine.assert_released()


def test_secondary_console_connects_through_xenbus(machine: DaemonMachine) -> None:
    async def body() -> None:
        guest = ClientPlatform.for_domain(machine.rundir, GUEST)
        dom0 = ClientPlatform.for_domain(machine.rundir, 0)
        xs0 = await connect(str(Path(machine.rundir) / "dom0" / "xenstore"))
        xsg = await connect(str(Path(machine.rundir) / f"dom{GUEST}" / "xenstore"))
        backend = ConsoleBackend(dom0, xs0, ConsoleConfig(), secondary=True)
        info = await add_device(xs0, "console", GUEST, 0, 1, frontend_keys={"type": "xenpv"})
        frontend = ConsoleFrontend(guest, xsg, info.frontend_path)
        pty: Pty | None = None
        try:
            await backend.start()
            await frontend.start()
            reader, writer = await frontend.streams(WAIT)
            tty_path = (await wait_key(xs0, f"{info.frontend_path}/tty")).decode()
            pty = Pty.open(tty_path)
            writer.write(b"second console\n")
            await asyncio.to_thread(pty.read_until, b"second console\n", WAIT)
            pty.write(b"typed\n")
            assert await asyncio.wait_for(reader.readline(), WAIT) == b"typed\n"
            assert await remove_device(xs0, "console", GUEST, 1, 0, timeout=WAIT)
            await frontend.wait_done(WAIT)
        finally:
            if pty is not None:
                pty.close()
            await frontend.close()
            await backend.close()
            await xsg.close()
            await xs0.close()
            dom0.close()
            guest.close()

    asyncio.run(body())
    machine.assert_released()


def test_backend_follows_domains_as_they_come_and_go(machine: DaemonMachine) -> None:
    late = GUEST + 1

    async def body() -> None:
        dom0 = ClientPlatform.for_domain(machine.rundir, 0)
        xs = await connect(str(Path(machine.rundir) / "dom0" / "xenstore"))
        backend = ConsoleBackend(dom0, xs, ConsoleConfig(), all_domains=True, secondary=False)
        guest = None
        console = None
        pty: Pty | None = None
        try:
            await backend.start()
            machine.create_domain(late)  # @introduceDomain: the backend notices
            guest = ClientPlatform.for_domain(machine.rundir, late)
            console = PrimaryConsole(guest, 0).setup()
            await publish_primary_console(xs, late, port=console.port, ring_ref=0)
            pty = Pty.open((await wait_key(xs, f"/local/domain/{late}/console/tty")).decode())
            _reader, writer = await console.open()
            writer.write(b"late guest\n")
            await asyncio.to_thread(pty.read_until, b"late guest\n", WAIT)
            assert set(backend.primaries) >= {GUEST, late}
            pty.close()
            pty = None
            console.close()
            console = None
            guest.close()
            guest = None
            machine.destroy_domain(late)  # @releaseDomain: its server goes
            deadline = time.monotonic() + WAIT
            while late in backend.primaries:
                assert time.monotonic() < deadline, "the backend kept a destroyed domain"
                await asyncio.sleep(0.02)
        finally:
            if pty is not None:
                pty.close()
            if console is not None:
                console.close()
            if guest is not None:
                guest.close()
            await backend.close()
            await xs.close()
            dom0.close()

    asyncio.run(body())
    machine.assert_released()

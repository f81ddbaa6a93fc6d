"""A console pair and a vchan pair on the same event-channel handles, in one asyncio loop.

Each emulated domain has one platform, hence one event-channel handle: the guest (dom2)
runs its primary console frontend and a vchan client on it, dom1 runs the console backend
and the vchan server on its own.  All four share the handles' per-handle port dispatcher,
and bytes move both ways through both pairs at the same time.  Also covered: the
dispatcher's rules (unmask before or after the callback, firings nobody watched, the
reader going with the last port, one loop per handle) and the asyncio transport API the
console and vchan streams share.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from xenpv.backends.console import ConsoleConfig, ConsoleSession, serve_console
from xenpv.errors import LocalError
from xenpv.frontends.console import GNTTAB_RESERVED_CONSOLE, PrimaryConsole
from xenpv.platforms.dispatch import PortDispatcher
from xenpv.testing.vchan import InProcessVchanLab, VchanLab, vchan_path
from xenpv.vchan import VchanStreamServer, open_connection, start_server

SERVER, GUEST = 1, 2
WAIT = 20.0
LABS: dict[str, Any] = {"inprocess": InProcessVchanLab, "crossprocess": VchanLab}


@pytest.fixture(scope="module", params=sorted(LABS))
def lab(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The loopback emulator in this process, or the daemon (both domains here)."""
    with LABS[request.param]((SERVER, GUEST)) as lab:
        yield lab


@pytest.fixture
def pfs(lab: Any) -> Iterator[tuple[Any, Any]]:
    """One platform (one event-channel handle) per domain: (dom1, dom2)."""
    s, g = lab.platform(SERVER), lab.platform(GUEST)
    try:
        yield s, g
        lab.assert_released()
    finally:
        s.close()
        g.close()


def run(coro: Any, timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def settle(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def echo_upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data.upper())
        await writer.drain()
    writer.close()


@dataclass
class Pairs:
    """A console pair and a vchan pair between dom1 and the guest, with their streams."""

    console: PrimaryConsole
    session: ConsoleSession
    server: VchanStreamServer
    received: list[bytes]  # what the console backend got from the guest
    creader: asyncio.StreamReader
    cwriter: asyncio.StreamWriter
    vreader: asyncio.StreamReader
    vwriter: asyncio.StreamWriter


@contextlib.asynccontextmanager
async def console_and_vchan(spf: Any, gpf: Any, name: str,
                            config: ConsoleConfig) -> AsyncIterator[Pairs]:
    """Primary console of the guest served by dom1, and a vchan (dom1 serves an upper-case
    echo, the guest connects); everything is closed and reaped afterwards."""
    console = PrimaryConsole(gpf, SERVER).setup()
    received: list[bytes] = []
    session = serve_console(spf, GUEST, GNTTAB_RESERVED_CONSOLE, console.port, config,
                            name, received.append)
    server = None
    try:
        server = await start_server(spf, GUEST, vchan_path(SERVER, GUEST, name), echo_upper)
        creader, cwriter = await console.open()
        vreader, vwriter = await open_connection(gpf, SERVER, vchan_path(SERVER, GUEST, name))
        yield Pairs(console, session, server, received, creader, cwriter, vreader, vwriter)
    finally:
        if server is not None:
            server.close()
            await server.wait_closed()
        session.close()  # the backend unmaps first: the guest can then end its grant
        console.close()
    assert await server.quarantine.drain(5.0)


def test_console_and_vchan_share_one_handle_per_domain(pfs: tuple[Any, Any]) -> None:
    spf, gpf = pfs
    console_out = os.urandom(24_000).hex().encode()[:40_000]  # guest -> backend
    console_in = os.urandom(6_000).hex().encode()  # backend -> guest (12 000 bytes)
    vchan_payload = os.urandom(1 << 20).hex().encode().lower()  # 2 MiB, echoed upper

    async def main() -> None:
        async with console_and_vchan(spf, gpf, "shared", ConsoleConfig(pty=False)) as p:
            console, session, server, received = p.console, p.session, p.server, p.received
            creader, cwriter, vreader, vwriter = p.creader, p.cwriter, p.vreader, p.vwriter
            client_ep = vwriter.get_extra_info("vchan")
            server_ep = server.endpoint
            assert server_ep is not None
            # one handle per domain, one dispatcher per handle, serving all four
            assert client_ep.events is gpf.events and session.events is spf.events
            assert server_ep.events is spf.events
            hub_g, hub_s = client_ep.hub, server_ep.hub
            assert hub_g is not hub_s
            assert {console.port, client_ep.port} <= set(hub_g.callbacks)
            assert {session.port, server_ep.port} <= set(hub_s.callbacks)

            async def console_guest_to_backend() -> None:
                for i in range(0, len(console_out), 1000):
                    cwriter.write(console_out[i:i + 1000])
                    await cwriter.drain()
                await settle(lambda: sum(map(len, received)) >= len(console_out),
                             "console output at the backend")
                assert b"".join(received) == console_out

            async def console_backend_to_guest() -> None:
                pos = 0
                while pos < len(console_in):
                    pos += session.feed(console_in[pos:pos + 4096])
                    await asyncio.sleep(0)
                got = await asyncio.wait_for(creader.readexactly(len(console_in)), WAIT)
                assert got == console_in

            async def vchan_both_ways() -> None:
                async def send() -> None:
                    for i in range(0, len(vchan_payload), 65536):
                        vwriter.write(vchan_payload[i:i + 65536])
                        await vwriter.drain()

                sender = asyncio.create_task(send())
                got = await asyncio.wait_for(vreader.readexactly(len(vchan_payload)), WAIT)
                await sender
                assert hashlib.sha256(got).digest() == \
                    hashlib.sha256(vchan_payload.upper()).digest()

            await asyncio.gather(console_guest_to_backend(), console_backend_to_guest(),
                                 vchan_both_ways())
            assert console.transport is not None and console.transport.stats["received"] \
                == len(console_in)

            # the vchan goes first: the consoles keep working on the same handles
            vwriter.close()
            await vwriter.wait_closed()
            server.close()
            await server.wait_closed()
            assert client_ep.port not in hub_g.callbacks
            cwriter.write(b"after the vchan\n")
            session.feed(b"still here\n")
            assert await asyncio.wait_for(creader.readline(), WAIT) == b"still here\n"
            await settle(lambda: b"".join(received).endswith(b"after the vchan\n"),
                         "console output after the vchan closed")
        # the last port gone, each handle's dispatcher has let go of its reader
        assert not hub_g.callbacks and not hub_s.callbacks
        assert hub_g.loop is None and hub_s.loop is None

    run(main())


def test_dispatcher_rules_on_one_handle(pfs: tuple[Any, Any]) -> None:
    """unmask=True: the port is unmasked before the callback (it fires again at once);
    unmask=False: it stays masked until the callback's owner unmasks it; a firing nobody
    watched is remembered and handed to the next watcher; the last port removes the
    reader; a second loop on the same handle is refused."""
    spf, gpf = pfs
    ev_s, ev_g = spf.events, gpf.events
    p_eager = ev_s.alloc_unbound(GUEST)
    p_late = ev_s.alloc_unbound(GUEST)
    r_eager = ev_g.bind_interdomain(SERVER, p_eager)
    r_late = ev_g.bind_interdomain(SERVER, p_late)

    async def main() -> None:
        hub = PortDispatcher.attach(ev_s)
        try:
            assert PortDispatcher.attach(ev_s) is hub  # one per handle
            hub.detach()
            eager: list[float] = []
            late: list[float] = []
            hub.watch(p_eager, lambda: eager.append(time.monotonic()))
            hub.watch(p_late, lambda: late.append(time.monotonic()), unmask=False)
            ev_g.notify(r_eager)
            ev_g.notify(r_late)
            await settle(lambda: bool(eager and late), "both ports")
            ev_g.notify(r_eager)
            ev_g.notify(r_late)  # masked: coalesces until unmasked
            await settle(lambda: len(eager) >= 2, "the unmasked port again")
            await asyncio.sleep(0.05)
            assert len(late) == 1
            ev_s.unmask(p_late)  # the owner's late EOI: the held firing arrives
            await settle(lambda: len(late) == 2, "the late-unmasked port")

            # a firing while unwatched is remembered (port unmasked) and replayed
            hub.unwatch(p_eager)
            ev_g.notify(r_eager)
            await settle(lambda: p_eager in hub.fired, "the unwatched firing")
            replayed: list[int] = []
            hub.watch(p_eager, lambda: replayed.append(1))
            await settle(lambda: bool(replayed), "the replayed firing")
            assert p_eager not in hub.fired

            # another loop (in another thread) may not watch this handle's ports
            def other_loop() -> None:
                async def watch() -> None:
                    hub.watch(p_late, lambda: None)

                asyncio.run(watch())

            with pytest.raises(LocalError):
                await asyncio.get_running_loop().run_in_executor(None, other_loop)

            fd = ev_s.fileno()
            hub.unwatch(p_eager)
            assert hub.loop is not None
            hub.unwatch(p_late)
            assert hub.loop is None
            assert not asyncio.get_running_loop().remove_reader(fd)  # already gone
        finally:
            hub.unwatch(p_late)
            hub.detach(p_eager)

    try:
        run(main())
    finally:
        for ev, port in ((ev_g, r_eager), (ev_g, r_late), (ev_s, p_eager), (ev_s, p_late)):
            ev.unbind(port)


def test_stream_transports_share_the_transport_api(pfs: tuple[Any, Any]) -> None:
    """Pause/resume reading, write buffering with water marks, close after the buffered
    bytes went, abort, and the protocol accessors behave alike on console and vchan."""
    spf, gpf = pfs
    config = ConsoleConfig(pty=False, rate_allowance=1 << 20)

    async def main() -> None:
        async with console_and_vchan(spf, gpf, "api", config) as p:
            received, creader, cwriter = p.received, p.creader, p.cwriter
            vreader, vwriter = p.vreader, p.vwriter
            big_sizes: list[int] = []
            for writer, reader, feed in (
                (cwriter, creader, p.session.feed),
                (vwriter, vreader, vwriter.write),
            ):
                t: Any = writer.transport
                low, high = t.get_write_buffer_limits()
                assert 0 < low < high
                assert not t.can_write_eof() and not t.is_closing()
                for kind in (LocalError, NotImplementedError):  # no half-close: misuse
                    with pytest.raises(kind):
                        t.write_eof()
                assert t.get_protocol() is writer._protocol  # type: ignore[attr-defined]
                t.pause_reading()
                assert not t.is_reading()
                feed(b"paused\n")
                await asyncio.sleep(0.05)
                assert not reader._buffer  # type: ignore[attr-defined]
                t.resume_reading()
                assert t.is_reading()
                line = await asyncio.wait_for(reader.readline(), WAIT)
                assert line.lower() == b"paused\n"
                # more than the ring holds: the rest waits in the transport's buffer
                big = b"x" * (high + 1)
                big_sizes.append(len(big))
                writer.write(big)
                assert t.get_write_buffer_size() > 0
                await asyncio.wait_for(writer.drain(), WAIT)
            await settle(lambda: sum(map(len, received)) >= big_sizes[0], "console bytes")
            assert b"".join(received) == b"x" * big_sizes[0]
            got = await asyncio.wait_for(vreader.readexactly(big_sizes[1]), WAIT)
            assert got == b"X" * big_sizes[1]

            # close waits for the buffered bytes; abort drops them at once
            cwriter.write(b"y" * 5000)
            cwriter.close()
            assert cwriter.transport.is_closing()
            await settle(lambda: sum(map(len, received)) >= big_sizes[0] + 5000,
                         "flush on close")
            assert b"".join(received).endswith(b"x" + b"y" * 5000)
            await asyncio.wait_for(cwriter.wait_closed(), WAIT)
            with pytest.raises(LocalError):
                cwriter.write(b"too late")  # a console refuses writes after close
            vwriter.transport.abort()
            assert vwriter.transport.is_closing()
            await asyncio.wait_for(vwriter.wait_closed(), WAIT)
            vwriter.write(b"too late")  # vchan ignores them, as socket transports do
            assert vwriter.transport.get_write_buffer_size() == 0

    run(main())

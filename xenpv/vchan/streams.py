"""asyncio streams over vchan, in the style of ``asyncio.open_connection``/``start_server``.

Theory of operation
-------------------
:class:`VchanTransport` is an :class:`asyncio.Transport` over one vchan endpoint, so the
standard :class:`asyncio.StreamReader`/:class:`asyncio.StreamWriter` pair (and any
:class:`asyncio.Protocol`) work unchanged.  It is a :class:`~xenpv.drivers.streams.RingStreamTransport`
(write queue and water marks, pause/resume, close/abort: the base it shares with the
console's streams).  The endpoint's event-channel port is watched through the handle's
:class:`~xenpv.platforms.dispatch.PortDispatcher` (one ``loop.add_reader`` per handle,
shared with other endpoints and consoles); each notification runs :meth:`_service`:

1. flush buffered writes into the ring we write (kicking the peer if it asked);
2. move readable bytes to ``protocol.data_received`` (bounded per pass; a full pass
   reschedules itself so one busy vchan does not starve the loop), honouring
   ``pause_reading``;
3. when the peer's live byte is 0 and nothing is left to read, deliver EOF, release the
   endpoint (everything shared goes) and report ``connection_lost``.

A pass that moved data polls the ring for a few microseconds more (``spin_us``, the loop
is blocked meanwhile) before it goes back to waiting, since a busy peer's next write is
usually that close; then it requests a notification and re-checks the ring, so no wake-up
is lost.  Writes beyond the ring go to a local buffer with
high/low water marks (``pause_writing``/``resume_writing``: ``drain()`` works).  A peer
error (insane indexes, scenario 26) closes the transport with that
:class:`~xenpv.vchan.errors.VchanBroken` as the ``connection_lost`` error, which the
reader raises.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from xenpv.drivers.quarantine import GrantQuarantine
from xenpv.drivers.streams import RingStreamTransport
from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.platforms.base import Platform, XenstoreClient
from xenpv.protocols.vchan import VCHAN_NOTIFY_READ, VCHAN_NOTIFY_WRITE
from xenpv.vchan.endpoint import VchanClient, VchanEndpoint, VchanServer

__all__ = ["VchanStreamServer", "VchanTransport", "open_connection", "start_server"]

_READ_CHUNK = 1 << 16
_PASS_BYTES = 1 << 20  # bytes handed to the protocol per pass before yielding to the loop
_SPIN_US = 20
_HIGH_WATER = 1 << 20
_LOW_WATER = 1 << 18


class VchanTransport(RingStreamTransport):
    """An asyncio transport over a connected vchan endpoint (the transport API itself is
    :class:`~xenpv.drivers.streams.RingStreamTransport`'s)."""

    write_high_water = _HIGH_WATER
    write_low_water = _LOW_WATER
    kind = "vchan"

    def __init__(self, endpoint: VchanEndpoint, protocol: asyncio.BaseProtocol,
                 *, on_lost: Callable[[VchanEndpoint], None] | None = None) -> None:
        super().__init__(protocol, {"vchan": endpoint,
                                    "peername": (endpoint.peer_domid, endpoint.path)})
        self._ep = endpoint
        self._rbuf = memoryview(bytearray(_READ_CHUNK))  # one copy out: bytes(view[:n])
        self._eof_seen = False
        self._on_lost = on_lost
        #: Microseconds a pass that moved data polls the ring before going back to the
        #: loop to wait (kept short: the loop is blocked meanwhile).
        self.spin_us = _SPIN_US
        endpoint.hub.watch(endpoint.port, self._schedule)
        self._loop.call_soon(self._protocol.connection_made, self)
        self._schedule()

    # -- servicing
    def _service(self) -> None:
        if self._lost:
            return
        if self._ep.closed:  # released under us (the stream server closed)
            self._lose(None)
            return
        try:
            self._flush()
            again = self._pump()
        except (PeerError, BrokenPipeError) as exc:
            self._fail(exc)
            return
        if again:
            self._schedule()

    def _send(self, data: bytes | bytearray | memoryview) -> int:
        if not self._ep.is_open:
            raise BrokenPipeError("vchan peer is gone")
        return self._ep.send_nowait(data)

    def _flush(self) -> None:
        if not self._wbuf:
            return
        ep = self._ep
        n = self._send(self._wbuf)
        if n:
            del self._wbuf[:n]
            if self._wbuf and ep.spin(writing=True, spin_us=self.spin_us):
                self._schedule()  # the peer is reading right now: go on without sleeping
                self._check_water()
                return
        if self._wbuf:  # full: hear of the peer's next read, then re-check
            ep.rings.request_notify(VCHAN_NOTIFY_READ)
            if ep.rings.buffer_space():
                self._schedule()
        self._check_water()
        self._close_if_flushed()

    def _pump(self) -> bool:
        """Hand readable data to the protocol; True if a further pass is due now."""
        ep = self._ep
        moved = 0
        rbuf = self._rbuf
        while self._reading and not self._lost and moved < _PASS_BYTES:
            n = ep.recv_nowait(rbuf)
            if not n:
                break
            moved += n
            self._protocol.data_received(bytes(rbuf[:n]))
        if self._lost or not self._reading:
            return False
        if moved >= _PASS_BYTES:
            return True
        if moved and ep.is_open and ep.spin(reading=True, spin_us=self.spin_us):
            return True  # a busy peer: more is coming, no need to sleep yet
        ep.rings.request_notify(VCHAN_NOTIFY_WRITE)  # empty: hear of the next write
        if ep.rings.data_ready():
            return True
        if not ep.is_open and not ep.data_ready():
            self._peer_gone()
        return False

    def _peer_gone(self) -> None:
        if self._eof_seen:
            return
        self._eof_seen = True
        with contextlib.suppress(AttributeError):
            self._protocol.eof_received()
        self._lose(None)

    def _teardown(self) -> None:
        self._ep.hub.unwatch(self._ep.port)
        self._ep.release()
        if self._on_lost is not None:
            self._on_lost(self._ep)


def _streams(limit: int) -> tuple[asyncio.StreamReader, Callable[..., asyncio.StreamReaderProtocol]]:
    reader = asyncio.StreamReader(limit=limit)
    return reader, lambda cb=None: asyncio.StreamReaderProtocol(reader, cb)


async def open_connection(
    platform: Platform, server_domid: int, path: str, *, limit: int = 2**16,
    xs: XenstoreClient | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the vchan ``server_domid`` published at ``path``; returns
    ``(reader, writer)`` like :func:`asyncio.open_connection`.

    The writer's ``close()`` closes the vchan; reading returns EOF once the server has gone
    and everything it sent was read."""
    client = await VchanClient.create(platform, server_domid, path, xs=xs)
    loop = asyncio.get_running_loop()
    reader, make = _streams(limit)
    protocol = make()
    transport = VchanTransport(client, protocol)
    await asyncio.sleep(0)  # connection_made runs
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class VchanStreamServer:
    """A vchan server publishing at one path and serving one client at a time.

    Each connecting client gets ``callback(reader, writer)``.  When that connection ends
    (the client left, or the writer was closed) the vchan is torn down and, unless the
    server is closed, published afresh at the same path for the next client.

    Every vchan it publishes shares :attr:`quarantine` (the one given, else its own), so
    pages a client still mapped are retried at each new publication; ``await
    server.quarantine.drain(timeout)`` waits until all are ended."""

    def __init__(self, platform: Platform, client_domid: int, path: str,
                 callback: Callable[[asyncio.StreamReader, asyncio.StreamWriter], object],
                 *, read_min: int, write_min: int, limit: int, xs: XenstoreClient | None,
                 quarantine: GrantQuarantine | None = None) -> None:
        self.platform = platform
        self.quarantine = quarantine if quarantine is not None else GrantQuarantine(
            platform.grants)
        self.client_domid = client_domid
        self.path = path
        self.callback = callback
        self.read_min = read_min
        self.write_min = write_min
        self.limit = limit
        self._xs = xs
        self.endpoint: VchanServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        #: Connections served so far.
        self.connections = 0
        self._handlers: set[asyncio.Task[object]] = set()

    async def _publish(self) -> None:
        self.endpoint = await VchanServer.create(
            self.platform, self.client_domid, self.path, read_min=self.read_min,
            write_min=self.write_min, xs=self._xs, quarantine=self.quarantine)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._closed.is_set():
                ep = self.endpoint
                if ep is None or ep.closed:
                    await self._publish()
                    ep = self.endpoint
                    assert ep is not None
                await ep.wait_client()
                done = loop.create_future()
                _reader, make = _streams(self.limit)

                def connected(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                    res = self.callback(r, w)
                    if asyncio.iscoroutine(res):
                        task = loop.create_task(res)
                        self._handlers.add(task)
                        task.add_done_callback(self._handlers.discard)

                protocol = make(connected)

                def lost(_ep: VchanEndpoint, done: asyncio.Future[None] = done) -> None:
                    if not done.done():
                        done.set_result(None)

                VchanTransport(ep, protocol, on_lost=lost)
                self.connections += 1
                await done
                await ep.remove_path(self._xs)
        finally:
            ep = self.endpoint
            if ep is not None and not ep.closed:
                await ep.aclose(self._xs)

    def start(self) -> None:
        """Start serving (called by :func:`start_server`)."""
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def close(self) -> None:
        """Stop serving: the current vchan (and its connection, if any) is closed."""
        self._closed.set()
        ep = self.endpoint
        if self._task is not None:
            self._task.cancel()
        if ep is not None and not ep.closed:
            ep.release()

    async def wait_closed(self) -> None:
        """Wait until the serving task has ended and the path is removed."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        ep = self.endpoint
        if ep is not None:
            await ep.remove_path(self._xs)

    async def serve_forever(self) -> None:
        """Serve until closed."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def __aenter__(self) -> VchanStreamServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def start_server(
    platform: Platform,
    client_domid: int,
    path: str,
    callback: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[object] | None],
    *,
    read_min: int = 0,
    write_min: int = 0,
    limit: int = 2**16,
    xs: XenstoreClient | None = None,
    quarantine: GrantQuarantine | None = None,
) -> VchanStreamServer:
    """Publish a vchan for ``client_domid`` at ``path`` and call ``callback(reader,
    writer)`` for each client connection (one at a time), like :func:`asyncio.start_server`.

    The vchan is published before this returns, so a client may connect at once."""
    server = VchanStreamServer(platform, client_domid, path, callback, read_min=read_min,
                               write_min=write_min, limit=limit, xs=xs,
                               quarantine=quarantine)
    try:
        await server._publish()
    except (PlatformError, LocalError):
        raise
    server.start()
    return server

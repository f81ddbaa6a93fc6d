"""The asyncio byte-stream transport that console and vchan streams are built on.

Why here
--------
This is driver-layer code (asyncio, a transport's lifecycle) shared by two drivers that
live in different packages (:mod:`xenpv.frontends.console`, :mod:`xenpv.vchan.streams`)
and must not depend on each other, so it sits in :mod:`xenpv.drivers` with the other
pieces drivers share.

Theory of operation
-------------------
:class:`RingStreamTransport` is an :class:`asyncio.Transport` over "some ring and a
port": the standard :class:`asyncio.StreamReader`/:class:`asyncio.StreamWriter` pair (and
any :class:`asyncio.Protocol`) work unchanged on it.  The base owns what every such
transport does the same way:

* the write path: :meth:`~RingStreamTransport.write` hands data to the ring at once
  through the subclass's :meth:`~RingStreamTransport._send` while nothing is queued, and
  queues the rest locally, with high/low water marks driving
  ``pause_writing``/``resume_writing`` (so ``drain()`` works);
* reading on/off (``pause_reading``/``resume_reading``; resuming schedules a pass);
* service passes: :meth:`~RingStreamTransport._schedule` queues at most one
  :meth:`~RingStreamTransport._service` pass in the loop;
* the end: ``close`` waits until the queued bytes are in the ring (the subclass's pass
  calls :meth:`~RingStreamTransport._close_if_flushed`), ``abort`` drops them; either way
  :meth:`~RingStreamTransport._lose` runs once: the subclass's
  :meth:`~RingStreamTransport._teardown` releases port and memory, then
  ``connection_lost`` is reported (soon, in the loop), also if the teardown failed.  A
  peer error ends the stream with that error as ``connection_lost``'s argument.

Subclasses provide the ring side: :meth:`_send` (what fits now), :meth:`_service` (one
pass: flush the queue, deliver readable bytes, honour ``_reading``), :meth:`_teardown`,
and the water marks; they call ``connection_made`` when they are ready.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from xenpv.errors import LocalError, PeerError

__all__ = ["NoEndOfFile", "RingStreamTransport"]


class NoEndOfFile(LocalError, NotImplementedError):
    """``write_eof`` on a stream that has no half-close (console, vchan).

    A :class:`~xenpv.errors.LocalError` (misuse of the API) that is also the
    :class:`NotImplementedError` asyncio transports raise for it."""


class RingStreamTransport(asyncio.Transport):
    """Base of the asyncio transports over a shared ring and an event channel.

    See the module docstring for what the base does and what a subclass provides.
    """

    #: Local write buffer above which the protocol is asked to pause writing, and at or
    #: below which it may resume.
    write_high_water: ClassVar[int] = 1 << 16
    write_low_water: ClassVar[int] = 1 << 14
    #: What the stream is called in messages.
    kind: ClassVar[str] = "stream"

    def __init__(self, protocol: asyncio.BaseProtocol, extra: dict[str, Any]) -> None:
        """Common state; the subclass starts serving and calls ``connection_made``."""
        super().__init__(extra)
        self._protocol: Any = protocol
        self._loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()
        self._wbuf = bytearray()
        self._reading = True
        self._closing = False
        self._lost = False
        self._writing_paused = False
        self._scheduled = False

    # -- what subclasses provide
    def _send(self, data: bytes | bytearray | memoryview) -> int:
        """Put as much of ``data`` into the ring as fits now; returns bytes taken.

        May raise :class:`~xenpv.errors.PeerError` or :class:`BrokenPipeError` (the
        stream then ends)."""
        raise NotImplementedError

    def _service(self) -> object:
        """One pass over the ring (flush the queue, deliver readable bytes)."""
        raise NotImplementedError

    def _teardown(self) -> None:
        """Release what the stream holds (port, memory); runs once, at the end."""
        raise NotImplementedError

    def _write_refused(self) -> None:
        """A write after close or loss: ignored (as socket transports do)."""

    # -- helpers for subclasses
    def _schedule(self) -> None:
        """Queue one service pass in the loop (at most one at a time)."""
        if not self._scheduled and not self._lost:
            self._scheduled = True
            self._loop.call_soon(self._scheduled_pass)

    def _scheduled_pass(self) -> None:
        self._scheduled = False
        self._service()

    def _check_water(self) -> None:
        """Tell the protocol to pause or resume writing as the local queue crosses the
        water marks."""
        size = len(self._wbuf)
        if not self._writing_paused and size > self.write_high_water:
            self._writing_paused = True
            self._protocol.pause_writing()
        elif self._writing_paused and size <= self.write_low_water:
            self._writing_paused = False
            self._protocol.resume_writing()

    def _close_if_flushed(self) -> None:
        """After a flush: a pending ``close`` completes once nothing is queued."""
        if self._closing and not self._wbuf and not self._lost:
            self._lose(None)

    def _fail(self, exc: BaseException) -> None:
        """End the stream after ``exc``: a peer error is reported to the protocol, a
        vanished peer (:class:`BrokenPipeError`) is an ordinary end."""
        self._lose(exc if isinstance(exc, PeerError) else None)

    def _lose(self, exc: BaseException | None) -> None:
        """End the stream once: tear down, then report ``connection_lost(exc)``."""
        if self._lost:
            return
        self._lost = True
        self._wbuf.clear()
        try:
            self._teardown()
        finally:
            self._loop.call_soon(self._protocol.connection_lost, exc)

    # -- asyncio.Transport API
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``: what fits goes into the ring at once, the rest is queued."""
        if self._closing or self._lost:
            self._write_refused()
            return
        if not data:
            return
        if self._wbuf:
            self._wbuf += data  # order: behind what is queued already
        else:
            try:
                n = self._send(data)
            except (PeerError, BrokenPipeError) as exc:
                self._fail(exc)
                return
            size = len(data) if isinstance(data, (bytes, bytearray)) else memoryview(data).nbytes
            if n < size:
                self._wbuf += memoryview(data).cast("B")[n:]
        self._check_water()

    def can_write_eof(self) -> bool:
        """No half-close: False."""
        return False

    def write_eof(self) -> None:
        """Not supported: raises :class:`NoEndOfFile`."""
        raise NoEndOfFile(f"a {self.kind} stream has no end-of-file")

    def get_write_buffer_size(self) -> int:
        """Bytes queued locally, not yet in the ring."""
        return len(self._wbuf)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """The (low, high) water marks of the local queue."""
        return (self.write_low_water, self.write_high_water)

    def pause_reading(self) -> None:
        """Stop delivering bytes (the ring fills up; the peer waits)."""
        self._reading = False

    def resume_reading(self) -> None:
        """Deliver bytes again."""
        if not self._reading:
            self._reading = True
            self._schedule()

    def is_reading(self) -> bool:
        """True unless paused or ended."""
        return self._reading and not self._lost

    def is_closing(self) -> bool:
        """True once :meth:`close` or :meth:`abort` was called, or the stream ended."""
        return self._closing or self._lost

    def close(self) -> None:
        """Close once the queued bytes are in the ring (see :meth:`abort`)."""
        if self._closing or self._lost:
            return
        self._closing = True
        if not self._wbuf:
            self._lose(None)
        else:
            self._schedule()

    def abort(self) -> None:
        """Close at once, dropping queued bytes."""
        self._wbuf.clear()
        self._closing = True
        self._lose(None)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Replace the protocol."""
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The current protocol."""
        protocol: asyncio.BaseProtocol = self._protocol
        return protocol

"""vchan server and client endpoints over the platform interfaces (libxenvchan-compatible).

Theory of operation
-------------------
Setup follows xen-protocols.md §10.3 step by step, with every platform object passed in:

* :meth:`VchanServer.create` allocates an unbound port for the client, shares the control
  page with an unmap notification (clear ``srv_live``, signal the port) so that the client
  learns of our death, fills in orders, live and notify bytes and the grant list, shares
  the out-of-page ring pages, and publishes ``ring-ref`` and ``event-channel`` under the
  caller's path in one xenstore transaction (retried on ``EAGAIN``), readable only by the
  client (``[n<self>, r<client>]``; our domid comes from the relative key ``domid``).
* :meth:`VchanClient.create` reads and validates the two keys, binds the port, maps the
  control page read-write with an unmap notification (clear ``cli_live``, signal), copies
  the orders and grant list out of the page *once* and validates them (scenario 26), maps
  the ring it writes read-write and the ring it reads read-only, then marks itself live and
  wakes the server.

Everything a peer wrote is validated before use; a bad value raises
:class:`~xenpv.vchan.errors.VchanPeerError` after releasing what was set up so far.

Data moves through :class:`~xenpv.vchan.ring.VchanRings`.  Waiting goes through the
handle's :class:`~xenpv.platforms.dispatch.PortDispatcher` (``endpoint.hub``; also known
as :data:`EventHub`), which shares one event-channel handle between all endpoints of a
platform and every other driver on it (consoles): a pending port is unmasked at once
(before the ring is re-examined, §12 pitfall 7) and handed to the endpoint that owns it.  Blocking calls spin on the ring for a
few tens of microseconds before sleeping on the event channel (waking another vCPU costs
~30 µs on this machine kind, machine-baseline.md), and always request a notification and
re-check the ring before they sleep.

Close: own live byte to 0, release the ring views, end the shares / unmap the mappings,
signal the port unconditionally and unbind it; the server also removes its xenstore path.
A share the peer still maps cannot be ended yet (loopback ``GrantInUse``, R8): it goes to
the endpoint's :class:`~xenpv.drivers.quarantine.GrantQuarantine` (``quarantine=`` at
creation, else one of its own), which later setups and closes given the same quarantine
retry, and :meth:`GrantQuarantine.drain` waits for.  Shares, mappings and the port of an
endpoint are held in one :class:`~xenpv.drivers.resources.DeviceResources`, which also
undoes a half-done setup.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

from xenpv.drivers.quarantine import GrantQuarantine
from xenpv.drivers.resources import DeviceResources
from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.platforms.base import (
    EventChannels,
    MappedGrants,
    Platform,
    SharedPages,
    UnmapNotify,
    XenstoreClient,
    XenstoreNodes,
)
from xenpv.platforms.dispatch import PortDispatcher
from xenpv.protocols import ProtocolError
from xenpv.protocols.vchan import (
    KEY_EVENT_CHANNEL,
    KEY_RING_REF,
    VCHAN_CLI_CONNECTED,
    VCHAN_CLI_LIVE_OFFSET,
    VCHAN_CLI_NOTIFY_OFFSET,
    VCHAN_CLI_WAITING,
    VCHAN_GRANTS_OFFSET,
    VCHAN_IN_PAGE_OFFSETS,
    VCHAN_LEFT_ORDER_OFFSET,
    VCHAN_NOTIFY_READ,
    VCHAN_NOTIFY_WRITE,
    VCHAN_SRV_ALIVE,
    VCHAN_SRV_LIVE_OFFSET,
    VCHAN_SRV_NOTIFY_OFFSET,
    choose_orders,
    pages_for_order,
    parse_grants,
)
from xenpv.vchan.errors import VchanBroken, VchanPeerError
from xenpv.vchan.ring import VchanRings
from xenpv.xenstore.values import parse_xs_number

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "DEFAULT_SPIN_US",
    "EventHub",
    "VchanClient",
    "VchanEndpoint",
    "VchanServer",
    "run_blocking",
]

T = TypeVar("T")

#: How long blocking calls poll the ring before sleeping on the event channel.
DEFAULT_SPIN_US = 50
PAGE = 4096


# --------------------------------------------------------------------------- helpers


def run_blocking(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine made by ``fn`` to completion on a private loop in a helper thread
    (so blocking callers work whether or not a loop runs in their own thread)."""
    values: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            values.append(asyncio.run(fn()))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=target, name="xenpv-vchan-xenstore", daemon=True)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return values[0]


def parse_number(raw: bytes, what: str, *, low: int = 1, high: int = 0xFFFFFFFF) -> int:
    """A peer-written decimal xenstore value in ``[low, high]``; else :class:`VchanPeerError`.

    libxenvchan treats 0 (and unparsable text, which ``atoi`` turns into 0) as an error;
    here anything but canonical decimal is refused too (R5), by the one strict parser
    (:func:`~xenpv.xenstore.values.parse_xs_number`)."""
    return parse_xs_number(raw, f"vchan {what}", lo=low, hi=high,
                           error=lambda message, _errno: VchanPeerError(message))


async def _with_xenstore(platform: Platform, xs: XenstoreClient | None,
                         fn: Callable[[XenstoreClient], Awaitable[T]]) -> T:
    """Run ``fn(xs)`` with the given client, or a private one opened (and closed) here."""
    if xs is not None:
        return await fn(xs)
    own = await platform.xenstore()
    try:
        return await fn(own)
    finally:
        await own.close()


# --------------------------------------------------------------------------- events

#: The per-handle port dispatcher, under the name vchan code has always used.
EventHub = PortDispatcher


# --------------------------------------------------------------------------- endpoints


class VchanEndpoint:
    """What servers and clients share: the data path, waiting and the blocking API."""

    is_server: ClassVar[bool]

    def __init__(self, platform: Platform, peer_domid: int, path: str, port: int,
                 rings: VchanRings, res: DeviceResources) -> None:
        self.platform = platform
        #: The shares/mappings and port of this endpoint, released at close.
        self.res = res
        #: Where shares the peer still maps at close wait (R8).
        self.quarantine = res.quarantine
        self.peer_domid = peer_domid
        self.path = path
        self.port = port
        self.rings = rings
        self.events: EventChannels = platform.events
        self.hub = PortDispatcher.attach(self.events)
        #: Microseconds blocking calls poll the ring before sleeping on the event channel.
        self.spin_us = DEFAULT_SPIN_US
        self.closed = False
        # The peer's live byte while connected (fast path of the data calls).
        self._live_connected = VCHAN_CLI_CONNECTED if self.is_server else VCHAN_SRV_ALIVE
        # The rings signal the peer themselves when it asked (no check after each call).
        rings.on_kick = functools.partial(self.events.notify, port)
        #: Diagnostics: sleeps on the event channel (spinning did not see the ring move).
        self.sleeps = 0
        self._scratch: memoryview | None = None  # recv's buffer, kept between calls

    @property
    def spin_us(self) -> int:
        """Microseconds blocking calls poll the ring before sleeping on the event channel
        (0: no polling)."""
        return self._spin_us

    @spin_us.setter
    def spin_us(self, value: int) -> None:
        self._spin_us = value
        self._spin_ns = max(value, 0) * 1000

    @property
    def notifies(self) -> int:
        """Diagnostics: notifications we sent because the peer asked for them."""
        return int(self.rings.kicks)

    # -- state
    @property
    def is_open(self) -> int:
        """libxenvchan's ``is_open``: server: the client's live byte (2 waiting for a
        client, 1 connected, 0 gone); client: the server's (1 alive, 0 gone)."""
        if self.closed:
            return 0
        live = self.rings.peer_live()
        if live > (VCHAN_CLI_WAITING if self.is_server else VCHAN_SRV_ALIVE):
            self._fail(f"peer live byte {live} is not a valid state")
        return live

    def _fail(self, why: str) -> None:
        if self.rings.broken is None:
            self.rings.broken = why
        raise VchanBroken(f"vchan {self.path}: {self.rings.broken}")

    def _check(self) -> None:
        if self.closed:
            raise LocalError(f"vchan {self.path} is closed")
        if self.rings.broken is not None:
            raise VchanBroken(f"vchan {self.path}: {self.rings.broken}")

    def data_ready(self) -> int:
        """Bytes that can be read now without waiting."""
        self._check()
        n = self.rings.data_ready()
        self._check()
        return n

    def buffer_space(self) -> int:
        """Bytes that can be written now without waiting."""
        self._check()
        n = self.rings.buffer_space()
        self._check()
        return n

    # -- non-blocking data path
    def send_nowait(self, data: Buffer) -> int:
        """Write what fits now (possibly 0); :class:`BrokenPipeError` once the peer left."""
        return self._write(data, 0)

    def recv_nowait(self, buf: Buffer, want: int = -1) -> int:
        """Read what is available now into ``buf`` (possibly 0)."""
        return self._read(buf, want, 0)

    def _write(self, data: Buffer, spin_ns: int) -> int:
        # One call into the ring per write; with no room it polls up to spin_ns first.
        rings = self.rings
        if self.closed or rings.broken is not None:
            self._check()
        if rings.peer_live() != self._live_connected and not self.is_open:
            raise BrokenPipeError(f"vchan {self.path}: peer is gone")
        n = rings.send(data, spin_ns)  # the rings signal the peer if it asked (on_kick)
        if n == 0:
            self._check()
        return n

    def _read(self, buf: Buffer, want: int, spin_ns: int) -> int:
        # One call into the ring per read; with nothing there it polls up to spin_ns first.
        rings = self.rings
        if self.closed or rings.broken is not None:
            self._check()
        n = rings.recv_into(buf, want, spin_ns)
        if n == 0:
            self._check()
        return n

    # -- waiting
    def spin(self, *, reading: bool = False, writing: bool = False,
             spin_us: int | None = None) -> bool:
        """Poll the rings for up to ``spin_us`` (default :attr:`spin_us`) microseconds
        without sleeping: True as soon as data is readable (``reading``), room is writable
        (``writing``), the peer went away or the rings broke; else False."""
        if spin_us is None:
            return self.rings.wait_ready(reading, writing, self._spin_ns)
        return self.rings.wait_ready(reading, writing, max(spin_us, 0) * 1000)

    def _sleep(self, reading: bool, writing: bool, timeout: float | None,
               spin: bool = True) -> bool:
        """Spin (:meth:`spin`, unless the caller just did); then ask the peer for the
        notifications that match (``VCHAN_NOTIFY_WRITE`` to hear of data,
        ``VCHAN_NOTIFY_READ`` of room), re-check, and sleep on the event channel.
        False if ``timeout`` passed."""
        rings = self.rings
        if rings.wait_ready(reading, writing, self._spin_ns if spin else 0):
            return True
        rings.request_notify((VCHAN_NOTIFY_WRITE if reading else 0)
                             | (VCHAN_NOTIFY_READ if writing else 0))
        if rings.wait_ready(reading, writing, 0):
            return True
        self.sleeps += 1
        return self.hub.wait(self.port, timeout)

    def idle(self, *, reading: bool = True, writing: bool = False,
             timeout: float | None = None) -> bool:
        """Wait until data can be read (``reading``), room can be written (``writing``)
        or the peer went away: spin first, then request notifications and sleep.
        False if ``timeout`` passed."""
        self._check()
        return self._sleep(reading, writing, timeout)

    def wait_event(self, timeout: float | None = None) -> bool:
        """Block until our port fires (True) or ``timeout`` passes (False)."""
        self._check()
        return self.hub.wait(self.port, timeout)

    def wait_readable(self, timeout: float | None = None) -> bool:
        """Block until data can be read or the peer has gone (True), or ``timeout`` (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check()
            if self.data_ready() or not self.is_open:
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._sleep(True, False, remaining)

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Server: block until a client is connected (True) or ``timeout`` (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check()
            if self.is_open == VCHAN_CLI_CONNECTED:
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self.hub.wait(self.port, remaining)

    # -- blocking API
    # The fast path of send/recv_into is one call into the rings: it polls for room/data
    # (up to spin_us), copies once between the caller's buffer and the ring, publishes the
    # index and signals the peer if it asked.  Everything else (a full or empty ring after
    # the spin, a peer not connected, a closed or broken vchan) takes the slow path.
    def send(self, data: Buffer, timeout: float | None = None) -> int:
        """Write all of ``data`` (any contiguous buffer; it is not copied first), waiting
        for room; returns its size in bytes.

        :class:`BrokenPipeError` if the peer leaves first, :class:`TimeoutError` after
        ``timeout`` seconds (counted from the first wait for room)."""
        total = (len(data) if isinstance(data, (bytes, bytearray))
                 else data.nbytes if isinstance(data, memoryview) else memoryview(data).nbytes)
        n = self.rings.write_some(data, 0, self._spin_ns)  # usually all of it
        if n == total:
            return n
        return self._send_rest(data, total, n, timeout)

    def _put(self, data: Buffer, pos: int) -> int:
        """Write from ``pos`` what fits (polling first), with the checks of :meth:`_write`
        when the fast call declines."""
        n = self.rings.write_some(data, pos, self._spin_ns)
        if n < 0:  # not connected, closed or broken: the checked path raises (or writes)
            n = self._write(memoryview(data).cast("B")[pos:], self._spin_ns)
        elif n == 0:
            self._check()
        return n

    def _send_rest(self, data: Buffer, total: int, n: int, timeout: float | None) -> int:
        if not total:
            return 0  # nothing to send: no checks, as before
        if n < 0:
            n = self._write(memoryview(data).cast("B"), self._spin_ns)
        elif n == 0:
            self._check()
        pos = n
        deadline = None if timeout is None else time.monotonic() + timeout
        while pos < total:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"vchan {self.path}: send timed out after {pos} bytes")
            self._sleep(False, True, remaining, spin=n > 0)  # n == 0: we just spun
            n = self._put(data, pos)
            pos += n
        return pos

    def recv_into(self, buf: Buffer, want: int = -1, timeout: float | None = None) -> int:
        """Read at least one byte into ``buf`` (up to ``want``), waiting if needed: the
        bytes go from the ring straight into ``buf``.

        Returns 0 at end of stream (the peer has gone and everything it sent was read);
        :class:`TimeoutError` after ``timeout`` seconds (counted from the first wait)."""
        n = self.rings.recv_into(buf, want, self._spin_ns)  # usually data
        if n:
            return n
        return self._recv_rest(buf, want, timeout)

    def _recv_rest(self, buf: Buffer, want: int, timeout: float | None) -> int:
        self._check()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self.is_open:
                return self.recv_nowait(buf, want)  # data that raced with the close
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"vchan {self.path}: nothing to read")
            self._sleep(True, False, remaining, spin=False)  # we just spun
            n = self._read(buf, want, self._spin_ns)
            if n:
                return n

    def recv(self, n: int, timeout: float | None = None) -> bytes:
        """Read up to ``n`` bytes (at least one; ``b""`` at end of stream).

        The bytes are copied twice (ring to a scratch buffer, then into the new ``bytes``);
        :meth:`recv_into` copies once."""
        scratch = self._scratch
        if scratch is None or len(scratch) < n:
            scratch = self._scratch = memoryview(bytearray(n))
        got = self.recv_into(scratch, n, timeout)
        return bytes(scratch[:got])

    def recv_exactly_into(self, buf: Buffer, n: int = -1, timeout: float | None = None) -> int:
        """Fill the first ``n`` (default: all) bytes of ``buf`` from the stream, waiting
        as needed, with no copy beyond the one from the ring; returns ``n``.

        :class:`EOFError` if the stream ends first."""
        pos = 0
        if isinstance(buf, bytearray) and 0 < n <= len(buf):  # usually one read fills it
            pos = self.recv_into(buf, n, timeout)
            if pos == n:
                return n
        view = memoryview(buf).cast("B")
        if n < 0:
            n = len(view)
        elif n > len(view):
            raise ValueError(f"cannot read {n} bytes into a buffer of {len(view)}")
        while pos < n:
            got = self.recv_into(view[pos:], n - pos, timeout)
            if not got:
                raise EOFError(f"vchan {self.path}: stream ended after {pos} of {n} bytes")
            pos += got
        return n

    def recv_exactly(self, n: int, timeout: float | None = None) -> bytes:
        """Read exactly ``n`` bytes; :class:`EOFError` if the stream ends first."""
        buf = bytearray(n)
        self.recv_exactly_into(buf, n, timeout)
        return bytes(buf)

    # -- close
    def release(self) -> None:
        """Own live byte to 0, let go of every page, signal the port unconditionally and
        unbind it (no xenstore work); idempotent."""
        if self.closed:
            return
        self.closed = True
        self.rings.set_live(0)
        self.rings.release()
        self.hub.detach(self.port)
        # pages first, then the port, signalled unconditionally: the peer must look at us
        self.res.release(notify=True)

    def close(self) -> None:
        """Close the vchan (blocking; the server also removes its xenstore path)."""
        self.release()

    async def aclose(self, xs: XenstoreClient | None = None) -> None:
        """Close the vchan from asyncio code."""
        self.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VchanServer(VchanEndpoint):
    """The granting side of a vchan (libxenvchan ``server_init``).

    Blocking construction: ``VchanServer(platform, client_domid, path, read_min=…,
    write_min=…)``; from asyncio: ``await VchanServer.create(…)``.  ``read_min`` is the
    least size of the ring the server reads (left), ``write_min`` of the one it writes.
    ``quarantine`` (else one of its own) receives the shares the client still maps at
    close."""

    is_server = True

    def __init__(self, platform: Platform, client_domid: int, path: str, *, read_min: int = 0,
                 write_min: int = 0, quarantine: GrantQuarantine | None = None,
                 _setup: _ServerSetup | None = None) -> None:
        if _setup is None:
            server = run_blocking(
                lambda: VchanServer.create(platform, client_domid, path, read_min=read_min,
                                           write_min=write_min, quarantine=quarantine))
            self.__dict__.update(server.__dict__)
            return
        port, ctrl, shares, rings, res = _setup
        super().__init__(platform, client_domid, path, port, rings, res)
        self.ctrl = ctrl
        self.shares = shares

    @classmethod
    async def create(cls, platform: Platform, client_domid: int, path: str, *,
                     read_min: int = 0, write_min: int = 0, xs: XenstoreClient | None = None,
                     quarantine: GrantQuarantine | None = None) -> VchanServer:
        """Set up the vchan and publish it at ``path`` (see the module docstring)."""
        left_order, right_order = choose_orders(read_min, write_min)
        res = DeviceResources(platform.grants, platform.events, quarantine)
        res.quarantine.reap()
        with res.undo_on_error():
            port = res.alloc_unbound(client_domid)
            platform.events.unmask(port)
            ctrl = res.grant(client_domid, 1, writable=True, notify=UnmapNotify(
                VCHAN_SRV_LIVE_OFFSET, clear_byte=True, port=port))
            mem = ctrl.mem
            mem[:PAGE] = bytes(PAGE)  # R7, although fresh pages are zeroed already
            struct.pack_into("<HH", mem, VCHAN_LEFT_ORDER_OFFSET, left_order, right_order)
            mem[VCHAN_CLI_LIVE_OFFSET] = VCHAN_CLI_WAITING
            mem[VCHAN_SRV_LIVE_OFFSET] = VCHAN_SRV_ALIVE
            mem[VCHAN_CLI_NOTIFY_OFFSET] = VCHAN_NOTIFY_WRITE
            refs: list[int] = []
            views: list[memoryview] = []
            shares: list[SharedPages] = []
            for order in (left_order, right_order):
                if order in VCHAN_IN_PAGE_OFFSETS:
                    off = VCHAN_IN_PAGE_OFFSETS[order]
                    views.append(mem[off : off + (1 << order)])
                else:
                    pages = res.grant(client_domid, pages_for_order(order), writable=True)
                    shares.append(pages)
                    refs.extend(pages.refs)
                    views.append(pages.mem)
            if refs:
                struct.pack_into(f"<{len(refs)}I", mem, VCHAN_GRANTS_OFFSET, *refs)
            rings = VchanRings(mem, views[0], 1 << left_order, views[1], 1 << right_order,
                               is_server=True)

            async def publish(xs: XenstoreClient) -> None:
                own = parse_number(await xs.read("domid"), "own domid", low=0, high=0xFFFF)
                perms = [f"n{own}", f"r{client_domid}"]

                async def write(t: XenstoreNodes) -> None:
                    await t.write(f"{path}/{KEY_RING_REF}", str(ctrl.refs[0]))
                    await t.set_perms(f"{path}/{KEY_RING_REF}", perms)
                    await t.write(f"{path}/{KEY_EVENT_CHANNEL}", str(port))
                    await t.set_perms(f"{path}/{KEY_EVENT_CHANNEL}", perms)

                await xs.transact(write, retries=64)

            await _with_xenstore(platform, xs, publish)
        return cls(platform, client_domid, path, _setup=(port, ctrl, shares, rings, res))

    async def wait_client(self) -> None:
        """asyncio: wait until a client is connected (``cli_live`` 1)."""
        ready = asyncio.Event()
        self.hub.watch(self.port, ready.set)
        try:
            while self.is_open != VCHAN_CLI_CONNECTED:
                ready.clear()
                if self.is_open == VCHAN_CLI_CONNECTED:
                    break
                await ready.wait()
        finally:
            self.hub.unwatch(self.port)

    async def remove_path(self, xs: XenstoreClient | None = None) -> None:
        """Remove the published xenstore path."""
        async def rm(c: XenstoreClient) -> None:
            await c.rm(self.path)

        with contextlib.suppress(PlatformError, LocalError, PeerError, OSError):
            await _with_xenstore(self.platform, xs, rm)

    def close(self, linger: float = 0.0) -> None:
        """Close and remove the xenstore path (blocking).

        With ``linger`` > 0, wait up to that long for the client to unmap the shared pages
        so that they are ended before returning (else they stay in quarantine)."""
        if self.closed:
            return
        self.release()
        run_blocking(self.remove_path)
        self.quarantine.drain_blocking(linger)

    async def aclose(self, xs: XenstoreClient | None = None, linger: float = 0.0) -> None:
        """Close and remove the xenstore path (asyncio); ``linger`` as for :meth:`close`."""
        if not self.closed:
            self.release()
            await self.remove_path(xs)
        await self.quarantine.drain(linger)


class VchanClient(VchanEndpoint):
    """The mapping side of a vchan (libxenvchan ``client_init``).

    Blocking construction: ``VchanClient(platform, server_domid, path)``; from asyncio:
    ``await VchanClient.create(…)``."""

    is_server = False

    def __init__(self, platform: Platform, server_domid: int, path: str, *,
                 _setup: _ClientSetup | None = None) -> None:
        if _setup is None:
            client = run_blocking(lambda: VchanClient.create(platform, server_domid, path))
            self.__dict__.update(client.__dict__)
            return
        port, ctrl, mappings, rings, res = _setup
        super().__init__(platform, server_domid, path, port, rings, res)
        self.ctrl = ctrl
        self.mappings = mappings

    @classmethod
    async def create(cls, platform: Platform, server_domid: int, path: str, *,
                     xs: XenstoreClient | None = None) -> VchanClient:
        """Connect to the vchan published at ``path`` by ``server_domid``."""

        async def read_keys(c: XenstoreClient) -> tuple[int, int]:
            ref = parse_number(await c.read(f"{path}/{KEY_RING_REF}"), "ring-ref")
            evt = parse_number(await c.read(f"{path}/{KEY_EVENT_CHANNEL}"), "event-channel")
            return ref, evt

        ring_ref, remote_port = await _with_xenstore(platform, xs, read_keys)
        return cls.attach(platform, server_domid, path, ring_ref, remote_port)

    @classmethod
    def attach(cls, platform: Platform, server_domid: int, path: str, ring_ref: int,
               remote_port: int) -> VchanClient:
        """Connect given the (already read) ``ring-ref`` and ``event-channel`` values."""
        res = DeviceResources(platform.grants, platform.events)
        try:
            port = res.bind(server_domid, remote_port)
        except PlatformError as exc:
            raise VchanPeerError(f"vchan {path}: cannot bind event channel {remote_port}: {exc}") from exc
        with res.undo_on_error():
            platform.events.unmask(port)
            try:
                ctrl = res.map(server_domid, [ring_ref], writable=True,
                               notify=UnmapNotify(VCHAN_CLI_LIVE_OFFSET, clear_byte=True, port=port))
            except PlatformError as exc:
                raise VchanPeerError(f"vchan {path}: cannot map ring-ref {ring_ref}: {exc}") from exc
            mem = ctrl.mem
            page = bytes(mem[:PAGE])  # orders and grant list: one fetch (R1)
            left_order, right_order = struct.unpack_from("<HH", page, VCHAN_LEFT_ORDER_OFFSET)
            try:
                left_refs, right_refs = parse_grants(page, left_order, right_order)
            except ProtocolError as exc:
                raise VchanPeerError(f"vchan {path}: {exc}") from exc
            views: list[memoryview] = []
            mappings: list[MappedGrants] = []
            for order, refs, writable in ((left_order, left_refs, True),
                                          (right_order, right_refs, False)):
                if order in VCHAN_IN_PAGE_OFFSETS:
                    off = VCHAN_IN_PAGE_OFFSETS[order]
                    views.append(mem[off : off + (1 << order)])
                    continue
                try:
                    m = res.map(server_domid, refs, writable=writable)
                except PlatformError as exc:
                    raise VchanPeerError(f"vchan {path}: cannot map ring pages: {exc}") from exc
                mappings.append(m)
                views.append(m.mem)
            rings = VchanRings(mem, views[1], 1 << right_order, views[0], 1 << left_order,
                               is_server=False)
            mem[VCHAN_CLI_LIVE_OFFSET] = VCHAN_CLI_CONNECTED
            mem[VCHAN_SRV_NOTIFY_OFFSET] = VCHAN_NOTIFY_WRITE
            platform.events.notify(port)  # wake the server
        return cls(platform, server_domid, path, _setup=(port, ctrl, mappings, rings, res))


#: What :meth:`VchanServer.create` hands its constructor.
_ServerSetup = tuple[int, SharedPages, list[SharedPages], VchanRings, DeviceResources]
#: What :meth:`VchanClient.attach` hands its constructor.
_ClientSetup = tuple[int, MappedGrants, list[MappedGrants], VchanRings, DeviceResources]

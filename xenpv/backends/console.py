"""Console backend: serves guest consoles on ptys (and log files), like xenconsoled.

Theory of operation
-------------------
One :class:`ConsoleSession` serves one mapped ``xencons_interface`` page and one bound
event channel (xen-protocols.md §8.1).  The guest's output (``out`` ring) is consumed on
every notification and goes to a pty master (``xenconsole --type pv`` attaches to the
slave, whose path the backend writes to ``tty``), to an optional log file and to an
optional in-process sink; bytes typed on the pty (or :meth:`ConsoleSession.feed`) are
produced into the ``in`` ring as space allows.  The peer is notified after every index
update.

Hostile guests (hostile-inputs.md R10, R11, R14, scenario 27):

* a corrupt index pair (``out_prod - out_cons > 2048``) reads as an empty ring and is
  counted (``stats["insane"]``), never raised (§8.1);
* output waiting for the pty is bounded by ``ConsoleConfig.limit`` (default 1 MiB, the
  libxl default): policy ``"discard"`` drops the oldest bytes and keeps consuming, so the
  guest never stalls; ``"block"`` stops consuming the ring until the pty drains (the
  guest waits);
* the log file is capped by ``log_max`` bytes: when full it is rotated once
  (``NAME.log`` → ``NAME.log.1``), so the disk holds at most twice the cap;
* every delivered event is charged to an :class:`~xenpv.drivers.events.EventRateLimiter`
  (30 events per 200 ms, like xenconsoled); past the allowance the port stays masked until
  the period ends, then the ring is examined once;
* the guest's console nodes (``tty``, ``output``, ``limit``, ``type``) are never read:
  limits, sinks and which domains to serve come from the backend's own configuration.
  The toolstack helper :func:`publish_primary_console` makes the directory read-only to
  the guest.

Console kinds: :class:`PrimaryConsoleServer` serves ``/local/domain/<d>/console`` (no
xenbus: it watches the directory, maps grant ref 0 of the guest and binds ``port``,
re-mapping/re-binding when they change); :class:`ConsoleBackendDriver` serves secondary
consoles (``backend/console/<fe>/<n>``) through the xenbus driver base;
:class:`ConsoleBackend` bundles both for a set of guests.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import logging
import os
import tty
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xenpv.drivers.consolering import ConsoleRing
from xenpv.drivers.events import EventPump, EventRateLimiter
from xenpv.drivers.resources import DeviceResources
from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.platforms.base import (
    GNTTAB_RESERVED_CONSOLE,
    EventChannels,
    Platform,
    XenstoreClient,
    XenstoreNodes,
    XenstoreWatch,
)
from xenpv.protocols.console import (
    CONSOLE_OUTPUT_PTY,
    KEY_BACKEND_ID,
    KEY_LIMIT,
    KEY_OUTPUT,
    KEY_PORT,
    KEY_RING_REF,
    KEY_TTY,
    KEY_TYPE,
    XENCONS_IN_SIZE,
    XENCONS_OUT_SIZE,
)
from xenpv.xenbus import keys as _keys
from xenpv.xenbus.driver import BackendDriver, PeerKeys
from xenpv.xenbus.watcher import BackendWatcher
from xenpv.xenstore.client import XenstoreClient as XenbusClient
from xenpv.xenstore.wire import XenstoreError

__all__ = [
    "DEFAULT_LIMIT",
    "ConsoleBackend",
    "ConsoleBackendDriver",
    "ConsoleConfig",
    "ConsoleLog",
    "ConsoleSession",
    "PrimaryConsoleServer",
    "console_path",
    "publish_primary_console",
    "remove_primary_console",
    "serve_console",
]

log = logging.getLogger(__name__)

#: libxl's default console ``limit``: bytes buffered per console.
DEFAULT_LIMIT = 1 << 20
#: Bytes consumed from the ring per service pass before yielding to the loop.
_PASS_BYTES = 1 << 16
_PTY_READ = 4096


def console_path(domid: int) -> str:
    """``/local/domain/<domid>/console`` (§8.2)."""
    return f"/local/domain/{domid}/console"


@dataclass(frozen=True)
class ConsoleConfig:
    """Host decisions for the consoles a backend serves (never taken from the guest).

    ``limit``: bytes of output buffered for the pty; ``policy``: ``"discard"`` (drop the
    oldest) or ``"block"`` (stop consuming the ring); ``log_dir``/``log_max``: one log
    file per console, rotated once at ``log_max`` bytes; ``pty``: serve on a pty;
    ``rate_allowance``/``rate_period``: event budget per console.
    """

    limit: int = DEFAULT_LIMIT
    policy: str = "discard"
    log_dir: str | None = None
    log_max: int = 1 << 20
    pty: bool = True
    rate_allowance: int = 30
    rate_period: float = 0.2
    input_limit: int = 1 << 16

    def __post_init__(self) -> None:
        if self.limit < 1 or self.log_max < 1 or self.input_limit < 1:
            raise LocalError("console limits must be positive")
        if self.policy not in ("discard", "block"):
            raise LocalError(f"console policy must be 'discard' or 'block', not {self.policy!r}")


class ConsoleLog:
    """An append-only log file capped at ``max_bytes``; rotated once when full."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int) -> None:
        """Open (append) ``path``."""
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self.size = os.fstat(self._fd).st_size
        #: Times the file was rotated.
        self.rotations = 0

    def write(self, data: bytes) -> None:
        """Append ``data`` (a chunk larger than the cap keeps only its tail)."""
        if self._fd < 0 or not data:
            return
        if len(data) > self.max_bytes:
            data = data[-self.max_bytes:]
        if self.size + len(data) > self.max_bytes:
            self._rotate()
        with contextlib.suppress(OSError):
            os.write(self._fd, data)
            self.size += len(data)

    def _rotate(self) -> None:
        os.close(self._fd)
        with contextlib.suppress(OSError):
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                           | os.O_CLOEXEC, 0o640)
        self.size = 0
        self.rotations += 1

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ConsoleSession(EventPump):
    """Serves one console page + port (both already mapped/bound by the caller).

    ``release`` runs once at :meth:`close` (unmap the page, unbind the port).  ``sink``
    receives every output chunk (tests, benchmarks, the demo).  Counters are in
    :attr:`stats`.
    """

    def __init__(self, ring: ConsoleRing, events: EventChannels, port: int,
                 config: ConsoleConfig,
                 *, name: str = "console", sink: Callable[[bytes], None] | None = None,
                 release: Callable[[], None] | None = None) -> None:
        """Prepare; :meth:`start` opens the pty and begins serving."""
        self.ring = ring
        self.events = events
        self.port = port
        self.config = config
        self.name = name
        self.sink = sink
        self._release = release
        self.limiter = EventRateLimiter(config.rate_allowance, config.rate_period)
        self.buffer = bytearray()  # output waiting for the pty (bounded by config.limit)
        self.inbuf = bytearray()  # input waiting for ring space (bounded by input_limit)
        self.log: ConsoleLog | None = None
        self.master = -1
        self.slave = -1
        self.tty_path: str | None = None
        self.stats = {"out": 0, "in": 0, "discarded": 0, "events": 0, "insane": 0,
                      "notifies": 0, "rate_limited": 0, "spurious": 0, "max_buffered": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer_on = False
        self._reader_on = False
        self._closed = False

    # -- lifecycle
    def start(self) -> None:
        """Open pty and log, watch the port, examine the ring once."""
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        if cfg.log_dir is not None:
            self.log = ConsoleLog(Path(cfg.log_dir) / f"{self.name}.log", cfg.log_max)
        if cfg.pty:
            self.master, self.slave = os.openpty()
            tty.setraw(self.slave)  # no echo, no line editing: bytes pass unchanged
            os.set_blocking(self.master, False)
            self.tty_path = os.ttyname(self.slave)
            self._want_input(True)
        self._watch_port()
        self._schedule_pump()

    def close(self) -> None:
        """Stop serving and release pty, log, page and port (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._unwatch_port()
        if self._loop is not None and self.master >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.master)
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self.master)
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)
        self.master = self.slave = -1
        if self.log is not None:
            self.log.close()
        self.ring.release()
        if self._release is not None:
            self._release()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def _stopped(self) -> bool:
        return self._closed

    def _pump_loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    # -- data path
    def _service(self) -> bool:
        """Consume output (bounded), produce pending input, notify after index moves."""
        if self._closed:
            return False
        cfg = self.config
        consumed = 0
        while consumed < _PASS_BYTES:
            want = XENCONS_OUT_SIZE
            if cfg.policy == "block" and self.master >= 0:
                want = min(want, cfg.limit - len(self.buffer))
                if want <= 0:
                    break  # the guest waits until the pty drains
            insane = self.ring.insane
            data = self.ring.read(want)
            if self.ring.insane != insane:
                self.stats["insane"] += 1
            if not data:
                break
            consumed += len(data)
            self._output(data)
        if consumed:
            self._notify()
        if consumed >= _PASS_BYTES:
            self._schedule_pump()
        moved_in = self._push_input()
        self._drain()
        return bool(consumed or moved_in)

    def _output(self, data: bytes) -> None:
        self.stats["out"] += len(data)
        if self.log is not None:
            self.log.write(data)
        if self.sink is not None:
            self.sink(data)
        if self.master < 0:
            return
        self.buffer += data
        over = len(self.buffer) - self.config.limit
        if over > 0 and self.config.policy == "discard":
            del self.buffer[:over]  # R11: keep the newest ``limit`` bytes
            self.stats["discarded"] += over
        self.stats["max_buffered"] = max(self.stats["max_buffered"], len(self.buffer))

    def _drain(self) -> None:
        """Write buffered output to the pty master (non-blocking)."""
        if self.master < 0 or self._loop is None:
            return
        while self.buffer:
            try:
                n = os.write(self.master, self.buffer[:65536])
            except BlockingIOError:
                break
            except OSError:
                self.buffer.clear()  # the pty is unusable: nothing will ever drain
                break
            del self.buffer[:n]
        want = bool(self.buffer)
        if want != self._writer_on:
            self._writer_on = want
            if want:
                self._loop.add_writer(self.master, self._writable)
            else:
                self._loop.remove_writer(self.master)

    def _writable(self) -> None:
        before = len(self.buffer)
        self._drain()
        if self.config.policy == "block" and before >= self.config.limit > len(self.buffer):
            self._service()  # room again: resume consuming the ring

    def feed(self, data: bytes) -> int:
        """Queue keyboard input for the guest; returns bytes accepted (bounded queue)."""
        room = self.config.input_limit - len(self.inbuf)
        take = bytes(data[: max(0, room)])
        self.inbuf += take
        self._push_input()
        return len(take)

    def _push_input(self) -> int:
        moved = 0
        while self.inbuf:
            n = self.ring.write(self.inbuf[:XENCONS_IN_SIZE])
            if not n:
                break
            del self.inbuf[:n]
            moved += n
        if moved:
            self.stats["in"] += moved
            self._notify()  # after the in_prod update
        self._want_input(len(self.inbuf) < self.config.input_limit)
        return moved

    def _want_input(self, want: bool) -> None:
        if self.master < 0 or self._loop is None or want == self._reader_on:
            return
        self._reader_on = want
        if want:
            self._loop.add_reader(self.master, self._readable)
        else:
            self._loop.remove_reader(self.master)

    def _readable(self) -> None:
        room = self.config.input_limit - len(self.inbuf)
        try:
            data = os.read(self.master, min(_PTY_READ, max(room, 1)))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EIO: no slave open (cannot happen while we hold one) or closed
            self._want_input(False)
            return
        self.inbuf += data
        self._push_input()


# --------------------------------------------------------------------------- toolstack


async def publish_primary_console(client: XenstoreClient, domid: int, *, port: int, ring_ref: int,
                                  backend_domid: int = 0, backend_type: str = "xenconsoled",
                                  limit: int = DEFAULT_LIMIT, timeout: float = 5.0) -> str:
    """Toolstack (dom0): publish console 0 of ``domid`` (§8.2); returns its path.

    The directory is owned by ``backend_domid`` (dom0) and only readable by the guest,
    so the guest cannot rewrite ``tty``, ``limit``, ``output`` or ``type`` (R14).
    ``ring_ref`` is the page's frame number (on the loopback emulator, a frame of the
    guest's frame namespace when the frontend publishes one; backends that map grant
    ref 0 only need a value that changes when the page changes).
    """
    path = console_path(domid)

    async def body(t: XenstoreNodes) -> None:
        await t.write(path, b"")
        await t.set_perms(path, [f"n{backend_domid}", f"r{domid}"])
        for key, value in ((KEY_RING_REF, ring_ref), (KEY_PORT, port), (KEY_TYPE, backend_type),
                           (KEY_OUTPUT, CONSOLE_OUTPUT_PTY), (KEY_LIMIT, limit), (KEY_TTY, ""),
                           (KEY_BACKEND_ID, backend_domid)):
            await t.write(f"{path}/{key}", str(value).encode())

    await client.transact(body, timeout=timeout)
    return path


async def remove_primary_console(client: XenstoreClient, domid: int, timeout: float = 5.0) -> None:
    """Toolstack: remove ``/local/domain/<domid>/console``."""
    with contextlib.suppress(XenstoreError):
        await client.rm(console_path(domid), timeout=timeout)


# --------------------------------------------------------------------------- primary


class PrimaryConsoleServer:
    """Serves console 0 of one guest (§8.2), the way xenconsoled does.

    Watches ``/local/domain/<domid>/console``; on every event re-reads ``ring-ref`` and
    ``port`` (strictly parsed), maps grant ref 0 of the guest and binds the port, and
    re-does either when it changes.  Writes the pty path to ``tty``.
    """

    def __init__(self, platform: Platform, client: XenstoreClient, domid: int,
                 config: ConsoleConfig, *,
                 sink: Callable[[bytes], None] | None = None, op_timeout: float = 5.0) -> None:
        """Serve ``domid`` through ``platform`` (grants, events) and ``client`` (xenstore)."""
        self.platform = platform
        self.client = client
        self.domid = domid
        self.config = config
        self.sink = sink
        self.op_timeout = op_timeout
        self.path = console_path(domid)
        self.session: ConsoleSession | None = None
        self._key: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        self._ready = asyncio.Event()
        #: Peer errors seen (bad ring-ref/port values); the console is not served then.
        self.errors: list[str] = []

    async def start(self) -> None:
        """Register the watch and serve in the background."""
        watch = self.client.watch(self.path, max_pending=4, timeout=self.op_timeout)
        await watch.register()
        self._task = asyncio.create_task(self._run(watch), name=f"console {self.domid}")

    async def wait_ready(self, timeout: float = 10.0) -> ConsoleSession:
        """Wait until a session serves the console."""
        await asyncio.wait_for(self._ready.wait(), timeout)
        assert self.session is not None
        return self.session

    async def _run(self, watch: XenstoreWatch) -> None:
        async def forward() -> None:
            with contextlib.suppress(Exception):
                async for _ in watch:
                    self._kick.set()
            self._kick.set()

        fwd = asyncio.create_task(forward())
        try:
            while True:
                await self._kick.wait()
                self._kick.clear()
                if not self.client.connected:
                    break
                await self._sync()
        finally:
            fwd.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(watch.unregister(), self.op_timeout)
            self._stop_session()

    async def _read(self, key: str) -> bytes | None:
        try:
            return await self.client.read(f"{self.path}/{key}", timeout=self.op_timeout)
        except XenstoreError as exc:
            if exc.errno_name == "ENOENT":
                return None
            raise

    async def _sync(self) -> None:
        try:
            ref_raw = await self._read(KEY_RING_REF)
            port_raw = await self._read(KEY_PORT)
        except (XenstoreError, TimeoutError) as exc:
            log.warning("dom%d console: %r", self.domid, exc)
            return
        if ref_raw is None or port_raw is None:
            self._stop_session()  # not set up (yet), or the domain went away
            return
        try:
            ring_ref = _keys.parse_uint(ref_raw, KEY_RING_REF)
            port = _keys.parse_port(port_raw, KEY_PORT)
        except PeerError as exc:
            self.errors.append(str(exc))
            log.warning("dom%d console: %s", self.domid, exc)
            self._stop_session()
            return
        if self._key == (ring_ref, port) and self.session is not None:
            return
        self._stop_session()
        try:
            self.session = self._open(port)
        except PlatformError as exc:
            self.errors.append(str(exc))
            log.warning("dom%d console: cannot connect: %s", self.domid, exc)
            return
        self._key = (ring_ref, port)
        if self.session.tty_path is not None:
            with contextlib.suppress(XenstoreError, TimeoutError):
                await self.client.write(f"{self.path}/{KEY_TTY}", self.session.tty_path,
                                        timeout=self.op_timeout)
        self._ready.set()

    def _open(self, port: int) -> ConsoleSession:
        # §8.2 step 3: map the guest's grant ref 0 (GNTTAB_RESERVED_CONSOLE)
        return serve_console(self.platform, self.domid, GNTTAB_RESERVED_CONSOLE, port,
                             self.config, f"guest-{self.domid}", self.sink)

    def _stop_session(self) -> None:
        self._ready.clear()
        self._key = None
        if self.session is not None:
            session, self.session = self.session, None
            session.close()

    async def close(self) -> None:
        """Stop serving and release everything (idempotent)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        self._stop_session()


def serve_console(platform: Platform, domid: int, ref: int, remote_port: int,
                  config: ConsoleConfig, name: str,
                  sink: Callable[[bytes], None] | None = None) -> ConsoleSession:
    """Map grant ``ref`` of ``domid``, bind its ``remote_port`` and start a session on
    them; the session releases both when it closes.  Nothing is left held on failure:
    a :class:`PlatformError` from the map or the bind propagates."""
    res = DeviceResources(platform.grants, platform.events)
    with res.undo_on_error():
        mapping = res.map(domid, [ref], writable=True)
        port = res.bind(domid, remote_port)
        ring = ConsoleRing(mapping.mem, backend=True)
        session = ConsoleSession(ring, platform.events, port, config, name=name, sink=sink,
                                 release=res.release)
        session.start()
    return session


# --------------------------------------------------------------------------- secondary


class ConsoleBackendDriver(BackendDriver):
    """Backend of a secondary console ``backend/console/<fe>/<n>`` (§8.3)."""

    def __init__(self, platform: Platform, client: XenbusClient, path: str,
                 config: ConsoleConfig, *,
                 sink: Callable[[bytes], None] | None = None, **kw: Any) -> None:
        """Serve ``path`` (see :class:`BackendDriver`)."""
        super().__init__(client, path, **kw)
        self.platform = platform
        self.config = config
        self.sink = sink
        self.session: ConsoleSession | None = None

    async def connect(self, peer: PeerKeys) -> None:
        """Read ``ring-ref`` and ``port`` strictly, map and bind, serve; write ``tty``."""
        ref = await peer.grant_ref(KEY_RING_REF)
        port = await peer.port(KEY_PORT)
        name = f"guest-{self.peer_domid}-{self.path.rsplit('/', 1)[1]}"
        try:
            self.session = serve_console(self.platform, self.peer_domid, ref, port,
                                         self.config, name, self.sink)
        except PlatformError as exc:  # the ref or port the frontend wrote is unusable
            raise _ConsolePeerError(f"cannot use ring-ref {ref}, port {port}: {exc}") from None
        if self.session.tty_path is not None:
            # the backend directory's copy is the one to trust (R14: the guest can
            # rewrite its own frontend directory); the frontend copy is where Xen's
            # tools look
            for where in (self.path, self.peer_path):
                with contextlib.suppress(XenstoreError, TimeoutError):
                    await self.client.write(f"{where}/{KEY_TTY}", self.session.tty_path,
                                            timeout=self.op_timeout)

    async def disconnect(self) -> None:
        """Stop the session (unmaps and unbinds)."""
        if self.session is not None:
            session, self.session = self.session, None
            session.close()


class _ConsolePeerError(PeerError):
    """The frontend's ring-ref/port cannot be used."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = _errno.EINVAL


class ConsoleBackend:
    """Serves console 0 of guests and every secondary console of this domain.

    Console 0 is served for the ``domids`` given, or with ``all_domains`` for every
    domain under ``/local/domain`` (a dom0-owned directory), found again on each
    ``@introduceDomain``/``@releaseDomain``, as xenconsoled does; at most
    ``max_domains``.  Everything the backend decides comes from its arguments (R14).
    """

    def __init__(self, platform: Platform, client: XenbusClient,
                 config: ConsoleConfig | None = None, *,
                 domids: Iterable[int] = (), all_domains: bool = False,
                 secondary: bool = True, max_domains: int = 1024,
                 sink: Callable[[int, bytes], None] | None = None) -> None:
        """Prepare; :meth:`start` begins serving."""
        self.platform = platform
        self.client = client
        self.config = config or ConsoleConfig()
        self.domids = tuple(domids)
        self.all_domains = all_domains
        self.secondary = secondary
        self.max_domains = max_domains
        self._sink = sink
        self.primaries: dict[int, PrimaryConsoleServer] = {}
        self.watcher: BackendWatcher | None = None
        self._domlist: asyncio.Task[None] | None = None

    def _sink_for(self, domid: int) -> Callable[[bytes], None] | None:
        if self._sink is None:
            return None
        fn = self._sink
        return lambda data: fn(domid, data)

    async def _serve(self, domid: int) -> None:
        srv = PrimaryConsoleServer(self.platform, self.client, domid, self.config,
                                   sink=self._sink_for(domid))
        await srv.start()
        self.primaries[domid] = srv

    async def start(self) -> None:
        """Start the primary servers and the secondary-console watcher."""
        for d in self.domids:
            await self._serve(d)
        if self.all_domains:
            watches = [self.client.watch(w, max_pending=4) for w in
                       ("@introduceDomain", "@releaseDomain")]
            for w in watches:
                await w.register()
            self._domlist = asyncio.create_task(self._follow_domains(watches))
        if self.secondary:
            def factory(client: XenbusClient, path: str) -> ConsoleBackendDriver:
                fe = int(path.rstrip("/").split("/")[-2])
                return ConsoleBackendDriver(self.platform, client, path, self.config,
                                            sink=self._sink_for(fe))

            self.watcher = BackendWatcher(self.client, self.platform.domid, "console", factory)
            await self.watcher.start()

    async def _follow_domains(self, watches: Sequence[XenstoreWatch]) -> None:
        kick = asyncio.Event()

        async def forward(w: XenstoreWatch) -> None:
            with contextlib.suppress(Exception):
                async for _ in w:
                    kick.set()
            kick.set()

        forwarders = [asyncio.create_task(forward(w)) for w in watches]
        try:
            while self.client.connected:
                await kick.wait()
                kick.clear()
                await self._rescan()
        finally:
            for f in forwarders:
                f.cancel()
            for w in watches:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(w.unregister(), 5.0)

    async def _rescan(self) -> None:
        try:
            names = await self.client.directory("/local/domain", timeout=5.0)
        except (XenstoreError, TimeoutError) as exc:
            log.warning("console backend: cannot list domains: %r", exc)
            return
        own = self.platform.domid
        live = {int(n) for n in names if n.isdigit() and len(n) <= 5} - {own}
        for gone in set(self.primaries) - live - set(self.domids):
            await self.primaries.pop(gone).close()
        for d in sorted(live - set(self.primaries)):
            if len(self.primaries) >= self.max_domains:
                log.warning("console backend: serving %d domains already", self.max_domains)
                break
            await self._serve(d)

    async def close(self) -> None:
        """Stop everything (bounded, idempotent)."""
        if self._domlist is not None:
            self._domlist.cancel()
            with contextlib.suppress(BaseException):
                await self._domlist
            self._domlist = None
        if self.watcher is not None:
            await self.watcher.close()
            self.watcher = None
        for srv in self.primaries.values():
            await srv.close()
        self.primaries.clear()

"""Asyncio driver base for the two ends of a xenbus device.

Theory of operation
-------------------
A driver instance serves one device directory (its *own* path) and talks to the other
end through xenstore only; grant tables and event channels are the subclass's business
(they reach it as constructor arguments, never as imports).  Everything the protocol
decides is decided by a sans-IO :class:`~xenpv.xenbus.machine.XenbusMachine`; the driver
only turns the world into machine inputs and the machine's actions into I/O and hook
calls:

* Two watches (the peer's ``state`` node and the own directory, which covers the own
  ``state``, ``online`` and ``hotplug-status``) do nothing but set one
  :class:`asyncio.Event` (*kick*).  Watch events are hints: the run loop never queues
  states, it re-reads the current values after every kick.  A peer that rewrites its
  state 10^5 times a second therefore costs at most one round of reads per loop pass, and
  memory stays flat (scenario 20; the client's per-watch pending set is bounded too).
* One task (the *run loop*) owns the machine: it drains local commands (close,
  reconnect), re-reads the nodes, feeds the machine and executes the returned actions in
  order.  A hook that raises a :class:`~xenpv.errors.PeerError` becomes
  :meth:`~XenbusMachine.peer_error` (the peer is marked misbehaving, the error node is
  written, the device goes Closing); any other exception becomes
  :meth:`~XenbusMachine.local_error`.  Errors while handling an error are only logged, so
  error handling cannot recurse.  Nothing a peer does escapes the loop as an exception
  (hostile-inputs.md R4).
* Every wait is bounded (R12): a frontend that is not Connected ``connect_timeout``
  seconds after it started (or re-initialised) records ``ETIMEDOUT`` and closes; a side
  stuck in Closing for ``close_timeout`` seconds goes Closed without the peer; every
  xenstore request and every hook call has its own timeout.  :meth:`close` therefore
  completes with a dead or unresponsive peer, and it can be called any number of times
  (R13).
* The own ``state`` node is written only when the state changes, and only inside a
  transaction that first checks that the node still exists: a directory removed by the
  toolstack is never re-created; its disappearance destroys the driver.

Subclass hooks (all ``async``; each must tolerate being undone at any point):

========================  ==============================================================
``publish_features()``    backend, before InitWait: write what the frontend needs
``publish(backend)``      frontend: read backend features, set up rings, write the keys
``connect(peer)``         read the peer's connect-time keys with the strict parsers and
                          start the device
``disconnect()``          stop I/O, unmap/end grants, close ports; called only after
                          ``publish``/``connect`` ran (even if they failed half-way)
========================  ==============================================================

``peer`` is a :class:`PeerKeys` over the other end's directory.  Device paths and error
nodes follow xen-protocols.md §5.2; the state handshake is §5.3-5.4.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, ClassVar, Literal, Protocol

from xenpv.errors import LocalError, PeerError
from xenpv.xenbus import keys as _keys
from xenpv.xenbus.machine import (
    Action,
    BackendMachine,
    Connect,
    Destroy,
    Disconnect,
    FrontendMachine,
    FrontendStyle,
    Publish,
    PublishFeatures,
    Role,
    WriteError,
    WriteState,
    XenbusMachine,
)
from xenpv.xenbus.paths import (
    BackendPath,
    DevicePathError,
    FrontendPath,
    error_path,
    error_value,
    parse_backend_path,
    parse_frontend_path,
)
from xenpv.xenbus.states import BadKeyError, XenbusState, parse_state
from xenpv.xenstore.client import Transaction, Watch, XenstoreClient, XenstoreConnectionError
from xenpv.xenstore.wire import WireError, XenstoreError

__all__ = [
    "BackendDriver",
    "DeviceConfigError",
    "DeviceRemovedError",
    "FrontendDriver",
    "PeerKeys",
    "XenbusDriver",
]

log = logging.getLogger(__name__)

S = XenbusState
#: Pending events kept per watch; more collapse into one (events are only hints).
WATCH_PENDING = 4
#: Most ``feature-*`` keys read from a peer directory.
MAX_FEATURES = 256
#: Log lines per driver per ``_LOG_WINDOW`` seconds about a misbehaving peer.
_LOG_BURST = 10
_LOG_WINDOW = 10.0


class DeviceConfigError(LocalError):
    """The own device directory (written by the toolstack) is missing or inconsistent."""


class DeviceRemovedError(LocalError):
    """The own ``state`` node is gone: the toolstack removed the device.

    Raised by :meth:`XenbusDriver.write_keys` instead of re-creating the directory; inside
    a hook it makes the driver destroy itself.
    """


def _errno_of(exc: BaseException) -> int:
    for attr in ("errno",):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    if isinstance(exc, TimeoutError):
        return _errno.ETIMEDOUT
    return _errno.EIO


class PeerKeys:
    """Reads keys of one xenstore directory and parses them strictly (see :mod:`.keys`).

    Used for the peer's directory, whose contents are untrusted: a key the server refuses
    to show (``EACCES``: the peer changed its permissions) is a
    :class:`~xenpv.xenbus.states.BadKeyError`, as is any malformed value.
    """

    def __init__(self, client: XenstoreClient, path: str, timeout: float = 5.0) -> None:
        """Read below ``path`` through ``client``; each request waits at most ``timeout``."""
        self.client = client
        self.path = path
        self.timeout = timeout

    def key(self, name: str) -> str:
        """Absolute path of key ``name``."""
        return f"{self.path}/{name}"

    async def raw(self, name: str) -> bytes | None:
        """The value of ``name`` (None if it does not exist)."""
        try:
            return await self.client.read(self.key(name), timeout=self.timeout)
        except XenstoreError as exc:
            if exc.errno_name == "ENOENT":
                return None
            raise BadKeyError(f"cannot read peer key {name!r}: {exc.errno_name}") from None

    async def text(self, name: str, default: str | None = None, max_len: int = 256) -> str:
        """An ASCII string key (missing: ``default``, or BadKeyError if None)."""
        raw = await self.raw(name)
        if raw is None:
            if default is None:
                raise _keys.missing(name)
            return default
        if len(raw) > max_len or not raw.isascii():
            raise BadKeyError(f"peer key {name!r} is not a short ASCII string")
        return raw.decode("ascii")

    async def uint(
        self, name: str, lo: int = 0, hi: int = _keys.U32_MAX, default: int | None = None
    ) -> int:
        """A decimal key in ``lo..hi`` (missing: ``default``, or BadKeyError if None)."""
        raw = await self.raw(name)
        if raw is None and default is not None:
            return default
        return _keys.parse_uint(raw, name, lo, hi)

    async def grant_ref(self, name: str = "ring-ref") -> int:
        """A required grant reference."""
        return _keys.parse_grant_ref(await self.raw(name), name)

    async def port(self, name: str = "event-channel") -> int:
        """A required event-channel port."""
        return _keys.parse_port(await self.raw(name), name)

    async def feature(self, name: str, default: bool = False) -> bool:
        """A ``feature-*``/``request-*`` flag (absent: ``default``)."""
        return _keys.parse_bool(await self.raw(name), name, default)

    async def protocol(self, default: str = "x86_64-abi") -> str:
        """The ``protocol`` key (absent: ``default``)."""
        return _keys.parse_protocol(await self.raw("protocol"), default)

    async def ring_refs(self, max_order: int, prefix: str = "ring-ref") -> list[int]:
        """The grant refs of a (possibly multi-page) ring, in page order (§5.3).

        ``ring-page-order`` absent or 0: the single ``ring-ref``; else ``ring-ref0`` …
        ``ring-ref{2^order-1}``.  The order is checked against ``max_order`` before any
        further key is read, so a hostile order cannot make this read many keys.
        """
        order = _keys.parse_ring_page_order(await self.raw("ring-page-order"), max_order)
        if order == 0:
            return [await self.grant_ref(prefix)]
        return [await self.grant_ref(f"{prefix}{i}") for i in range(1 << order)]

    async def features(self, prefix: str = "feature-") -> dict[str, bool]:
        """Every ``feature-*`` key of the directory, parsed strictly."""
        try:
            names = await self.client.directory(self.path, timeout=self.timeout)
        except XenstoreError as exc:
            raise BadKeyError(f"cannot list peer directory: {exc.errno_name}") from None
        wanted = [n for n in names if n.startswith(prefix)]
        if len(wanted) > MAX_FEATURES:
            raise BadKeyError(f"peer directory has {len(wanted)} {prefix}* keys")
        out: dict[str, bool] = {}
        for name in wanted:
            raw = await self.raw(name)
            if raw is not None:
                out[name] = _keys.parse_bool(raw, name)
        return out


class XenbusDriver:
    """Common run loop of :class:`FrontendDriver` and :class:`BackendDriver`.

    ``client`` acts as the domain that owns ``path`` (the own device directory).
    Timeouts are in seconds; ``None`` disables ``connect_timeout``/``close_timeout``.
    """

    role: ClassVar[Role]
    #: Own keys naming the other end (written by the toolstack).
    peer_path_key: ClassVar[str]
    peer_id_key: ClassVar[str]
    #: Default connect timeout of the role (None: wait for the peer forever).
    default_connect_timeout: ClassVar[float | None] = None

    def __init__(
        self,
        client: XenstoreClient,
        path: str,
        *,
        connect_timeout: float | Literal["default"] | None = "default",
        close_timeout: float | None = 10.0,
        op_timeout: float = 5.0,
        hook_timeout: float = 30.0,
    ) -> None:
        """Prepare the driver; :meth:`start` reads the directory and begins."""
        self.client = client
        self.path = path.rstrip("/")
        self.error_path = error_path(self.path)
        self.connect_timeout: float | None = (
            self.default_connect_timeout if connect_timeout == "default" else connect_timeout
        )
        self.close_timeout = close_timeout
        self.op_timeout = op_timeout
        self.hook_timeout = hook_timeout
        self.peer_path = ""
        self.peer_domid = -1
        self.machine: XenbusMachine | None = None
        #: Counters: loop passes, transitions, peer errors, local errors, timeouts.
        self.stats = {"passes": 0, "writes": 0, "peer_errors": 0, "local_errors": 0, "timeouts": 0}
        self._kick = asyncio.Event()
        self._changed = asyncio.Event()
        self._commands: deque[Callable[[], list[Action]]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._forwarders: list[asyncio.Task[None]] = []
        self._watches: list[Watch] = []
        self._done = asyncio.Event()
        self._finalized = False
        self._closing = False
        self._written: XenbusState | None = None
        self._resources = False
        self._phase: XenbusState | None = None
        self._phase_since = 0.0
        self._log_times: deque[float] = deque(maxlen=_LOG_BURST)

    # -- public API ------------------------------------------------------------------
    @property
    def state(self) -> XenbusState:
        """The own state last written (Unknown before start and once destroyed)."""
        if self.machine is None or self.machine.destroyed or self._written is None:
            return S.Unknown
        return self._written

    @property
    def peer_state(self) -> XenbusState | None:
        """The last peer state read (None: not read yet or malformed)."""
        return self.machine.peer if self.machine is not None else None

    @property
    def misbehaving(self) -> bool:
        """True while the peer is marked misbehaving (cleared by a reconnect)."""
        return self.machine is not None and self.machine.misbehaving

    @property
    def done(self) -> bool:
        """True once the run loop has ended (destroyed, closed or connection lost)."""
        return self._done.is_set()

    async def start(self) -> None:
        """Read the own directory, check it, register the watches and start the run loop.

        Raises :class:`DeviceConfigError` if the directory is unusable (nothing is left
        running then).
        """
        if self._task is not None:
            raise LocalError("driver already started")
        try:
            own_raw = await self._read(f"{self.path}/state")
            if own_raw is None:
                raise DeviceConfigError(f"{self.path}/state does not exist")
            peer_path = await self._read(f"{self.path}/{self.peer_path_key}")
            peer_id = await self._read(f"{self.path}/{self.peer_id_key}")
            if peer_path is None or peer_id is None:
                raise DeviceConfigError(
                    f"{self.path} lacks {self.peer_path_key}/{self.peer_id_key}"
                )
            await self._check_peer(peer_path, peer_id)
            self.machine = await self._make_machine(own_raw)
            self._written = self.machine.state
            for path in (f"{self.peer_path}/state", self.path):
                watch = self.client.watch(path, max_pending=WATCH_PENDING, timeout=self.op_timeout)
                await watch.register()
                self._watches.append(watch)
                self._forwarders.append(asyncio.create_task(self._forward(watch)))
        except BaseException:
            await self._finalize()
            raise
        self._task = asyncio.create_task(self._run(), name=f"xenbus {self.path}")

    async def close(self) -> None:
        """Close the device (Closing/Closed handshake) and stop; bounded, idempotent."""
        if self._task is None or self._done.is_set():
            await self._finalize()
            return
        if not self._closing:
            self._closing = True
            self._post(self._machine().close)
        budget = (self.close_timeout or 0.0) + 4 * self.op_timeout + self.hook_timeout + 1.0
        try:
            await asyncio.wait_for(asyncio.shield(self._done.wait()), budget)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            await self._finalize()

    async def abort(self) -> None:
        """Stop at once without any handshake (the state node is left as it is)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._finalize()

    async def wait_state(self, *states: XenbusState, timeout: float = 10.0) -> XenbusState:
        """Wait (at most ``timeout`` s) until the own state is one of ``states``.

        Raises :class:`TimeoutError`, or :class:`LocalError` if the loop ended first.
        """
        return await self._wait_until(lambda: self.state, states, timeout, "in state")

    async def wait_peer_state(self, *states: XenbusState, timeout: float = 10.0) -> XenbusState:
        """Wait (at most ``timeout`` s) until the peer's state, as last read, is one of
        ``states``.

        Raises :class:`TimeoutError`, or :class:`LocalError` if the loop ended first.
        """
        return await self._wait_until(lambda: self.peer_state, states, timeout,
                                      "with the peer in state")

    async def _wait_until(self, current: Callable[[], XenbusState | None],
                          states: tuple[XenbusState, ...], timeout: float,
                          what: str) -> XenbusState:
        async with asyncio.timeout(timeout):
            while True:
                now = current()
                if now is not None and now in states:
                    return now
                if self._done.is_set():
                    name = now.name if now is not None else "unknown"
                    raise LocalError(f"driver ended {what} {name}")
                self._changed.clear()
                waiter = asyncio.ensure_future(self._changed.wait())
                done_waiter = asyncio.ensure_future(self._done.wait())
                try:
                    await asyncio.wait({waiter, done_waiter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    done_waiter.cancel()

    async def wait_done(self, timeout: float = 10.0) -> None:
        """Wait (at most ``timeout`` s) until the run loop has ended."""
        await asyncio.wait_for(asyncio.shield(self._done.wait()), timeout)

    async def write_keys(self, items: Mapping[str, bytes | str | int]) -> None:
        """Write own keys in one transaction, unless the device directory is gone."""

        async def body(t: Transaction) -> None:
            if not await t.exists(f"{self.path}/state"):
                raise DeviceRemovedError(self.path)
            for name, value in items.items():
                data = value if isinstance(value, bytes) else str(value).encode()
                await t.write(f"{self.path}/{name}", data)

        await self.client.transact(body, timeout=self.op_timeout)

    # -- hooks -----------------------------------------------------------------------
    async def connect(self, peer: PeerKeys) -> None:
        """Hook: read the peer's connect-time keys and start the device."""

    async def disconnect(self) -> None:
        """Hook: stop I/O and release what publish/connect set up (may run twice)."""

    # -- subclass plumbing -----------------------------------------------------------
    def _paths(self, peer_path: bytes) -> tuple[FrontendPath, BackendPath]:
        """Parse (frontend path, backend path) from the own path and ``peer_path``."""
        raise NotImplementedError

    async def _check_peer(self, peer_path: bytes, peer_id: bytes) -> None:
        # §5.2 and R14: decide only from the own directory (written by the toolstack) and
        # from the peer directory's owner (only dom0 can set owners: XSA-352), never from
        # keys the peer can write.  Both paths must name the same frontend and devid.
        try:
            fe, be = self._paths(peer_path)
            peer_domid = _keys.parse_uint(peer_id, self.peer_id_key)
        except (DevicePathError, BadKeyError) as exc:
            raise DeviceConfigError(str(exc)) from None
        peer: FrontendPath | BackendPath = be if self.role is Role.FRONTEND else fe
        if peer.domid != peer_domid or be.frontend_domid != fe.domid or be.devid != fe.devid:
            raise DeviceConfigError(
                f"{self.peer_path_key} {str(peer)!r} does not match {self.path}"
            )
        if await self._peer_owner(str(peer)) != peer.domid:
            raise DeviceConfigError(f"{peer} is not owned by domain {peer.domid}")
        self.peer_path, self.peer_domid = str(peer), peer.domid

    async def _make_machine(self, own_raw: bytes) -> XenbusMachine:
        raise NotImplementedError

    async def _sync_own(self, machine: XenbusMachine) -> list[Action]:
        """Read own-directory inputs other than ``state`` (backend: online, hotplug)."""
        return []

    async def _peer_owner(self, peer_path: str) -> int:
        """Owner domid of the peer directory (only dom0 can set owners: XSA-352)."""
        try:
            perms = await self.client.get_perms(peer_path, timeout=self.op_timeout)
        except XenstoreError as exc:
            raise DeviceConfigError(f"cannot read {peer_path}: {exc.errno_name}") from None
        return perms[0].domid

    # -- run loop --------------------------------------------------------------------
    def _machine(self) -> XenbusMachine:
        if self.machine is None:
            raise LocalError("driver not started")
        return self.machine

    def _post(self, command: Callable[[], list[Action]]) -> None:
        self._commands.append(command)
        self._kick.set()

    async def _forward(self, watch: Watch) -> None:
        with contextlib.suppress(Exception):
            async for _event in watch:
                self._kick.set()
        self._kick.set()  # connection failed: let the loop notice

    async def _read(self, path: str) -> bytes | None:
        try:
            return await self.client.read(path, timeout=self.op_timeout)
        except XenstoreError as exc:
            if exc.errno_name == "ENOENT":
                return None
            raise

    async def _run(self) -> None:
        m = self._machine()
        try:
            await self._execute(m.start())
            while not m.destroyed:
                self.stats["passes"] += 1
                while self._commands and not m.destroyed:
                    try:
                        actions = self._commands.popleft()()
                    except LocalError as exc:
                        self._note(f"command refused: {exc}")
                        continue
                    await self._execute(actions)
                if not m.destroyed:
                    await self._sync(m)
                self._track_phase(m)
                if m.destroyed or (self._closing and m.state is S.Closed):
                    break
                if not self.client.connected:
                    raise XenstoreConnectionError("xenstore connection lost")
                await self._wait(m)
        except XenstoreConnectionError as exc:
            self._note(f"xenstore connection lost: {exc}")
        except (WireError, TimeoutError) as exc:
            self._note(f"xenstore failed: {exc!r}")
        finally:
            await self._finalize()

    async def _sync(self, m: XenbusMachine) -> None:
        try:
            if await self._read(f"{self.path}/state") is None:
                raise DeviceRemovedError(self.path)
            await self._execute(await self._sync_own(m))
            if m.destroyed:
                return
            try:
                raw = await self.client.read(f"{self.peer_path}/state", timeout=self.op_timeout)
            except XenstoreError as exc:
                if exc.errno_name != "ENOENT":
                    await self._execute(
                        m.peer_error(BadKeyError(f"peer state unreadable: {exc.errno_name}"))
                    )
                    return
                raw = None
            before = m.peer
            await self._execute(m.peer_state_raw(raw))
            if m.peer is not before:
                self._changed.set()  # wakes wait_peer_state (and wait_state, harmlessly)
        except DeviceRemovedError:
            await self._execute(m.removed())

    def _track_phase(self, m: XenbusMachine) -> None:
        if m.state is not self._phase:
            self._phase = m.state
            self._phase_since = time.monotonic()
            self._changed.set()

    def _deadline(self, m: XenbusMachine) -> tuple[float | None, str]:
        state = m.state
        if state is S.Closing and self.close_timeout is not None:
            return self._phase_since + self.close_timeout, "close"
        if self.connect_timeout is not None and (
            state in (S.Initialising, S.InitWait, S.Initialised)
            or (state is S.Closed and m.reconnect_requested)
        ):
            return self._phase_since + self.connect_timeout, "connect"
        return None, ""

    async def _wait(self, m: XenbusMachine) -> None:
        deadline, kind = self._deadline(m)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            async with asyncio.timeout(timeout):
                await self._kick.wait()
            self._kick.clear()
            return
        except TimeoutError:
            pass
        self.stats["timeouts"] += 1
        if kind == "close" or m.state is S.Closed:
            self._note(f"peer did not finish closing in {self.close_timeout}s; forcing Closed")
            await self._execute(m.force_close())
        else:
            message = f"{m._peer_role} did not connect within {self.connect_timeout}s"
            self._note(message)
            await self._execute(m.local_error(_errno.ETIMEDOUT, message))
        self._phase = None  # restart the clock even if the state did not change

    async def _execute(self, actions: list[Action], depth: int = 0) -> None:
        m = self._machine()
        for action in actions:
            try:
                await self._do(action)
            except DeviceRemovedError:
                if depth == 0:
                    await self._execute(m.removed(), depth + 1)
                return
            except (XenstoreConnectionError, asyncio.CancelledError):
                raise
            except PeerError as exc:
                self.stats["peer_errors"] += 1
                self._note(f"peer error during {action}: {exc}")
                if depth == 0:
                    await self._execute(m.peer_error(exc), depth + 1)
                return
            except Exception as exc:
                self.stats["local_errors"] += 1
                self._note(f"{action} failed: {exc!r}")
                if depth == 0:
                    await self._execute(
                        m.local_error(_errno_of(exc), str(exc) or repr(exc)), depth + 1
                    )
                return

    async def _hook(self, coro: object) -> None:
        async with asyncio.timeout(self.hook_timeout):
            await coro  # type: ignore[misc]

    async def _do(self, action: Action) -> None:
        if isinstance(action, WriteState):
            await self._write_state(action.state)
        elif isinstance(action, WriteError):
            await self.client.write(
                self.error_path, error_value(action.errno, action.message), timeout=self.op_timeout
            )
        elif isinstance(action, Disconnect):
            if self._resources:
                self._resources = False
                await self._hook(self.disconnect())
        elif isinstance(action, Connect):
            self._resources = True
            await self._hook(self.connect(self._peer_keys()))
        elif isinstance(action, Publish):
            self._resources = True
            await self._hook(self._publish())
        elif isinstance(action, PublishFeatures):
            await self._hook(self._publish_features())
        elif isinstance(action, Destroy):
            pass  # the machine is now inert; the loop ends
        self._track_phase(self._machine())

    async def _publish(self) -> None:
        raise LocalError("Publish is a frontend action")

    async def _publish_features(self) -> None:
        raise LocalError("PublishFeatures is a backend action")

    def _peer_keys(self) -> PeerKeys:
        return PeerKeys(self.client, self.peer_path, self.op_timeout)

    async def _write_state(self, state: XenbusState) -> None:
        if state is self._written:
            return

        async def body(t: Transaction) -> None:
            if not await t.exists(f"{self.path}/state"):
                raise DeviceRemovedError(self.path)
            await t.write(f"{self.path}/state", state.encode())

        await self.client.transact(body, timeout=self.op_timeout)
        self._written = state
        self.stats["writes"] += 1
        self._changed.set()

    def _note(self, message: str) -> None:
        now = time.monotonic()
        if len(self._log_times) == _LOG_BURST and now - self._log_times[0] < _LOG_WINDOW:
            return
        self._log_times.append(now)
        log.warning("%s: %s", self.path, message)

    async def _finalize(self) -> None:
        if self._finalized:
            return
        self._finalized = True
        try:
            for task in self._forwarders:
                task.cancel()
            for watch in self._watches:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(watch.unregister(), self.op_timeout)
            if self._resources:
                self._resources = False
                with contextlib.suppress(Exception):
                    await self._hook(self.disconnect())
            await asyncio.gather(*self._forwarders, return_exceptions=True)
        finally:
            self._done.set()
            self._changed.set()


class FrontendDriver(XenbusDriver):
    """Base of frontends: ``path`` is ``/local/domain/<fe>/device/<type>/<devid>``.

    Set ``style`` to :attr:`FrontendStyle.DIRECT` for net-style frontends (Initialising →
    Connected on backend InitWait) or :attr:`FrontendStyle.EARLY` to publish without
    waiting for InitWait.  Override :meth:`publish`, :meth:`connect`, :meth:`disconnect`.
    """

    role = Role.FRONTEND
    peer_path_key = "backend"
    peer_id_key = "backend-id"
    default_connect_timeout = 30.0
    style: ClassVar[FrontendStyle] = FrontendStyle.STANDARD

    async def publish(self, backend: PeerKeys) -> None:
        """Hook: read backend features, set up rings and ports, write the own keys."""

    async def reconnect(self) -> None:
        """Close the connection (if any) and re-initialise once the backend is Closed."""
        self._post(self._machine().reconnect)

    async def _publish(self) -> None:
        await self.publish(self._peer_keys())

    def _paths(self, peer_path: bytes) -> tuple[FrontendPath, BackendPath]:
        return parse_frontend_path(self.path), parse_backend_path(peer_path)

    async def _make_machine(self, own_raw: bytes) -> XenbusMachine:
        try:
            own = parse_state(own_raw)
        except PeerError:
            own = S.Closed
        if own not in (S.Initialising, S.Initialised, S.Connected, S.Closing, S.Closed):
            own = S.Closed  # not a frontend state: nothing of ours is live; start over
        return FrontendMachine(self.style, initial=own)


class StoppableRing(Protocol):
    """What :meth:`BackendDriver.watch_ring` needs of a ring service."""

    async def wait_stopped(self) -> PeerError | None:
        """Wait until the service stops; the peer error that stopped it, if any."""
        ...


class BackendDriver(XenbusDriver):
    """Base of backends: ``path`` is ``/local/domain/<be>/backend/<type>/<fe>/<devid>``.

    Set ``wait_hotplug = True`` to connect only after the hotplug script wrote
    ``hotplug-status = connected`` (``error`` closes the device with the message of
    ``hotplug-error``).  Override :meth:`publish_features`, :meth:`connect`,
    :meth:`disconnect`.
    """

    role = Role.BACKEND
    peer_path_key = "frontend"
    peer_id_key = "frontend-id"
    default_connect_timeout = None
    wait_hotplug: ClassVar[bool] = False

    _hotplug_failed = False
    _watchers: list[asyncio.Task[None]]

    def __init__(self, client: XenstoreClient, path: str, **kwargs: Any) -> None:
        """See :class:`XenbusDriver`."""
        super().__init__(client, path, **kwargs)
        self._watchers = []

    async def publish_features(self) -> None:
        """Hook: write what the frontend needs before it builds rings (§5.3 step 1)."""

    async def _publish_features(self) -> None:
        await self.publish_features()

    def _paths(self, peer_path: bytes) -> tuple[FrontendPath, BackendPath]:
        return parse_frontend_path(peer_path), parse_backend_path(self.path)

    def watch_ring(self, service: StoppableRing) -> None:
        """Fail the device closed when ``service`` stops because the frontend broke its
        ring (R4); ends with :meth:`stop_watchers`."""
        self.start_watcher(self._ring_stopped(service))

    def start_watcher(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` for the connection's lifetime (cancelled by :meth:`stop_watchers`)."""
        self._watchers.append(asyncio.create_task(coro))

    def stop_watchers(self) -> None:
        """Cancel every watcher started for the connection (call first in ``disconnect``)."""
        watchers, self._watchers = self._watchers, []
        for w in watchers:
            w.cancel()

    async def _ring_stopped(self, service: StoppableRing) -> None:
        error = await service.wait_stopped()
        if error is not None and self.machine is not None and not self.machine.destroyed:
            machine = self.machine
            self._post(lambda: machine.peer_error(error))

    async def _online(self) -> bool:
        # Linux xenbus_dev_is_online(): a missing or non-numeric node reads as 0.
        return await self._read(f"{self.path}/online") not in (None, b"0")

    async def _make_machine(self, own_raw: bytes) -> XenbusMachine:
        try:
            own = parse_state(own_raw)
        except PeerError:
            own = S.Initialising
        return BackendMachine(initial=own, online=await self._online(), ready=not self.wait_hotplug)

    async def _sync_own(self, machine: XenbusMachine) -> list[Action]:
        actions = machine.online_changed(await self._online())
        if self.wait_hotplug and not machine.destroyed:
            status = await self._read(f"{self.path}/hotplug-status")
            if status == b"connected":
                actions += machine.local_ready(True)
            elif status == b"error" and not self._hotplug_failed:
                self._hotplug_failed = True
                detail = await self._read(f"{self.path}/hotplug-error") or b"hotplug script failed"
                actions += machine.local_error(_errno.EIO, detail[:256].decode("ascii", "replace"))
            elif status != b"error" and machine.flags.ready:
                actions += machine.local_ready(False)
        return actions

"""A hostile xenbus frontend against the asyncio backend driver base (target ``xenbus:driver``).

Theory of operation
-------------------
:mod:`xenpv.fuzz.xenbus` attacks the sans-IO xenbus machine directly; this target attacks
the whole asyncio layer on top of it (:class:`~xenpv.xenbus.driver.BackendDriver`: the
watches, the run loop, the hooks, the strict key readers) the way a real hostile guest
would: through xenstore.  Every input gets a fresh *world*, all in this process:

* an embedded :class:`~xenpv.xenstore.server.XenstoredServer` on temporary Unix sockets
  (write rate limit lifted, so a flood is a flood), with one client per domain: dom0 (the
  toolstack, which creates the device with :func:`~xenpv.xenbus.toolstack.add_device`),
  the frontend domain ``FE`` and the backend domain ``BE``;
* an :class:`~xenpv.platforms.loopback.harness.InProcessMachine` (grants, event channels);
* the victim: a backend driver acting as ``BE`` (default :class:`ToyBackend`, which maps
  one granted ring page and binds one event channel; any factory
  ``factory(client, path, platform, **timeouts) -> BackendDriver`` can stand in);
* the hostile frontend: the ``FE`` client and platform, which plays the input as up to
  :data:`MAX_OPS` operations: state values (legal, illegal jumps, garbage, 2 KiB), its
  connect-time keys (good, garbage, out of range, refs it never granted, ports it never
  offered), pipelined floods of its state node, removing or hiding (permissions) its state
  node, granting or revoking its page, unbinding its port, and pauses that let the driver
  run in between.

Invariant, checked per input (any breach raises
:class:`~xenpv.fuzz.hostile.InvariantViolation`):

1. nothing escapes the driver: its run loop ends only the way the protocol says (the
   frontend's state Unknown or missing: the device is gone, §5.4), holding nothing;
2. bounded queues: during floods every watch of the driver holds at most
   :data:`~xenpv.xenbus.driver.WATCH_PENDING` events and the server at most the
   ``watch_events`` quota for ``BE``;
3. once the peer stops, the driver settles (within :data:`SETTLE_S`) in a consistent
   state: its state node says what the driver says; Connected exactly when it holds the
   mapping and the port; InitWait, Closing or Closed otherwise (a peer error always leaves
   it Closing or Closed and marked misbehaving);
4. :meth:`close` completes within its bound, the driver holds nothing, and after the
   hostile domain's own handles are closed the emulator holds nothing at all
   (``assert_released``);
5. the whole input takes at most :data:`INPUT_BUDGET_S` (no hang).

The world (:func:`xenstore_world`) and the victim (:class:`ToyBackend`) are also what the
xenbus integration and hostile tests run their device pairs on.  The device driver targets
(:mod:`xenpv.fuzz.block_driver`, :mod:`xenpv.fuzz.net_driver`, :mod:`xenpv.fuzz.kbd_driver`)
play their inputs with :func:`play_input` and check the invariants they share with the
helpers here: :func:`no_escapes`, :func:`calls_end`, :func:`settled`,
:func:`backend_let_go`, :func:`frontend_let_go`; their hostile guests grant their pages
as :class:`GuestPages`, their hostile backends write their keys with
:func:`hostile_keys` and play the connection with :func:`hostile_backend`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.fuzz.hostile import InvariantViolation, violation
from xenpv.fuzz.source import ByteSource
from xenpv.platforms.base import SharedPages
from xenpv.platforms.loopback.harness import InProcessMachine
from xenpv.testing.world import DomainWorld, domain_world
from xenpv.xenbus import BackendDriver, BadKeyError, PeerKeys, XenbusState, add_device
from xenpv.xenbus.driver import WATCH_PENDING
from xenpv.xenstore.client import Perm, XenstoreClient
from xenpv.xenstore.server import XenstoredServer
from xenpv.xenstore.store import Quotas
from xenpv.xenstore.wire import XenstoreError, XsType

__all__ = [
    "BE",
    "FE",
    "INPUT_BUDGET_S",
    "MAX_OPS",
    "SETTLE_S",
    "DriverTarget",
    "ToyBackend",
    "World",
    "xenstore_world",
]

FE, BE = 3, 2
DEVTYPE = "fuzz"
S = XenbusState
#: Operations of the hostile frontend per input.
MAX_OPS = 24
#: Seconds the driver has to settle once the peer stops.
SETTLE_S = 3.0
#: Hard bound on one input, world set-up and tear-down included.
INPUT_BUDGET_S = 20.0


def play_input(name: str, what: str, run: Callable[[], Coroutine[Any, Any, None]],
               loggers: Sequence[str]) -> None:
    """Play one input of a driver-world target: ``run()`` on a fresh event loop within
    ``INPUT_BUDGET_S``, the ``loggers`` of expected peer-error notes muted meanwhile.

    A hang, an exception that escapes or an overrun is an :class:`InvariantViolation`
    naming target ``name`` (and ``what`` world raised).
    """
    started = time.monotonic()
    quiet = [logging.getLogger(n) for n in loggers]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    try:
        asyncio.run(asyncio.wait_for(run(), INPUT_BUDGET_S))
    except InvariantViolation:
        raise
    except TimeoutError:
        raise InvariantViolation(
            f"one {name} input took over {INPUT_BUDGET_S} s (hang)") from None
    except Exception as e:
        raise violation(f"the {what} world raised", e) from None
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    if time.monotonic() - started > INPUT_BUDGET_S:
        raise InvariantViolation(f"one {name} input took over {INPUT_BUDGET_S} s")
@contextlib.contextmanager
def no_escapes() -> Iterator[None]:
    """While the block runs, collect what escapes the running event loop (an exception in
    a callback, or in a task nobody awaits); when it ends, the first one is an
    :class:`InvariantViolation`."""
    escaped: list[BaseException] = []
    asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: escaped.append(
        ctx.get("exception") or RuntimeError(str(ctx.get("message")))))
    yield
    if escaped:
        raise violation("an exception escaped the event loop", escaped[0])


async def calls_end(jobs: Sequence[asyncio.Future[Any]],
                    allowed: tuple[type[BaseException], ...], timeout: float = 5.0) -> None:
    """Every API call of a frontend under attack (``jobs``) ended within ``timeout``, with
    a result or one of the ``allowed`` errors."""
    if not jobs:
        return
    done, pending = await asyncio.wait(jobs, timeout=timeout)
    if pending:
        raise InvariantViolation(f"{len(pending)} frontend calls never ended")
    for j in done:
        exc = j.exception()
        if exc is not None and not isinstance(exc, allowed):
            raise violation("a frontend call ended with an unexpected error", exc)


async def settled(busy: Callable[[], bool], what: Callable[[], str],
                  seconds: float = SETTLE_S) -> None:
    """Wait (polling) until ``busy()`` is false; still busy after ``seconds`` is an
    :class:`InvariantViolation` saying ``what()`` was not done."""
    deadline = time.monotonic() + seconds
    await asyncio.sleep(0)
    while busy() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    if busy():
        raise InvariantViolation(what())


class GuestPages:
    """A hostile guest's pool of ``count`` pages granted to the backend domain under attack
    (every fourth read-only): its requests point at them most of the time (:meth:`ref`),
    its input may revoke one under the backend's feet (:meth:`revoke`), and after teardown
    every one left must be endable (:func:`backend_let_go`)."""

    def __init__(self, guest: Any, backend: int, count: int) -> None:
        """Grant the pages."""
        self.guest = guest
        self.shares: list[SharedPages] = [guest.grants.grant(backend, 1, writable=k % 4 != 3)
                                          for k in range(count)]
        self.refs = [s.refs[0] for s in self.shares]

    def ref(self, src: ByteSource) -> int:
        """A grant ref for a hostile request: one of the pool's mostly (7 in 8), else any."""
        return src.choice(self.refs) if src.below(8) else src.u32()

    def pick(self, src: ByteSource) -> SharedPages:
        """A page of the pool (there must be one left)."""
        return self.shares[src.below(len(self.shares))]

    def revoke(self, src: ByteSource) -> None:
        """End the access to a page of the pool (there must be one left), if it can be
        ended (not while the backend maps it)."""
        share = self.pick(src)
        with contextlib.suppress(PlatformError, LocalError):
            self.guest.grants.end_access(share)
            self.shares.remove(share)


def backend_let_go(machine: InProcessMachine, pages: GuestPages) -> None:
    """After a backend under attack closed: it maps nothing, and every page the hostile
    guest granted it can be ended."""
    if machine.outstanding()["mappings"]:
        raise InvariantViolation("the backend left grants mapped after teardown")
    for share in pages.shares:
        try:
            pages.guest.grants.end_access(share)
        except PlatformError as exc:
            raise violation("a guest page stayed in use after teardown", exc) from None


def frontend_let_go(machine: InProcessMachine, frontend: Any) -> None:
    """After a frontend under attack closed: nothing is mapped, and no grant is left but
    those in the frontend's quarantine (pages a peer may still hold)."""
    frontend.quarantine.reap()
    out = machine.outstanding()
    if out["mappings"] or out["grants"] > len(frontend.quarantine):
        raise InvariantViolation(f"left held after teardown: {out}")


async def hostile_backend(w: World, frontend: Any, fp: str, bp: str,
                          published: tuple[bytes, ...], attach: Callable[[], Awaitable[None]],
                          attack: Callable[[], Awaitable[None]],
                          detach: Callable[[], None]) -> None:
    """A hostile backend's part of the connection against ``frontend`` (of device
    ``fp``/``bp``): InitWait, start the frontend; once it has published its keys (its
    state one of ``published``) ``attach()`` to its rings (a peer or platform error there
    is the frontend's doing: no rings) and say Connected; then ``attack()``.  A frontend
    that refuses to publish within 3 s is fine: like every other, it must still close
    cleanly; at the end it is closed, ``detach()`` lets go of the rings, the backend says
    Closed."""
    await w.be.write(f"{bp}/state", "2")
    await frontend.start()
    try:
        async with asyncio.timeout(3.0):
            while await w.be.read(f"{fp}/state") not in (*published, b"5", b"6"):
                await asyncio.sleep(0.01)
        if await w.be.read(f"{fp}/state") in published:
            with contextlib.suppress(PeerError, PlatformError):
                await attach()
            await w.be.write(f"{bp}/state", "4")
        await attack()
    except TimeoutError:
        pass
    finally:
        await frontend.close()
        detach()
        await w.be.write(f"{bp}/state", "6")


async def hostile_keys(client: XenstoreClient, path: str,
                       choices: Mapping[str, tuple[Sequence[str], Sequence[str]]],
                       src: ByteSource) -> None:
    """Write each key of ``choices`` (key → good values, hostile values) under ``path``:
    a good value most of the time (7 in 8), else a hostile one."""
    for key, (good, bad) in choices.items():
        await client.write(f"{path}/{key}", src.choice(good) if src.below(8) else src.choice(bad))


#: Timeouts handed to the victim (short: a fuzz input must not wait out real-world ones).
DRIVER_TIMEOUTS: dict[str, float] = {"close_timeout": 0.2, "op_timeout": 2.0, "hook_timeout": 2.0}
QUOTAS = Quotas(write_rate=0)

_STATES = [str(i).encode() for i in range(9)] + [b"99", b"-1", b" 4", b"4\0", b"", b"\xff\xfe",
                                                   str(2**40).encode(), b"4" * 2048]
_KEYS = ("ring-ref", "event-channel", "protocol", "multi-queue-num-queues", "ring-page-order",
         "ring-ref0", "feature-persistent", "toy-extra")
_GARBAGE = [b"", b"abc", b"-1", b"0", b"3", b"1x", b"4000", b"999999", str(2**40).encode(),
            b"x86_16-abi", b"x86_64-abi", b"yes", b"1", b"2", b"5", b"\0\0", b"7" * 300]

BackendFactory = Callable[..., BackendDriver]


@dataclass
class World(DomainWorld):
    """The xenstored, one client per domain (dom0, ``FE``, ``BE``) and the loopback
    emulator (:class:`~xenpv.testing.world.DomainWorld`), for devices of ``devtype``."""

    devtype: str = DEVTYPE

    @property
    def fe(self) -> XenstoreClient:
        """The frontend domain's client."""
        return self.clients[FE]

    @property
    def be(self) -> XenstoreClient:
        """The backend domain's client."""
        return self.clients[BE]

    async def add(self, devid: int = 0, **kwargs: Any) -> tuple[str, str]:
        """Create a device pair (FE's frontend, BE's backend) as the toolstack; returns
        the (frontend, backend) paths."""
        info = await add_device(self.dom0, self.devtype, FE, BE, devid, **kwargs)
        return info.frontend_path, info.backend_path


def xenstore_world(devtype: str, quotas: Quotas | None = None, *, max_grants: int = 128,
                   max_ports: int = 32,
                   prefix: str = "xenpv-xenbus-") -> contextlib.AbstractAsyncContextManager[World]:
    """An embedded xenstored on temporary Unix sockets serving dom0, FE and BE (their
    homes owned by them, as a toolstack leaves them) and an in-process emulator holding
    both domains, with room for ``max_grants`` and ``max_ports``; everything is closed
    afterwards (:func:`~xenpv.testing.world.domain_world`)."""
    return domain_world((FE, BE), World, quotas=quotas, max_grants=max_grants,
                        max_ports=max_ports, prefix=prefix, devtype=devtype)


class ToyBackend(BackendDriver):
    """The default victim: maps the frontend's one ring page and binds its event channel."""

    def __init__(self, client: XenstoreClient, path: str, platform: Any, **kw: Any) -> None:
        super().__init__(client, path, **kw)
        self.platform = platform
        self.mapping: Any = None
        self.port: int | None = None

    async def publish_features(self) -> None:
        """Advertise a feature and the ring limits the connect hook enforces."""
        await self.write_keys({"feature-toy": 1, "max-ring-page-order": 1,
                               "multi-queue-max-queues": 1})

    async def connect(self, frontend: PeerKeys) -> None:
        """Parse every frontend key strictly, then map the ring and bind the port."""
        await frontend.features()
        await frontend.protocol()
        await frontend.uint("multi-queue-num-queues", 1, 1, default=1)
        refs = await frontend.ring_refs(max_order=1)
        port = await frontend.port()
        try:
            self.mapping = self.platform.grants.map(self.peer_domid, refs)
            self.port = self.platform.events.bind_interdomain(self.peer_domid, port)
        except PlatformError as exc:  # the refs and the port came from the frontend
            raise BadKeyError(f"frontend ring/port refused: {exc}") from exc
        await self.write_keys({"toy-magic": 4660})

    async def disconnect(self) -> None:
        """Unbind the port and unmap the ring (whatever connect got as far as)."""
        if self.port is not None:
            port, self.port = self.port, None
            self.platform.events.unbind(port)
        if self.mapping is not None:
            mapping, self.mapping = self.mapping, None
            self.platform.grants.unmap(mapping)

    def holds(self) -> bool:
        """True while the driver holds the mapping or the port."""
        return self.mapping is not None or self.port is not None


class _HostileFrontend:
    """The frontend domain playing the input against its own device directory."""

    def __init__(self, client: XenstoreClient, platform: Any, fp: str, src: ByteSource) -> None:
        self.client, self.platform, self.fp, self.src = client, platform, fp, src
        self.grants: list[Any] = []
        self.ports: list[int] = []

    async def write(self, key: str, value: bytes) -> None:
        await self.client.write(f"{self.fp}/{key}", value)

    async def good_keys(self) -> None:
        pages = self.platform.grants.grant(BE, 1)
        self.grants.append(pages)
        port = self.platform.events.alloc_unbound(BE)
        self.ports.append(port)
        await self.write("ring-ref", str(pages.refs[0]).encode())
        await self.write("event-channel", str(port).encode())

    async def step(self, check_queues: Callable[[], None]) -> None:
        """Play one operation of the input."""
        src = self.src
        op = src.below(10)
        if op <= 2:
            await self.write("state", src.choice(_STATES))
        elif op == 3:
            await self.good_keys()
        elif op == 4:
            value = src.choice(_GARBAGE) if src.boolean() else src.take(src.below(16))
            await self.write(src.choice(_KEYS), value)
        elif op == 5:  # a flood of state writes, pipelined
            values = [src.choice(_STATES[:9]) for _ in range(1 + src.below(4))]
            payload = f"{self.fp}/state".encode() + b"\0"
            count = 16 * (1 + src.below(16))
            futs = [self.client.submit(XsType.WRITE, payload + values[i % len(values)])
                    for i in range(count)]
            for k in range(0, count, 32):
                await asyncio.gather(*futs[k : k + 32])
                check_queues()
        elif op == 6:
            what = src.below(3)
            if what == 0:
                await self.client.rm(f"{self.fp}/state")
            elif what == 1:  # hide the state node from the backend
                await self.client.set_perms(f"{self.fp}/state", [Perm("n", FE)])
            else:
                await self.client.rm(f"{self.fp}/{src.choice(_KEYS)}")
        elif op == 7:  # revoke or drop what it offered
            if self.ports and src.boolean():
                self.platform.events.unbind(self.ports.pop(src.below(len(self.ports))))
            elif self.grants:
                pages = self.grants[src.below(len(self.grants))]
                with contextlib.suppress(PlatformError):  # still mapped: the revoke fails
                    self.platform.grants.end_access(pages)
                    self.grants.remove(pages)
        else:  # let the driver run
            await asyncio.sleep(0.001 * src.below(20))


class DriverTarget:
    """The ``xenbus:driver`` target: one fresh world per input (callable)."""

    def __init__(self, factory: BackendFactory | None = None) -> None:
        self.factory: BackendFactory = factory or ToyBackend

    def __call__(self, data: bytes) -> None:
        """Play one input; raises InvariantViolation on a breach."""
        # thousands of expected peer-error notes
        play_input("xenbus:driver", "xenbus driver", lambda: self._run(data), ("xenpv.xenbus",))

    async def _run(self, data: bytes) -> None:
        async with xenstore_world(DEVTYPE, QUOTAS) as w:
            fp, bp = await w.add()
            await self._attack(data, w.server, w.machine, w.dom0, w.fe, w.be, fp, bp)

    async def _attack(self, data: bytes, server: XenstoredServer, machine: InProcessMachine,
                      dom0: XenstoreClient, fe_client: XenstoreClient,
                      be_client: XenstoreClient, fp: str, bp: str) -> None:
        fe_platform = machine.domain(FE)
        driver = self.factory(be_client, bp, machine.domain(BE), **DRIVER_TIMEOUTS)
        await driver.start()
        peer = _HostileFrontend(fe_client, fe_platform, fp, ByteSource(data))

        def check_queues() -> None:
            pending = max((w.pending for w in driver._watches), default=0)
            if pending > WATCH_PENDING:
                raise InvariantViolation(f"a driver watch holds {pending} events (R16)")
            queued = server.queued_events(BE)
            if queued > QUOTAS.watch_events:
                raise InvariantViolation(f"xenstored queues {queued} events for the backend")

        try:
            for _ in range(MAX_OPS):
                if peer.src.remaining <= 0:
                    break
                try:
                    await peer.step(check_queues)
                except (PeerError, LocalError, PlatformError, XenstoreError):
                    pass  # the hostile domain's own request refused (quota, perms, EBUSY)
                check_queues()
            await self._settled(driver, dom0, bp)
        finally:
            try:
                await driver.close()
            except Exception as e:
                raise violation("closing the backend driver raised", e) from None
        holds = getattr(driver, "holds", None)
        if holds is not None and holds():
            raise InvariantViolation("the backend driver still holds its ring or port after close")
        out = machine.outstanding()
        if out["mappings"]:
            raise InvariantViolation(f"the backend left {out['mappings']} grant mapping(s)")
        machine.release()  # the hostile domain's handles (its grants and ports) close
        try:
            machine.hv.assert_released()
        except AssertionError as e:
            raise InvariantViolation(f"after the hostile input: {e}") from None

    async def _settled(self, driver: Any, dom0: XenstoreClient, bp: str) -> None:
        """Wait until the driver's state, its node and its resources agree (bounded)."""
        deadline = time.monotonic() + SETTLE_S
        last = ""
        while True:
            state = driver.state
            node = await dom0.read(f"{bp}/state") if await dom0.exists(f"{bp}/state") else None
            holder = getattr(driver, "holds", None)
            holds = holder() if holder is not None else state is S.Connected
            ok = node == str(int(state)).encode() and (
                (state is S.Connected and holds)
                or (state in (S.InitWait, S.Closing, S.Closed) and not holds))
            if ok and driver.misbehaving and state not in (S.Closing, S.Closed):
                ok = False  # R4: a misbehaving peer leaves the device closing or closed
            if ok:
                return
            last = f"driver {state.name}, node {node!r}, holds {holds}, misbehaving {driver.misbehaving}"
            if driver.done:
                # only the frontend going Unknown (or its state node vanishing) may end the
                # backend (the device is gone), and it must have let go of everything
                if driver.peer_state in (S.Unknown, None) and state is S.Unknown and not holds:
                    return
                raise InvariantViolation(f"the backend driver's run loop ended: {last}")
            if time.monotonic() > deadline:
                raise InvariantViolation(f"the backend driver did not settle consistently: {last}")
            await asyncio.sleep(0.01)

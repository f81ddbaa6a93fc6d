"""Ring services: serve the requests of a ring channel (backend), or submit them (frontend).

Theory of operation
-------------------
A :class:`RingService` serves one :class:`~.ringchannel.BackChannel` in an asyncio loop.
It waits on the channel's port through the handle's
:class:`~xenpv.platforms.dispatch.PortDispatcher` (which unmasks a delivered port before
the service looks at the ring, so a notification racing with the look fires again), and
on each wake-up runs one *pass*:

1. take the waiting requests in one batch (one copy out of shared memory per entry,
   the compiled ring's batch call) and hand them to the *handler*;
2. the handler is sans-IO (:class:`RequestHandler`): it gets the batch and returns the
   responses it can give now; requests it cannot answer yet are answered later, in any
   order, through :meth:`RingService.respond` (the response carries the request's id; a
   ring's responses need not follow its requests' order);
3. responses are queued into the slots of consumed requests and pushed; the peer's port
   is signalled only when the ring says the frontend asked for it
   (``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``);
4. with no request left, the service polls the ring for ``spin_us`` microseconds before it
   re-arms ``req_event`` and sleeps (the final check, ``RING_FINAL_CHECK_FOR_REQUESTS``):
   waking a sleeping vCPU costs tens of microseconds on this machine kind
   (machine-baseline.md), so a frontend that sends its next batch at once is served
   without a wake-up.  ``spin_us=0`` sleeps at once.  Spin, take, re-arm and the second
   look are one compiled call (``poll_requests_into`` with ``spin_ns``), so a batch
   costs one crossing into the ring core to take and one to answer.

Work per pass is bounded (``max_batches``; the rest continues in a later loop turn, R3),
and a peer caught violating the ring (a producer index outside the ring) ends the service
with a :class:`~xenpv.errors.PeerError` in :attr:`~RingService.error` and a counter,
never an exception out of the loop.  :class:`RingClient` is the frontend's counterpart:
it submits requests (notifying when the ring says so) and hands responses to a callback
with the same pass and spin policy — or, ``lazy``, takes them only when its owner asks
(:meth:`RingClient.reap`) and asks for a notification only when its owner must wait for
them (:meth:`RingClient.arm`).

Counters (:attr:`~_RingPump.stats`, a plain dict for ``xenpv … info``): ``requests``,
``responses``, ``batches``, ``notifications_sent``, ``notifications_received``,
``spurious_wakeups``, ``spin_hits`` (polling found work, no sleep needed), ``sleeps``,
``passes_cut`` (a pass stopped at its bound), ``peer_errors``; :meth:`~_RingPump.info`
adds the port, slot size and count, whether it runs and the error that stopped it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import ClassVar, Protocol

from xenpv.drivers.ringchannel import BackChannel, FrontChannel
from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.platforms.base import EventChannels
from xenpv.platforms.dispatch import PortDispatcher
from xenpv.rings import BackRing, FrontRing

__all__ = ["DEFAULT_SPIN_US", "RequestHandler", "RingClient", "RingService"]

log = logging.getLogger(__name__)

#: Microseconds a service polls its ring after the last entry before sleeping.
DEFAULT_SPIN_US = 20
#: Batches taken per pass before yielding to the loop.
DEFAULT_MAX_BATCHES = 16


class RequestHandler(Protocol):
    """The device logic behind a :class:`RingService`, sans-IO.

    :meth:`handle` receives ``count`` requests as one buffer of ``count * slot_size``
    bytes (valid during the call only) and returns the responses ready now, each at most
    ``slot_size`` bytes; at most one response per request, over the handler's life.
    """

    def handle(self, batch: memoryview, count: int) -> Iterable[bytes]:
        """Requests in; the responses that are ready now out."""
        ...


class _RingPump:
    """The wake-up, batch and spin policy shared by both sides of a ring."""

    kind: ClassVar[str] = "ring"

    def __init__(self, events: EventChannels, port: int, slot_size: int, nr_ents: int, *,
                 spin_us: int, max_batches: int) -> None:
        self.events = events
        self.port = port
        self.spin_us = spin_us
        self.max_batches = max_batches
        self.slot_size = slot_size
        self._buf = bytearray(slot_size * nr_ents)
        self._view = memoryview(self._buf)
        self.stats: dict[str, int] = dict.fromkeys(
            ("requests", "responses", "batches", "notifications_sent",
             "notifications_received", "spurious_wakeups", "spin_hits", "sleeps",
             "passes_cut", "peer_errors"), 0)
        #: The peer error that ended the service (None while it runs).
        self.error: PeerError | None = None
        self._hub: PortDispatcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._stopped = asyncio.Event()

    # -- what each side provides
    def _poll(self, spin_ns: int) -> int:
        """Take waiting entries into the buffer, spinning up to ``spin_ns`` for them; with
        none, re-arm and look once more.  0: empty and armed, safe to sleep."""
        raise NotImplementedError

    def _consume(self, count: int) -> None:
        raise NotImplementedError

    # -- lifecycle
    def start(self) -> None:
        """Watch the port in the running loop and look at the ring once."""
        if self._hub is not None:
            raise LocalError(f"{self.kind} service already started")
        self._loop = asyncio.get_running_loop()
        hub = PortDispatcher.attach(self.events)
        try:
            hub.watch(self.port, self._on_event, unmask=True)
        except BaseException:
            hub.detach()
            raise
        self._hub = hub
        self._schedule()

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop` (or a peer error)."""
        return self._hub is not None

    def stop(self) -> None:
        """Stop watching the port (the channel itself is closed by its owner)."""
        if self._hub is not None:
            hub, self._hub = self._hub, None
            hub.detach(self.port)
        self._stopped.set()

    async def wait_stopped(self) -> PeerError | None:
        """Wait until the service stops; returns the peer error that stopped it, if any."""
        await self._stopped.wait()
        return self.error

    def info(self) -> dict[str, int | str | None]:
        """Counters plus the ring's geometry and state, for ``xenpv … info``."""
        out: dict[str, int | str | None] = dict(self.stats)
        out.update(port=self.port, slot_size=self.slot_size,
                   slots=len(self._buf) // self.slot_size, running=int(self.running),
                   error=None if self.error is None else str(self.error))
        return out

    def _fail(self, exc: PeerError) -> None:
        self.stats["peer_errors"] += 1
        self.error = exc
        log.warning("%s on port %d: peer error: %s", self.kind, self.port, exc)
        self.stop()

    # -- passes
    def _on_event(self) -> None:
        self.stats["notifications_received"] += 1
        if not self._pass():
            self.stats["spurious_wakeups"] += 1

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None and self.running:
            self._scheduled = True
            self._loop.call_soon(self._scheduled_pass)

    def _scheduled_pass(self) -> None:
        self._scheduled = False
        self._pass()

    def _pass(self) -> int:
        """Take and consume batches until the ring is empty and re-armed (then sleep),
        or the bound is reached (continue soon).  Returns entries consumed."""
        if not self.running:
            return 0
        spin_ns = max(self.spin_us, 0) * 1000
        done = 0
        try:
            for _ in range(self.max_batches):
                k = self._poll(spin_ns if done else 0)
                if k == 0:  # nothing, not even after re-arming: sleep
                    self.stats["sleeps"] += 1
                    return done
                if done:
                    self.stats["spin_hits"] += 1
                done += k
                self.stats["batches"] += 1
                self._consume(k)
                if not self.running:
                    return done
        except PeerError as exc:
            self._fail(exc)
            return done
        self.stats["passes_cut"] += 1
        self._schedule()  # more may wait: continue after other callbacks ran
        return done

    def _notify(self) -> None:
        self.stats["notifications_sent"] += 1
        with contextlib.suppress(PlatformError, LocalError, OSError):
            self.events.notify(self.port)


class RingService(_RingPump):
    """Serves the requests of one :class:`BackChannel` with a :class:`RequestHandler`.

    See the module docstring; :meth:`start` from a running loop, :meth:`respond` for
    answers given later, :meth:`stop` (or the channel's owner closing it) to end."""

    kind = "ring service"

    def __init__(self, channel: BackChannel, handler: RequestHandler, *,
                 spin_us: int = DEFAULT_SPIN_US,
                 max_batches: int = DEFAULT_MAX_BATCHES) -> None:
        """Prepare; nothing happens before :meth:`start`."""
        self.channel = channel
        self.ring: BackRing = channel.ring
        self.handler = handler
        super().__init__(channel.res.events, channel.port, channel.slot_size,
                         channel.ring.nr_ents, spin_us=spin_us, max_batches=max_batches)
        self._out = bytearray(channel.slot_size * channel.ring.nr_ents)

    @property
    def pending(self) -> int:
        """Requests taken but not answered yet."""
        return int(self.ring.pending_responses())

    def _poll(self, spin_ns: int) -> int:
        return int(self.ring.poll_requests_into(self._buf, -1, spin_ns))

    def _consume(self, count: int) -> None:
        self.stats["requests"] += count
        ready = self.handler.handle(self._view[: count * self.slot_size], count)
        self.respond(ready)

    def respond(self, responses: Iterable[bytes]) -> int:
        """Queue ``responses`` (each at most ``slot_size`` bytes, for requests already
        taken, in any order), push them, and notify if the frontend asked.  Returns how
        many were pushed.  More responses than outstanding requests is a LocalError."""
        if self.channel.closed:
            raise LocalError("ring service: the channel is closed")
        out, e, n = self._out, self.slot_size, 0
        for data in responses:
            if len(data) > e:
                raise LocalError(f"a {len(data)}-byte response does not fit a {e}-byte slot")
            if n * e >= len(out):
                self._put(n)
                n = 0
            out[n * e : n * e + len(data)] = data
            out[n * e + len(data) : (n + 1) * e] = bytes(e - len(data))
            n += 1
        if n:
            self._put(n)
        return n

    def respond_slots(self, slots: bytearray | memoryview, n: int) -> None:
        """Queue ``n`` responses already laid out as whole slots at the start of
        ``slots`` (what a compiled handler writes), push them, and notify if the frontend
        asked.  More responses than outstanding requests is a LocalError."""
        if self.channel.closed:
            raise LocalError("ring service: the channel is closed")
        if n:
            self.ring.put_responses(slots, n)
            self._pushed(n)

    def _put(self, n: int) -> None:
        self.ring.put_responses(self._out, n)
        self._pushed(n)

    def _pushed(self, n: int) -> None:
        self.stats["responses"] += n
        if self.ring.push_responses_and_check_notify():
            self._notify()


class RingClient(_RingPump):
    """The frontend's side of one :class:`FrontChannel`: submits requests, hands the
    responses to ``on_responses(batch, count)`` (a buffer valid during the call)."""

    kind = "ring client"

    def __init__(self, channel: FrontChannel,
                 on_responses: Callable[[memoryview, int], None], *,
                 spin_us: int = DEFAULT_SPIN_US,
                 max_batches: int = DEFAULT_MAX_BATCHES, lazy: bool = False) -> None:
        """Prepare; nothing happens before :meth:`start`.  ``lazy``: see :attr:`lazy`."""
        self.channel = channel
        self.ring: FrontRing = channel.ring
        self.on_responses = on_responses
        #: A lazy client's passes take the responses there without spinning and without
        #: re-arming ``rsp_event``: the backend stops signalling it, and its owner takes
        #: responses when it wants them (:meth:`reap`) and asks for a notification only
        #: when it must wait for some (:meth:`arm`).  A net frontend's TX ring is such a
        #: ring: its answers only free pages, which matter only when short of them.
        self.lazy = lazy
        super().__init__(channel.res.events, channel.port, channel.slot_size,
                         channel.ring.nr_ents, spin_us=spin_us, max_batches=max_batches)

    def free(self) -> int:
        """Requests that can be submitted now."""
        return int(self.ring.free_requests())

    def submit(self, requests: Iterable[bytes]) -> int:
        """Queue as many of ``requests`` as fit, push them and notify if the backend
        asked; returns how many were queued (stop at the first that does not fit)."""
        if self.channel.closed:
            raise LocalError("ring client: the channel is closed")
        n = 0
        for data in requests:
            if self.ring.free_requests() == 0:
                break
            self.ring.put_request(data)
            n += 1
        if n:
            self.stats["requests"] += n
            if self.ring.push_requests_and_check_notify():
                self._notify()
        return n

    def submit_slots(self, slots: bytearray | memoryview, n: int) -> int:
        """Queue as many of the ``n`` requests laid out as whole slots at the start of
        ``slots`` as fit (what a compiled builder writes), push them and notify if the
        backend asked; returns how many were queued."""
        if self.channel.closed:
            raise LocalError("ring client: the channel is closed")
        if n <= 0:
            return 0
        k = int(self.ring.put_requests(slots, n))
        if k:
            self.stats["requests"] += k
            if self.ring.push_requests_and_check_notify():
                self._notify()
        return k

    def reap(self) -> int:
        """Take the responses waiting now and hand them on: one pass, which for a lazy
        client neither spins nor re-arms; how many."""
        return 0 if self.channel.closed else self._pass()

    def arm(self, count: int = 1) -> int:
        """Ask the backend for a notification once ``count`` more responses are there
        (``rsp_event``), then take those already there (the final check: one that came
        before the request is taken here, never waited for); how many were taken."""
        if not self.running or self.channel.closed:
            return 0
        self.ring.set_rsp_event(self.ring.rsp_cons + max(count, 1))
        return self.reap()

    def _poll(self, spin_ns: int) -> int:
        if self.lazy:
            return int(self.ring.take_responses_into(self._buf, -1, 0))
        return int(self.ring.poll_responses_into(self._buf, -1, spin_ns))

    def _consume(self, count: int) -> None:
        self.stats["responses"] += count
        self.on_responses(self._view[: count * self.slot_size], count)

"""Keyboard/pointer frontend: the guest side of kbdif (``vkbd``), events as an async iterator.

Theory of operation
-------------------
Negotiation (xen-protocols.md §9.3): on the backend's InitWait the frontend reads the
offered features (``feature-abs-pointer``, ``-raw-pointer``, ``-multi-touch`` with its
surface and contact count, ``feature-disable-keyboard``/``-pointer``, ``width``,
``height``, strictly parsed and bounded), shares one zeroed page and allocates a port,
and writes ``page-gref`` (the grant), ``page-ref`` (the page's guest frame number, when
the platform has :class:`~xenpv.platforms.base.GuestFrames`: backends that map frames,
QEMU's among them, use that one), ``event-channel`` and the ``request-*`` flags for
the features it wants that the backend offers (raw only together with absolute).

Consuming (:class:`KeyboardConsumer`, an :class:`~xenpv.drivers.events.EventPump`): on
each notification the in ring's ``in_prod`` is loaded once; an index claiming more than
51 events is a protocol violation (R2, scenario 28): the ring stays broken, nothing more
is consumed, and the driver reports a peer error (error node, Closing).  Each event is
copied out once (R1) and checked (:func:`check_event`): a known type allowed by the
negotiated mode, a key state of 0 or 1, a code in ``1..KEY_MAX`` of a device that is not
disabled, coordinates within the advertised range, a known multi-touch sub-type and a
contact below ``multi-touch-num-contacts``.  A bad event is dropped and counted
(``stats["bad_events"]``, rate-limited log): the peer is not trusted, the rest of the
stream goes on.  Unknown event types are skipped as the protocol says (counted).  Work
per notification is bounded by the ring (51 events), the event budget by
:class:`~xenpv.drivers.events.EventRateLimiter` (R10, scenario 16).

Delivery: accepted events go to a bounded queue read by :meth:`KeyboardFrontend.events`
(an async iterator of kbdif records); when the queue is full the consumer stops taking
events from the ring, so back-pressure reaches the backend, whose overflow rule applies.
:attr:`KeyboardFrontend.pressed` is the set of keys and buttons currently down,
:attr:`KeyboardFrontend.position` the last absolute position.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from xenpv.drivers.events import EventPump, EventRateLimiter
from xenpv.drivers.kbdring import kbd_in_ring
from xenpv.drivers.quarantine import GrantQuarantine
from xenpv.drivers.resources import DeviceResources
from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.platforms.base import EventChannels, GuestFrames, Platform, SharedPages
from xenpv.protocols import ProtocolError
from xenpv.protocols import kbdif as K
from xenpv.protocols.keycodes import is_pointer_code, valid_code
from xenpv.rings import ByteRing
from xenpv.xenbus.driver import FrontendDriver, PeerKeys
from xenpv.xenbus.machine import FrontendStyle
from xenpv.xenstore.client import XenstoreClient as XenbusClient

__all__ = ["KbdEvent", "KeyboardConsumer", "KeyboardFrontend", "Negotiated", "check_event"]

log = logging.getLogger(__name__)

KbdEvent = K.Key | K.Motion | K.Position | K.MTouchPos | K.MTouchShape | K.MTouchOrient | K.MTouch
#: Accepted events waiting for the application, at most.
DEFAULT_QUEUE = 1024
_LOG_BURST = 10
_LOG_WINDOW = 10.0


#: What this connection carries (the backend's offer intersected with our wishes).
Negotiated = K.KbdMode


def check_event(ev: K.InEvent, mode: Negotiated) -> None:
    """Raise :class:`ProtocolError` unless ``ev`` is acceptable under ``mode``."""
    if isinstance(ev, K.Key):
        if ev.pressed not in (0, 1):
            raise ProtocolError(f"kbd key event pressed={ev.pressed}")
        if not valid_code(ev.keycode):
            raise ProtocolError(f"kbd keycode {ev.keycode:#x} outside 1..KEY_MAX")
        pointer = is_pointer_code(ev.keycode)
        if (pointer and not mode.pointer) or (not pointer and not mode.keyboard):
            raise ProtocolError(f"kbd keycode {ev.keycode:#x} of a disabled device")
        return
    if isinstance(ev, K.Motion):
        if not mode.pointer:
            raise ProtocolError("kbd motion while the pointer is disabled")
        return
    if isinstance(ev, K.Position):
        if not (mode.abs_pointer and mode.pointer):
            raise ProtocolError("kbd absolute position without request-abs-pointer")
        w, h = mode.abs_range
        K.validate_in_event(ev, width=w, height=h)
        return
    if isinstance(ev, K.UnknownEvent):
        raise ProtocolError(f"kbd event type {ev.type} unknown")
    if mode.multi_touch is None:
        raise ProtocolError("kbd multi-touch event without request-multi-touch")
    w, h, n = mode.multi_touch
    K.validate_in_event(ev, width=w, height=h, num_contacts=n)


class KeyboardConsumer(EventPump):
    """Consumes the in ring of one connected vkbd (see the module docstring).

    ``deliver(event)`` receives each accepted event; ``room()`` says whether the
    application can take more (False: leave the rest in the ring); ``on_broken(error)``
    runs once if the backend breaks the ring.
    """

    def __init__(self, ring: ByteRing, events: EventChannels, port: int, mode: Negotiated,
                 deliver: Callable[[KbdEvent], None], room: Callable[[], bool], *,
                 limiter: EventRateLimiter | None = None,
                 on_broken: Callable[[PeerError], None] | None = None) -> None:
        """Prepare; :meth:`start` watches the port and examines the ring once."""
        self.ring = ring
        self.events = events
        self.port = port
        self.mode = mode
        self.deliver = deliver
        self.room = room
        self.limiter = limiter or EventRateLimiter(1 << 12, 0.2)
        self.on_broken = on_broken
        self.stats: dict[str, int] = {"events": 0, "rate_limited": 0, "spurious": 0,
                                      "notifies": 0, "delivered": 0, "bad_events": 0,
                                      "unknown": 0, "paused": 0}
        #: The last bad event's reason; the ring error once broken.
        self.last_error: str | None = None
        self.broken: PeerError | None = None
        #: ``stats["delivered"]`` when the ring broke (nothing is delivered after).
        self.delivered_at_break: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._notify_pending = False
        self._log_times: deque[float] = deque(maxlen=_LOG_BURST)

    def start(self) -> None:
        """Watch the port and look at the ring once (events may already wait)."""
        self._loop = asyncio.get_running_loop()
        self._watch_port()
        self._schedule_pump()

    def resume(self) -> None:
        """The application took events: look at the ring again."""
        self._schedule_pump()

    @property
    def _stopped(self) -> bool:
        return self._closed or self.broken is not None

    def _pump_loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def _service(self) -> bool:
        if self._stopped:
            return False
        taken = 0
        while self.room():
            try:
                raw = self.ring.read(1)
            except PeerError as exc:  # in_prod beyond the ring (R2): fail closed (R4)
                self._break(exc)
                return taken > 0
            if not raw:
                break
            taken += 1
            self._accept(raw)
            if taken >= K.XENKBD_IN_RING_LEN:
                self._schedule_pump()  # bounded pass; more may have arrived meanwhile
                break
        else:
            self.stats["paused"] += 1
        if taken:
            self._notify_soon()  # after the in_cons update, as the protocol asks
        return taken > 0

    def _notify_soon(self) -> None:
        """Notify the backend once the reader woken by these events has run (its wake-up
        was queued first): the consumer's latency does not pay for the notification."""
        if self._notify_pending or self._loop is None:
            return
        self._notify_pending = True

        def go() -> None:
            self._notify_pending = False
            if not self._closed:
                self._notify()

        self._loop.call_soon(go)

    def _accept(self, raw: bytes) -> None:
        ev = K.parse_in_event(raw)
        if isinstance(ev, K.UnknownEvent):
            self.stats["unknown"] += 1  # §9.1: unknown types are skipped
            return
        try:
            check_event(ev, self.mode)
        except ProtocolError as exc:
            self.stats["bad_events"] += 1
            self.last_error = str(exc)
            self._log(f"dropped a bad event: {exc}")
            return
        self.stats["delivered"] += 1
        self.deliver(ev)

    def _break(self, exc: PeerError) -> None:
        self.broken = exc
        self.delivered_at_break = self.stats["delivered"]
        self.last_error = str(exc)
        self._log(f"event ring broken: {exc}")
        if self.on_broken is not None:
            self.on_broken(exc)

    def _log(self, message: str) -> None:
        now = time.monotonic()
        if len(self._log_times) == _LOG_BURST and now - self._log_times[0] < _LOG_WINDOW:
            return
        self._log_times.append(now)
        log.warning("vkbd port %d: %s", self.port, message)

    def close(self) -> None:
        """Stop consuming (idempotent); the ring memory is released by the owner."""
        if not self._closed:
            self._closed = True
            self._unwatch_port()


class _KbdPage:
    """The page (a guest frame where the platform has them, granted to the backend) and
    the port of one connection, in a :class:`DeviceResources`."""

    def __init__(self, platform: Platform, backend_domid: int,
                 quarantine: GrantQuarantine) -> None:
        self.grants = platform.grants
        self.res = DeviceResources(platform.grants, platform.events, quarantine)
        self.frames: SharedPages | None = None
        self.pages: SharedPages | None = None
        self.port = -1
        self.ring: ByteRing | None = None
        self.backend_domid = backend_domid

    def allocate(self) -> None:
        gt = self.grants
        with self.res.undo_on_error():
            if isinstance(gt, GuestFrames):
                self.frames = gt.alloc_frames(1)
                self.pages = self.res.adopt(gt.grant_frame(self.frames.refs[0],
                                                           self.backend_domid))
                mem = self.frames.mem
            else:
                self.pages = self.res.grant(self.backend_domid, 1)
                mem = self.pages.mem
            self.port = self.res.alloc_unbound(self.backend_domid)
            self.ring = kbd_in_ring(mem, on_insane="error")

    def keys(self) -> dict[str, int]:
        assert self.pages is not None
        out = {K.XENKBD_FIELD_RING_GREF: int(self.pages.refs[0]),
               K.XENKBD_FIELD_EVT_CHANNEL: self.port}
        if self.frames is not None:
            out[K.XENKBD_FIELD_RING_REF] = int(self.frames.refs[0])
        return out

    def release(self) -> None:
        if self.ring is not None:
            self.ring.release()
            self.ring = None
        self.res.release()
        if self.frames is not None:
            frames, self.frames = self.frames, None
            gt = self.grants
            assert isinstance(gt, GuestFrames)
            with contextlib.suppress(LocalError, PlatformError):
                gt.free_frames(frames)


_END = object()


class KeyboardFrontend(FrontendDriver):
    """The guest's ``device/vkbd/<devid>`` (see the module docstring).

    ``abs_pointer``/``raw_pointer``/``multi_touch``: the features to request when the
    backend offers them.  ``queue`` bounds the accepted events waiting for
    :meth:`events`.
    """

    style = FrontendStyle.STANDARD

    def __init__(self, platform: Platform, client: XenbusClient, path: str, *,
                 abs_pointer: bool = True, raw_pointer: bool = False,
                 multi_touch: bool = False, queue: int = DEFAULT_QUEUE,
                 quarantine: GrantQuarantine | None = None, **kw: Any) -> None:
        """Serve the frontend directory ``path`` (see :class:`FrontendDriver`)."""
        super().__init__(client, path, **kw)
        self.platform = platform
        self.want_abs, self.want_raw, self.want_mt = abs_pointer, raw_pointer, multi_touch
        self.queue_limit = queue
        self.quarantine = quarantine if quarantine is not None else GrantQuarantine(
            platform.grants)
        self.mode: Negotiated | None = None
        self.consumer: KeyboardConsumer | None = None
        #: Keys and buttons down, as the delivered events say.
        self.pressed: set[int] = set()
        #: The last absolute position (POS events).
        self.position: tuple[int, int] | None = None
        #: Contacts down (multi-touch) and their last position.
        self.contacts: dict[int, tuple[int, int]] = {}
        self._page: _KbdPage | None = None
        self._queue: deque[object] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._connected = asyncio.Event()

    async def publish(self, backend: PeerKeys) -> None:
        """Read the offer, share the page, write the keys and requests."""
        self.quarantine.reap()
        offer_abs = await backend.feature(K.XENKBD_FIELD_FEAT_ABS_POINTER)
        offer_raw = await backend.feature(K.XENKBD_FIELD_FEAT_RAW_POINTER)
        offer_mt = await backend.feature(K.XENKBD_FIELD_FEAT_MTOUCH)
        no_kbd = await backend.feature(K.XENKBD_FIELD_FEAT_DSBL_KEYBRD)
        no_ptr = await backend.feature(K.XENKBD_FIELD_FEAT_DSBL_POINTER)
        top = K.RAW_POINTER_MAX
        width = await backend.uint(K.XENKBD_FIELD_WIDTH, 1, top, default=K.DEFAULT_WIDTH)
        height = await backend.uint(K.XENKBD_FIELD_HEIGHT, 1, top, default=K.DEFAULT_HEIGHT)
        unique = await backend.text(K.XENKBD_FIELD_UNIQUE_ID, default="")
        mt: tuple[int, int, int] | None = None
        if offer_mt and self.want_mt:
            mt = (await backend.uint(K.XENKBD_FIELD_MT_WIDTH, 1, top),
                  await backend.uint(K.XENKBD_FIELD_MT_HEIGHT, 1, top),
                  await backend.uint(K.XENKBD_FIELD_MT_NUM_CONTACTS, 1, 256))
        abs_on = offer_abs and self.want_abs
        self.mode = Negotiated(abs_pointer=abs_on, raw_pointer=abs_on and offer_raw and
                               self.want_raw, multi_touch=mt, keyboard=not no_kbd,
                               pointer=not no_ptr, width=width, height=height,
                               unique_id=unique)
        page = self._page = _KbdPage(self.platform, self.peer_domid, self.quarantine)
        page.allocate()
        keys: dict[str, int] = dict(page.keys())
        if self.mode.abs_pointer:
            keys[K.XENKBD_FIELD_REQ_ABS_POINTER] = 1
        if self.mode.raw_pointer:
            keys[K.XENKBD_FIELD_REQ_RAW_POINTER] = 1
        if mt is not None:
            keys[K.XENKBD_FIELD_REQ_MTOUCH] = 1
        await self.write_keys(keys)

    async def connect(self, peer: PeerKeys) -> None:
        """Both sides are up: start consuming."""
        page, mode = self._page, self.mode
        if page is None or page.ring is None or mode is None:
            raise LocalError("connect before publish")
        self.pressed.clear()
        self.contacts.clear()
        # an iterator of the old connection has ended; a new one starts with this one
        self._queue = deque(item for item in self._queue if item is not _END)
        self.consumer = KeyboardConsumer(page.ring, self.platform.events, page.port, mode,
                                         self._deliver, self._room,
                                         on_broken=self._peer_broke)
        self.consumer.start()
        self._connected.set()

    async def disconnect(self) -> None:
        """Stop consuming, release the page and port (a still-mapped page: quarantine)."""
        self._connected.clear()
        if self.consumer is not None:
            self.consumer.close()
        if self._page is not None:
            page, self._page = self._page, None
            page.release()
        self._queue.append(_END)
        self._wakeup()

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Wait until events can flow."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    def _peer_broke(self, exc: PeerError) -> None:
        machine = self.machine
        if machine is not None:
            self._post(lambda: machine.peer_error(exc))

    def _room(self) -> bool:
        return len(self._queue) < self.queue_limit

    def _deliver(self, ev: KbdEvent) -> None:
        if isinstance(ev, K.Key):
            if ev.pressed:
                self.pressed.add(ev.keycode)
            else:
                self.pressed.discard(ev.keycode)
        elif isinstance(ev, K.Position):
            self.position = (ev.abs_x, ev.abs_y)
        elif isinstance(ev, K.MTouchPos):
            self.contacts[ev.contact_id] = (ev.abs_x, ev.abs_y)
        elif isinstance(ev, K.MTouch) and ev.event_type == K.XENKBD_MT_EV_UP:
            self.contacts.pop(ev.contact_id, None)
        self._queue.append(ev)
        self._wakeup()

    def _wakeup(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def events(self) -> AsyncIterator[KbdEvent]:
        """Accepted events in ring order; ends when the connection ends."""
        while True:
            while not self._queue:
                if self.done:
                    return
                # one future awaited directly: a delivery wakes the reader in the next
                # pass of the loop (the timeout only notices a driver that ended)
                waiter = self._waiter = asyncio.get_running_loop().create_future()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await waiter
            item = self._queue.popleft()
            if item is _END:
                return
            if self.consumer is not None and len(self._queue) == self.queue_limit - 1:
                self.consumer.resume()
            yield item  # type: ignore[misc]

    def counters(self) -> dict[str, int]:
        """The consumer's counters (empty before the first connection)."""
        return dict(self.consumer.stats) if self.consumer is not None else {}

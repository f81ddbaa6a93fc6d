"""Keyboard/pointer backend: kbdif (``vkbd``) events from input sources into a guest.

Theory of operation
-------------------
Negotiation (xen-protocols.md §9.3): before InitWait the backend publishes what its
:class:`KeyboardConfig` offers -- ``feature-abs-pointer``, ``feature-raw-pointer``,
``feature-multi-touch`` with ``multi-touch-width``/``-height``/``-num-contacts``,
``feature-disable-keyboard``, ``feature-disable-pointer``, ``width``, ``height``,
``unique-id``.  At connect it reads the frontend's ``request-*`` flags (a request for
something not offered has no effect), ``page-gref`` (the grant of the shared page: a
backend in a driver domain cannot map guest frames, so ``page-ref`` is not used) and
``event-channel``, maps and binds through :class:`~xenpv.drivers.resources.DeviceResources`
and starts a :class:`KeyboardSession`.

Events: :meth:`KeyboardBackendDriver.send` takes an
:data:`~xenpv.backends.hid.source.InputEvent` and :class:`EventTranslator` turns it into
kbdif events for the negotiated mode: KEY (unless the class of key is disabled), MOTION
or POS (absolute input becomes relative motion without ``request-abs-pointer``, relative
input moves a tracked position with it), MTOUCH (only with ``request-multi-touch``),
positions scaled from the source's range to ``width``/``height`` (``0..0x7fff`` in raw
mode) or to the multi-touch surface.

Overflow rule (:class:`EventProducer`): the producer never laps the consumer.  An event
that does not fit into the 51-slot ring waits in a backlog of at most ``backlog``
events, where motion coalesces (consecutive MOTION events add up, POS replaces POS with
the wheel added, a contact's MOTION replaces its previous MOTION).  When the backlog is
full, a new event is dropped and counted -- except a key release or a contact's UP,
which is never lost: it cancels a still-waiting press of the same key (neither reaches
the guest), or evicts the oldest droppable waiting event.  So a key the guest saw
pressed always sees its release, and nothing stays stuck.  The backlog drains whenever
the frontend notifies (it does after consuming).

Hostile frontend (hostile-inputs.md R5, R10, R14, scenario 18): keys parsed strictly
(a malformed ``request-*``, ``page-gref`` or ``event-channel`` refuses the connection
with an error node); an unusable ref or port is a peer error; an insane ``in_cons``
reads as a full ring and is counted (``stats["insane"]``), never raised; the port's
event budget is the driver base's :class:`~xenpv.drivers.events.EventRateLimiter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from xenpv.backends.hid.router import FocusRouter
from xenpv.backends.hid.source import AbsInput, InputEvent, KeyInput, RelInput, TouchInput
from xenpv.drivers.events import EventPump, EventRateLimiter
from xenpv.drivers.kbdring import kbd_in_ring
from xenpv.drivers.resources import DeviceResources
from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.platforms.base import EventChannels, Platform
from xenpv.protocols import kbdif as K
from xenpv.protocols.keycodes import is_pointer_code, valid_code
from xenpv.rings import ByteRing
from xenpv.xenbus.driver import BackendDriver, PeerKeys
from xenpv.xenbus.watcher import BackendWatcher
from xenpv.xenstore.client import XenstoreClient as XenbusClient

__all__ = [
    "EventProducer",
    "EventTranslator",
    "KbdRecord",
    "KeyboardBackend",
    "KeyboardBackendDriver",
    "KeyboardConfig",
    "KeyboardMode",
    "KeyboardSession",
    "toolstack_config",
]

log = logging.getLogger(__name__)

KbdRecord = K.Key | K.Motion | K.Position | K.MTouchPos | K.MTouchShape | K.MTouchOrient | K.MTouch
#: Events waiting for ring space, at most.
DEFAULT_BACKLOG = 256


@dataclass(frozen=True)
class KeyboardConfig:
    """What a keyboard backend offers (host configuration, never from the guest).

    ``width``/``height``: the absolute pointer range; ``multi_touch``: ``(width, height,
    contacts)`` of the touch surface, or None; ``disable_keyboard``/``disable_pointer``:
    tell the frontend not to create that device (and send none of its events).
    """

    abs_pointer: bool = True
    raw_pointer: bool = True
    multi_touch: tuple[int, int, int] | None = None
    disable_keyboard: bool = False
    disable_pointer: bool = False
    width: int = K.DEFAULT_WIDTH
    height: int = K.DEFAULT_HEIGHT
    unique_id: str = ""
    backlog: int = DEFAULT_BACKLOG
    rate_allowance: int = 1 << 12
    rate_period: float = 0.2

    def __post_init__(self) -> None:
        if not (0 < self.width <= K.RAW_POINTER_MAX and 0 < self.height <= K.RAW_POINTER_MAX):
            raise LocalError(f"pointer range {self.width}x{self.height} outside 1..32767")
        if self.multi_touch is not None:
            w, h, n = self.multi_touch
            if not (0 < w <= K.RAW_POINTER_MAX and 0 < h <= K.RAW_POINTER_MAX and 0 < n <= 256):
                raise LocalError(f"multi-touch {w}x{h}x{n} out of range")
        if self.backlog < 1:
            raise LocalError("backlog must be at least 1")

    def features(self) -> dict[str, str | int]:
        """The backend keys this configuration publishes."""
        out: dict[str, str | int] = {
            K.XENKBD_FIELD_FEAT_ABS_POINTER: int(self.abs_pointer),
            K.XENKBD_FIELD_FEAT_RAW_POINTER: int(self.raw_pointer),
            K.XENKBD_FIELD_FEAT_MTOUCH: int(self.multi_touch is not None),
            K.XENKBD_FIELD_FEAT_DSBL_KEYBRD: int(self.disable_keyboard),
            K.XENKBD_FIELD_FEAT_DSBL_POINTER: int(self.disable_pointer),
            K.XENKBD_FIELD_WIDTH: self.width,
            K.XENKBD_FIELD_HEIGHT: self.height,
            K.XENKBD_FIELD_UNIQUE_ID: self.unique_id,
        }
        if self.multi_touch is not None:
            w, h, n = self.multi_touch
            out |= {K.XENKBD_FIELD_MT_WIDTH: w, K.XENKBD_FIELD_MT_HEIGHT: h,
                    K.XENKBD_FIELD_MT_NUM_CONTACTS: n}
        return out


#: What was negotiated for one connection: the offer intersected with the requests.
KeyboardMode = K.KbdMode


def _scale(value: int, source_max: int, target_max: int) -> int:
    """``value`` in ``0..source_max`` to ``0..target_max`` (clamped, rounded)."""
    if source_max <= 0:
        return 0
    value = min(max(value, 0), source_max)
    return (value * target_max + source_max // 2) // source_max


def _clamp(v: int, lo: int, hi: int) -> int:
    return lo if v < lo else hi if v > hi else v


_I32 = (-(1 << 31), (1 << 31) - 1)


class EventTranslator:
    """Source events to kbdif events for one :class:`KeyboardMode` (sans-IO).

    Keeps the pointer position (relative input in absolute mode, absolute input in
    relative mode).  Events the mode cannot carry are counted in ``stats["unsupported"]``
    and produce nothing.
    """

    def __init__(self, mode: KeyboardMode) -> None:
        """Start at the top-left corner."""
        self.mode = mode
        self.x = 0
        self.y = 0
        self.stats = {"unsupported": 0}

    def translate(self, ev: InputEvent) -> list[KbdRecord]:
        """The kbdif events for ``ev`` (possibly none)."""
        m = self.mode
        if isinstance(ev, KeyInput):
            pointer = is_pointer_code(ev.code)
            if not valid_code(ev.code) or (pointer and not m.pointer) or (
                    not pointer and not m.keyboard):
                return self._unsupported()
            return [K.Key(K.XENKBD_TYPE_KEY, int(ev.pressed), ev.code)]
        if not m.pointer and not isinstance(ev, TouchInput):
            return self._unsupported()
        if isinstance(ev, RelInput):
            wheel = _clamp(ev.wheel, *_I32)
            if m.abs_pointer:
                xmax, ymax = m.abs_range
                self.x = _clamp(self.x + ev.dx, 0, xmax)
                self.y = _clamp(self.y + ev.dy, 0, ymax)
                return [K.Position(K.XENKBD_TYPE_POS, self.x, self.y, wheel)]
            return [K.Motion(K.XENKBD_TYPE_MOTION, _clamp(ev.dx, *_I32), _clamp(ev.dy, *_I32),
                             wheel)]
        if isinstance(ev, AbsInput):
            xmax, ymax = m.abs_range if m.abs_pointer else (m.width, m.height)
            x, y = _scale(ev.x, ev.x_max, xmax), _scale(ev.y, ev.y_max, ymax)
            wheel = _clamp(ev.wheel, *_I32)
            if m.abs_pointer:
                self.x, self.y = x, y
                return [K.Position(K.XENKBD_TYPE_POS, x, y, wheel)]
            dx, dy, self.x, self.y = x - self.x, y - self.y, x, y
            if not (dx or dy or wheel):
                return []
            return [K.Motion(K.XENKBD_TYPE_MOTION, dx, dy, wheel)]
        return self._touch(ev)

    def _touch(self, ev: TouchInput) -> list[KbdRecord]:
        mt = self.mode.multi_touch
        if mt is None or not 0 <= ev.contact < mt[2]:
            return self._unsupported()
        w, h, _n = mt
        t, c = K.XENKBD_TYPE_MTOUCH, ev.contact
        if ev.kind in ("down", "move"):
            sub = K.XENKBD_MT_EV_DOWN if ev.kind == "down" else K.XENKBD_MT_EV_MOTION
            return [K.MTouchPos(t, sub, c, _scale(ev.x, ev.x_max, w), _scale(ev.y, ev.y_max, h))]
        if ev.kind == "shape":
            major = _scale(ev.major, ev.x_max, w) if ev.x_max > 0 else 0
            minor = _scale(ev.minor, ev.y_max, h) if ev.y_max > 0 else 0
            return [K.MTouchShape(t, K.XENKBD_MT_EV_SHAPE, c, major, minor)]
        if ev.kind == "orient":
            return [K.MTouchOrient(t, K.XENKBD_MT_EV_ORIENT, c, _clamp(ev.orientation, -180, 180))]
        sub = K.XENKBD_MT_EV_UP if ev.kind == "up" else K.XENKBD_MT_EV_SYN
        return [K.MTouch(t, sub, c)]

    def _unsupported(self) -> list[KbdRecord]:
        self.stats["unsupported"] += 1
        return []


def _is_release(ev: KbdRecord) -> bool:
    """Events never dropped: key releases and contact ups."""
    if isinstance(ev, K.Key):
        return ev.pressed == 0
    return isinstance(ev, K.MTouch) and ev.event_type == K.XENKBD_MT_EV_UP


class EventProducer:
    """The overflow rule over the in ring (see the module docstring).

    ``ring`` is the backend's view of the in ring (``on_insane="zero"``); ``notify`` is
    called after the producer index moved.  Counters in :attr:`stats`: ``written``,
    ``coalesced``, ``dropped``, ``cancelled`` (press/release pairs that never reached the
    guest), ``evicted`` (waiting events dropped to make room for a release),
    ``backlog_max``, ``insane``.
    """

    def __init__(self, ring: ByteRing, notify: Callable[[], None],
                 backlog: int = DEFAULT_BACKLOG) -> None:
        """Nothing waiting yet."""
        self.ring = ring
        self.notify = notify
        self.limit = backlog
        self.backlog: deque[KbdRecord] = deque()
        self.stats = {"written": 0, "coalesced": 0, "dropped": 0, "cancelled": 0,
                      "evicted": 0, "backlog_max": 0, "insane": 0}

    def put(self, events: list[KbdRecord]) -> None:
        """Queue ``events`` and write as many as fit (one notification).  Only events
        that cannot go into the ring now wait, coalesce or count against the backlog."""
        room = self._free()
        for ev in events:
            self._queue(ev, room)
        self.flush()

    def _free(self) -> int:
        insane = self.ring.insane_count
        room = self.ring.free()
        if self.ring.insane_count != insane:
            self.stats["insane"] += 1
        return room

    def _queue(self, ev: KbdRecord, room: int) -> None:
        q = self.backlog
        waiting = len(q) - room  # events already queued that will not fit now
        if waiting >= 0 and q and self._coalesce(q[-1], ev):
            return
        if waiting >= self.limit:
            if not _is_release(ev):
                self.stats["dropped"] += 1
                return
            if self._cancel_press(ev):
                return
            self._evict()
        q.append(ev)
        self.stats["backlog_max"] = max(self.stats["backlog_max"], len(q) - max(room, 0))

    def _coalesce(self, last: KbdRecord, ev: KbdRecord) -> bool:
        q = self.backlog
        if isinstance(last, K.Motion) and isinstance(ev, K.Motion):
            q[-1] = K.Motion(K.XENKBD_TYPE_MOTION, _clamp(last.rel_x + ev.rel_x, *_I32),
                             _clamp(last.rel_y + ev.rel_y, *_I32),
                             _clamp(last.rel_z + ev.rel_z, *_I32))
        elif isinstance(last, K.Position) and isinstance(ev, K.Position):
            q[-1] = K.Position(K.XENKBD_TYPE_POS, ev.abs_x, ev.abs_y,
                               _clamp(last.rel_z + ev.rel_z, *_I32))
        elif (isinstance(last, K.MTouchPos) and isinstance(ev, K.MTouchPos)
              and last.event_type == ev.event_type == K.XENKBD_MT_EV_MOTION
              and last.contact_id == ev.contact_id):
            q[-1] = ev
        else:
            return False
        self.stats["coalesced"] += 1
        return True

    def _cancel_press(self, ev: KbdRecord) -> bool:
        """A release whose press still waits: drop both (the guest never saw the key)."""
        q = self.backlog
        for i in range(len(q) - 1, -1, -1):
            w = q[i]
            if isinstance(ev, K.Key) and isinstance(w, K.Key) and w.keycode == ev.keycode:
                if w.pressed:
                    del q[i]
                    self.stats["cancelled"] += 1
                    return True
                return False
            if (isinstance(ev, K.MTouch) and isinstance(w, K.MTouchPos | K.MTouch)
                    and w.contact_id == ev.contact_id):
                if w.event_type == K.XENKBD_MT_EV_DOWN:
                    # the whole contact's life still waits: take it out
                    for j in range(len(q) - 1, i - 1, -1):
                        x = q[j]
                        if isinstance(x, K.MTouchPos | K.MTouchShape | K.MTouchOrient | K.MTouch) \
                                and x.contact_id == ev.contact_id \
                                and x.event_type != K.XENKBD_MT_EV_SYN:
                            del q[j]
                    self.stats["cancelled"] += 1
                    return True
                if w.event_type == K.XENKBD_MT_EV_UP:
                    return False
        return False

    def _evict(self) -> None:
        """Drop the oldest waiting event that may be dropped (none: the backlog grows by
        one release, bounded by the number of distinct keys and contacts)."""
        q = self.backlog
        for i, w in enumerate(q):
            if not _is_release(w):
                del q[i]
                self.stats["evicted"] += 1
                self.stats["dropped"] += 1
                return

    def flush(self) -> int:
        """Write waiting events while the ring has room; notify once if any moved."""
        q = self.backlog
        if not q:
            return 0
        n = min(self._free(), len(q))
        if n <= 0:
            return 0
        data = b"".join(q[i].pack() for i in range(n))
        written = self.ring.write(data)  # fewer only if in_cons turned insane meanwhile
        for _ in range(written):
            q.popleft()
        if written:
            self.stats["written"] += written
            self.notify()
        return written


class KeyboardSession(EventPump):
    """One connected vkbd: translator + producer over the mapped page and bound port.

    ``release`` runs once at :meth:`close` (unmap, unbind).
    """

    def __init__(self, page: Any, events: EventChannels, port: int, mode: KeyboardMode,
                 config: KeyboardConfig, *, release: Callable[[], None] | None = None) -> None:
        """Prepare; :meth:`start` watches the port."""
        self.events = events
        self.port = port
        self.mode = mode
        #: the mapped page (its ring is :attr:`ring`)
        self.page = page
        self.ring = kbd_in_ring(page, on_insane="zero")
        self.limiter = EventRateLimiter(config.rate_allowance, config.rate_period)
        self.stats: dict[str, int] = {"events": 0, "rate_limited": 0, "spurious": 0,
                                      "notifies": 0}
        self.translator = EventTranslator(mode)
        self.producer = EventProducer(self.ring, self._notify, config.backlog)
        self._release = release
        self._loop: Any = None
        self._closed = False

    def start(self) -> None:
        """Watch the port (the frontend notifies after consuming)."""
        self._loop = asyncio.get_running_loop()
        self._watch_port()

    def send(self, ev: InputEvent) -> None:
        """Translate ``ev`` and produce it under the overflow rule."""
        if self._closed:
            return
        self.producer.put(self.translator.translate(ev))

    def send_records(self, records: list[KbdRecord]) -> None:
        """Produce ready-made kbdif events (the focus router's releases, tests)."""
        if not self._closed:
            self.producer.put(records)

    def counters(self) -> dict[str, int]:
        """Producer, translator and event counters in one dict."""
        return {**self.stats, **self.producer.stats, **self.translator.stats}

    @property
    def _stopped(self) -> bool:
        return self._closed

    def _pump_loop(self) -> Any:
        return self._loop

    def _service(self) -> bool:
        if self._closed:
            return False
        return self.producer.flush() > 0

    def close(self) -> None:
        """Stop and release page and port (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._unwatch_port()
        self.ring.release()
        if self._release is not None:
            self._release()


class _KbdPeerError(PeerError):
    """The frontend's page-gref/event-channel cannot be used."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = _errno.EINVAL


class KeyboardBackendDriver(BackendDriver):
    """Backend of one ``backend/vkbd/<fe>/<devid>`` (see the module docstring).

    :meth:`send` delivers an input event to the guest while Connected (otherwise it is
    counted in ``stats["not_connected"]``).  ``on_connect`` is called with the driver
    after each connection is up.
    """

    def __init__(self, platform: Platform, client: XenbusClient, path: str,
                 config: KeyboardConfig | None = None, *,
                 on_connect: Callable[[KeyboardBackendDriver], None] | None = None,
                 on_disconnect: Callable[[KeyboardBackendDriver], None] | None = None,
                 **kw: Any) -> None:
        """Serve ``path`` (see :class:`BackendDriver`)."""
        super().__init__(client, path, **kw)
        self.platform = platform
        self.config = config or KeyboardConfig()
        self.session: KeyboardSession | None = None
        self.mode: KeyboardMode | None = None
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.stats["not_connected"] = 0
        self._configured = False

    async def publish_features(self) -> None:
        """Take the toolstack's settings from the own directory (once), then write the
        offered features and ranges (§9.3)."""
        if not self._configured:
            self._configured = True
            self.config = await toolstack_config(PeerKeys(self.client, self.path,
                                                          self.op_timeout), self.config)
        await self.write_keys(self.config.features())

    async def connect(self, peer: PeerKeys) -> None:
        """Read the requests and the page, map and bind, start the session."""
        cfg = self.config
        want_abs = await peer.feature(K.XENKBD_FIELD_REQ_ABS_POINTER)
        want_raw = await peer.feature(K.XENKBD_FIELD_REQ_RAW_POINTER)
        want_mt = await peer.feature(K.XENKBD_FIELD_REQ_MTOUCH)
        ref = await peer.grant_ref(K.XENKBD_FIELD_RING_GREF)
        remote_port = await peer.port(K.XENKBD_FIELD_EVT_CHANNEL)
        abs_on = cfg.abs_pointer and want_abs
        mode = KeyboardMode(
            abs_pointer=abs_on, raw_pointer=abs_on and cfg.raw_pointer and want_raw,
            multi_touch=cfg.multi_touch if want_mt else None,
            keyboard=not cfg.disable_keyboard, pointer=not cfg.disable_pointer,
            width=cfg.width, height=cfg.height)
        res = DeviceResources(self.platform.grants, self.platform.events)
        try:
            with res.undo_on_error():
                mapping = res.map(self.peer_domid, [ref], writable=True)
                port = res.bind(self.peer_domid, remote_port)
                session = KeyboardSession(mapping.mem, self.platform.events, port, mode, cfg,
                                          release=res.release)
        except PlatformError as exc:
            raise _KbdPeerError(f"cannot use page-gref {ref}, event-channel {remote_port}: "
                                f"{exc}") from None
        session.start()
        self.session, self.mode = session, mode
        if self.on_connect is not None:
            self.on_connect(self)

    def send(self, ev: InputEvent) -> bool:
        """Deliver ``ev`` if connected; returns whether a session took it."""
        session = self.session
        if session is None:
            self.stats["not_connected"] += 1
            return False
        session.send(ev)
        return True

    async def disconnect(self) -> None:
        """Stop the session (unmaps, unbinds)."""
        if self.session is not None:
            session, self.session = self.session, None
            with contextlib.suppress(LocalError, PlatformError):
                session.close()
            if self.on_disconnect is not None:
                self.on_disconnect(self)


async def toolstack_config(own: PeerKeys, base: KeyboardConfig) -> KeyboardConfig:
    """``base`` with what the toolstack wrote in the backend directory before the backend
    started (as libxl does for a vkbd: ``feature-*``, ``width``, ``height``,
    ``multi-touch-*``, ``unique-id``).  The directory is dom0's and the backend's, never
    the guest's (R14); a malformed value is a :class:`~xenpv.errors.LocalError`."""
    try:
        top = K.RAW_POINTER_MAX
        mt = base.multi_touch
        if await own.feature(K.XENKBD_FIELD_FEAT_MTOUCH, mt is not None):
            w0, h0, n0 = mt if mt is not None else (base.width, base.height, 10)
            mt = (await own.uint(K.XENKBD_FIELD_MT_WIDTH, 1, top, default=w0),
                  await own.uint(K.XENKBD_FIELD_MT_HEIGHT, 1, top, default=h0),
                  await own.uint(K.XENKBD_FIELD_MT_NUM_CONTACTS, 1, 256, default=n0))
        else:
            mt = None
        return replace(
            base,
            abs_pointer=await own.feature(K.XENKBD_FIELD_FEAT_ABS_POINTER, base.abs_pointer),
            raw_pointer=await own.feature(K.XENKBD_FIELD_FEAT_RAW_POINTER, base.raw_pointer),
            disable_keyboard=await own.feature(K.XENKBD_FIELD_FEAT_DSBL_KEYBRD,
                                               base.disable_keyboard),
            disable_pointer=await own.feature(K.XENKBD_FIELD_FEAT_DSBL_POINTER,
                                              base.disable_pointer),
            width=await own.uint(K.XENKBD_FIELD_WIDTH, 1, top, default=base.width),
            height=await own.uint(K.XENKBD_FIELD_HEIGHT, 1, top, default=base.height),
            unique_id=await own.text(K.XENKBD_FIELD_UNIQUE_ID, default=base.unique_id),
            multi_touch=mt)
    except PeerError as exc:
        raise LocalError(f"toolstack vkbd settings: {exc}") from None


class KeyboardBackend:
    """Serves every ``vkbd`` device of this domain and routes input to the guests.

    One :class:`KeyboardBackendDriver` per device (a
    :class:`~xenpv.xenbus.watcher.BackendWatcher`); each connected device becomes the
    :class:`~xenpv.backends.hid.router.FocusRouter` target of its guest's domid (the
    most recently connected device of a guest, if it has several).
    """

    def __init__(self, platform: Platform, client: XenbusClient,
                 config: KeyboardConfig | None = None, *,
                 router: FocusRouter | None = None, **driver_kw: Any) -> None:
        """Prepare; :meth:`start` begins serving."""
        self.platform = platform
        self.client = client
        self.config = config or KeyboardConfig()
        self.router = router if router is not None else FocusRouter()
        self.driver_kw = driver_kw
        self.drivers: dict[str, KeyboardBackendDriver] = {}
        self.watcher: BackendWatcher | None = None

    async def start(self) -> None:
        """Watch ``backend/vkbd`` of this domain."""
        def factory(client: XenbusClient, path: str) -> KeyboardBackendDriver:
            driver = KeyboardBackendDriver(self.platform, client, path, self.config,
                                           on_connect=self._connected,
                                           on_disconnect=self._disconnected,
                                           **self.driver_kw)
            self.drivers[path] = driver
            return driver

        self.watcher = BackendWatcher(self.client, self.platform.domid,
                                      K.XENKBD_DRIVER_NAME, factory)
        await self.watcher.start()

    def _connected(self, driver: KeyboardBackendDriver) -> None:
        self.router.add_target(driver.peer_domid, driver)

    def _disconnected(self, driver: KeyboardBackendDriver) -> None:
        if self.router.targets.get(driver.peer_domid) is driver:
            self.router.remove_target(driver.peer_domid)

    def connected(self) -> dict[int, KeyboardBackendDriver]:
        """Connected devices by guest domid."""
        return {d.peer_domid: d for d in self.drivers.values() if d.session is not None}

    async def close(self) -> None:
        """Stop serving (bounded, idempotent)."""
        if self.watcher is not None:
            watcher, self.watcher = self.watcher, None
            await watcher.close()
        await self.router.close()
        self.drivers.clear()

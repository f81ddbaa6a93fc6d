"""Ring channels: the shared request/response rings of a device and their ports.

Theory of operation
-------------------
Block, network, keyboard and USB devices talk over ``io/ring.h`` request/response rings
(xen-protocols.md §1, §5.3): the frontend grants the ring pages and allocates one event
channel per ring, writes where they are into its xenstore directory, and the backend
reads those keys, maps the pages and binds the port.  A *ring channel* is one such
ring with its port, on either side:

* :meth:`FrontChannel.create` shares ``2**order`` zeroed pages with the backend (one
  contiguous run, ``refs`` in page order, page 0 holds the ring header) and allocates a
  port for it; the ring is initialised as a :class:`~xenpv.rings.FrontRing`.
* :meth:`BackChannel.attach` maps the refs the frontend wrote, binds its port and
  attaches a :class:`~xenpv.rings.BackRing`.  A ref that cannot be mapped or a port that
  cannot be bound is the peer's fault: :class:`RingChannelPeerError` (a
  :class:`~xenpv.errors.PeerError` carrying ``EINVAL`` for the ``error`` node).

Each channel holds its platform objects in a :class:`~.resources.DeviceResources`, so a
half-done setup and the final :meth:`~_Channel.close` are undone in one place, and shares
the backend still maps go to the quarantine.

The keys (§5.3), written by :func:`front_keys` and read strictly by
:func:`read_ring_keys`:

* one queue, one page: ``ring-ref`` and ``event-channel``;
* one queue, ``order`` > 0: ``ring-page-order`` and ``ring-ref0`` … ``ring-ref{2^order-1}``;
* ``n`` ≥ 2 queues: ``multi-queue-num-queues`` = n and ``ring-page-order`` at the top
  level, and ``queue-K/ring-ref[J]`` + ``queue-K/event-channel`` per queue (the
  ``queue-K`` node itself empty); no top-level ring or port keys.

The key names are a :class:`RingKeys` (block's defaults; a device with other names, such
as ``tx-ring-ref``, makes its own).  The backend checks ``ring-page-order`` and the queue
count against the maxima it advertised before it reads any further key, so a hostile
value cannot make it read (or map) many.
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass

from xenpv.drivers.quarantine import GrantQuarantine
from xenpv.drivers.resources import DeviceResources
from xenpv.errors import PeerError, PlatformError
from xenpv.platforms.base import Platform
from xenpv.rings import BackRing, FrontRing
from xenpv.xenbus import keys as _keys
from xenpv.xenbus.driver import PeerKeys

__all__ = [
    "BackChannel",
    "FrontChannel",
    "RingChannelPeerError",
    "RingKeys",
    "RingPlacement",
    "front_keys",
    "read_ring_keys",
]

#: Most pages of one ring a backend maps: io/blkif.h XENBUS_MAX_RING_GRANT_ORDER is 4.
MAX_RING_ORDER = 4
#: Offset of ``rsp_prod`` in the shared ring header (io/ring.h: req_prod, req_event, rsp_prod).
_RSP_PROD = 8


class RingChannelPeerError(PeerError):
    """The frontend's ring keys name something that cannot be used (``EINVAL``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = _errno.EINVAL


@dataclass(frozen=True)
class RingKeys:
    """The key names of one device's ring layout (block's by default, §5.3)."""

    ring_ref: str = "ring-ref"
    event_channel: str = "event-channel"
    page_order: str = "ring-page-order"
    num_queues: str = "multi-queue-num-queues"
    queue_prefix: str = "queue-"


@dataclass(frozen=True)
class RingPlacement:
    """Where one queue's ring is, as the frontend wrote it: refs in page order and the
    frontend's port."""

    refs: tuple[int, ...]
    port: int


class _Channel:
    """What both sides of a ring channel share: the resources, the port, the memory."""

    def __init__(self, res: DeviceResources, peer_domid: int, port: int, order: int,
                 slot_size: int) -> None:
        self.res = res
        self.peer_domid = peer_domid
        #: The local port of this ring.
        self.port = port
        self.order = order
        self.slot_size = slot_size

    @property
    def quarantine(self) -> GrantQuarantine:
        """Where shares the peer still maps at close go."""
        return self.res.quarantine

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self.res.released

    def _release_ring(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Let go of the ring, its pages and its port (idempotent)."""
        if not self.res.released:
            self._release_ring()
            self.res.release()


class FrontChannel(_Channel):
    """The frontend end of one ring: granted pages (``refs``), a :class:`FrontRing`, a
    port."""

    def __init__(self, res: DeviceResources, backend_domid: int, port: int, ring: FrontRing,
                 refs: tuple[int, ...], order: int, slot_size: int) -> None:
        """Made by :meth:`create`."""
        super().__init__(res, backend_domid, port, order, slot_size)
        self.ring = ring
        self.refs = refs

    @classmethod
    def create(cls, platform: Platform, backend_domid: int, *, slot_size: int,
               order: int = 0, quarantine: GrantQuarantine | None = None,
               shared_port: int | None = None) -> FrontChannel:
        """Share ``2**order`` pages with ``backend_domid``, initialise the ring in them and
        allocate its port (or use ``shared_port``, a port another channel holds: one
        event channel for several rings, as netif's unsplit TX/RX).  Nothing stays held
        if a step fails."""
        if not 0 <= order <= MAX_RING_ORDER:
            raise ValueError(f"ring page order {order} not in 0..{MAX_RING_ORDER}")
        res = DeviceResources(platform.grants, platform.events, quarantine)
        with res.undo_on_error():
            pages = res.grant(backend_domid, 1 << order)
            port = res.alloc_unbound(backend_domid) if shared_port is None else shared_port
            ring = FrontRing(pages.mem, slot_size)
        return cls(res, backend_domid, port, ring, tuple(pages.refs), order, slot_size)

    def _release_ring(self) -> None:
        self.ring.release()


class BackChannel(_Channel):
    """The backend end of one ring: mapped pages, a :class:`BackRing`, a bound port."""

    def __init__(self, res: DeviceResources, frontend_domid: int, port: int, ring: BackRing,
                 order: int, slot_size: int) -> None:
        """Made by :meth:`attach`."""
        super().__init__(res, frontend_domid, port, order, slot_size)
        self.ring = ring

    @classmethod
    def attach(cls, platform: Platform, frontend_domid: int, placement: RingPlacement, *,
               slot_size: int, shared_port: int | None = None) -> BackChannel:
        """Map the ring pages and bind the port the frontend wrote (or use
        ``shared_port``, a local port another channel already bound for the same
        frontend port).  A ref or port that cannot be used raises
        :class:`RingChannelPeerError`; nothing stays held."""
        refs = placement.refs
        order = len(refs).bit_length() - 1
        if not refs or len(refs) != 1 << order or order > MAX_RING_ORDER:
            raise RingChannelPeerError(f"{len(refs)} ring pages is not a power of two "
                                       f"up to {1 << MAX_RING_ORDER}")
        res = DeviceResources(platform.grants, platform.events)
        with res.undo_on_error():
            try:
                mapping = res.map(frontend_domid, refs, writable=True)
            except PlatformError as exc:
                raise RingChannelPeerError(f"cannot map ring refs {list(refs)}: {exc}") from None
            try:
                port = (res.bind(frontend_domid, placement.port) if shared_port is None
                        else shared_port)
            except PlatformError as exc:
                raise RingChannelPeerError(
                    f"cannot bind event channel {placement.port}: {exc}") from None
            # Attach where the last backend stopped (Linux blkback does the same): the
            # frontend's rsp_prod, read once.  0 on a fresh ring; after a backend restart,
            # requests taken but never answered are served again instead of the new
            # backend answering old slots behind the frontend's rsp_cons.
            start = int.from_bytes(mapping.mem[_RSP_PROD:_RSP_PROD + 4], "little")
            ring = BackRing(mapping.mem, slot_size, start)
        return cls(res, frontend_domid, port, ring, order, slot_size)

    def _release_ring(self) -> None:
        self.ring.release()


def _ring_ref_keys(names: RingKeys, prefix: str, refs: tuple[int, ...], order: int
                   ) -> dict[str, str]:
    if order == 0:
        return {f"{prefix}{names.ring_ref}": str(refs[0])}
    return {f"{prefix}{names.ring_ref}{i}": str(ref) for i, ref in enumerate(refs)}


def front_keys(channels: list[FrontChannel], names: RingKeys = RingKeys(), *,
               always_num_queues: bool = False) -> dict[str, str]:
    """The frontend keys announcing ``channels`` (one per queue, all of one order), for
    :meth:`~xenpv.xenbus.driver.XenbusDriver.write_keys` (one transaction).

    ``always_num_queues`` writes ``multi-queue-num-queues`` even for one queue (what
    netfront does when the backend advertises multi-queue)."""
    if not channels:
        raise ValueError("no ring channels")
    order = channels[0].order
    if any(c.order != order for c in channels):
        raise ValueError("every queue's ring must have the same page order")
    out: dict[str, str] = {}
    if order:
        out[names.page_order] = str(order)
    if len(channels) == 1:
        c = channels[0]
        out.update(_ring_ref_keys(names, "", c.refs, order))
        out[names.event_channel] = str(c.port)
        if always_num_queues:
            out[names.num_queues] = "1"
        return out
    out[names.num_queues] = str(len(channels))
    for k, c in enumerate(channels):
        q = f"{names.queue_prefix}{k}"
        out[q] = ""
        out.update(_ring_ref_keys(names, f"{q}/", c.refs, order))
        out[f"{q}/{names.event_channel}"] = str(c.port)
    return out


async def read_ring_keys(peer: PeerKeys, *, max_order: int = 0, max_queues: int = 1,
                         names: RingKeys = RingKeys()) -> list[RingPlacement]:
    """Read the frontend's ring keys strictly (see the module docstring); one
    :class:`RingPlacement` per queue.  Bounds are checked before any further key is read;
    a bad value raises :class:`~xenpv.xenbus.states.BadKeyError`."""
    order = _keys.parse_ring_page_order(await peer.raw(names.page_order), max_order,
                                        names.page_order)
    count = _keys.parse_num_queues(await peer.raw(names.num_queues), max_queues,
                                   names.num_queues)

    async def one(prefix: str) -> RingPlacement:
        if order == 0:
            refs = [await peer.grant_ref(f"{prefix}{names.ring_ref}")]
        else:
            refs = [await peer.grant_ref(f"{prefix}{names.ring_ref}{i}")
                    for i in range(1 << order)]
        return RingPlacement(tuple(refs), await peer.port(f"{prefix}{names.event_channel}"))

    if count == 1:
        return [await one("")]
    return [await one(f"{names.queue_prefix}{k}/") for k in range(count)]

"""The emulator's domain builder: each new domain's xenstore page and port.

Theory of operation
-------------------
On Xen the domain builder gives every new domain a xenstore connection before the guest
runs: a page of guest memory (``xenstore_domain_interface``), also granted to dom0 at the
reserved grant ref 1, and an event-channel port of the guest left unbound for dom0; the
toolstack then sends ``INTRODUCE <domid> <gfn> <port>`` to dom0's xenstored, which maps
the page and binds the port.  The guest kernel finds both in its start info.

:func:`build_xenstore_ring` does the same on the emulated hypervisor with a *builder
handle* of the domain (a handle no process holds; it lives until the domain is
destroyed): one guest frame, that frame granted to dom0 at ref 1, one port unbound for
dom0.  The result, a :class:`XenstoreRing`, is kept in ``hv.xenstore_rings`` until the
domain goes.  Who introduces it is the caller's business (the dom0 xenstored in use:
:mod:`xenpv.platforms.loopback.xsd`).

A process acting as the guest takes the connection over with
:func:`adopt_xenstore_ring` (the in-process platform's and the client platform's
``xenstore_ring()``; across processes the daemon's ``XS_RING`` request): it gets the
page's descriptor and the port, *lent* to its event-channel handle
(:meth:`~xenpv.platforms.loopback.core.Hypervisor.lend_port`) — when that handle closes
(the process exits) the port goes back to the builder handle, bound to dom0's xenstored
as before, so the next process can adopt it again and reconnect (the ring's
reconnection protocol gives it a fresh connection).  One process at a time: a second
adopter while the port is lent gets ``EBUSY``.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from xenpv.errors import PlatformError
from xenpv.platforms.loopback.core import Handle, Hypervisor, Port, Share

__all__ = ["XENSTORE_REF", "XenstoreRing", "adopt_xenstore_ring", "build_xenstore_ring",
           "xenstore_ring_of"]

#: grant_table.h GNTTAB_RESERVED_XENSTORE.
XENSTORE_REF = 1


@dataclass(eq=False)
class XenstoreRing:
    """What the domain builder made for one domain's xenstore connection."""

    domid: int
    #: The guest frame holding the page (the ``gfn`` argument of INTRODUCE).
    gfn: int
    #: The guest's port, unbound for dom0 (the ``port`` argument of INTRODUCE).
    port: int
    #: The builder handle owning the frame, the ref-1 grant and the port.
    handle: Handle
    frames: Share
    grant: Share


def build_xenstore_ring(hv: Hypervisor, domid: int) -> XenstoreRing:
    """Give ``domid`` its xenstore page (a frame, granted to dom0 at ref 1) and port."""
    h = hv.open_handle(domid)
    try:
        frames = hv.alloc_frames(h, 1)
        gfn = frames.refs[0]
        grant = hv.grant_frame(h, gfn, 0, reserved=XENSTORE_REF)
        port = hv.alloc_unbound(h, 0)
    except BaseException:
        hv.close_handle(h)
        raise
    ring = XenstoreRing(domid, gfn, port.port, h, frames, grant)
    rings = hv.xenstore_rings
    rings[domid] = ring
    h.on_close.append(lambda: rings.pop(domid, None) if rings.get(domid) is ring else None)
    return ring


def xenstore_ring_of(hv: Hypervisor, domid: int) -> XenstoreRing:
    """The builder's ring of ``domid`` (``ENOENT`` if the builder made none)."""
    ring: XenstoreRing | None = hv.xenstore_rings.get(domid)
    if ring is None:
        raise PlatformError(f"dom{domid} has no xenstore ring from the domain builder",
                            errno.ENOENT)
    return ring


def adopt_xenstore_ring(hv: Hypervisor, h: Handle) -> tuple[XenstoreRing, Port]:
    """Lend ``h``'s domain's xenstore port to ``h`` (see the module docstring); the ring
    (its frame's memory is ``ring.frames.pages()``) and the port."""
    ring = xenstore_ring_of(hv, h.domain.domid)
    port = ring.handle.ports.get(ring.port)
    if port is None:
        raise PlatformError(f"dom{ring.domid}'s xenstore port is in use", errno.EBUSY)
    hv.lend_port(port, h)
    return ring, port


def ring_holdings(hv: Hypervisor, domid: int) -> dict[str, int]:
    """What the builder's xenstore rings account for in ``domid``'s resources: for a
    guest, its page (one frame, one grant, two shares), its port and the builder handle;
    for the domain serving the ring (dom0's xenstored), its mapping and port of it.

    Accounting that tells what the domain's *processes* hold (``loopback stats``, leak
    checks) subtracts these, since on Xen they are part of the domain itself."""
    out = {"grants": 0, "frames": 0, "shares": 0, "handles": 0, "ports": 0, "mappings": 0}
    dom = hv.domains.get(domid)
    if dom is None:
        return out
    for ring in hv.xenstore_rings.values():
        entries = {id(ring.frames.entries[0]), id(ring.grant.entries[0])}
        if ring.domid == domid and not ring.handle.closed:
            out["grants"] += 1
            out["frames"] += 1
            out["shares"] += 2
            out["handles"] += 1
            out["ports"] += ring.port in dom.ports
        guest_port = hv.domains[ring.domid].ports.get(ring.port)
        remote = guest_port.remote if guest_port is not None else None
        if remote is not None and remote.domain is dom:
            out["ports"] += 1
        for h in dom.handles.values():
            out["mappings"] += sum(
                1 for m in h.mappings.values() if any(id(e) in entries for e in m.entries)
            )
    return out

"""What one device connection holds (shared pages, mappings, a port), released in one place.

Theory of operation
-------------------
Setting up a split-driver connection acquires platform objects one after another: pages
shared with the peer, the peer's pages mapped here, an event-channel port.  Any step may
fail (a full grant table, a bad ref from a hostile peer), and whatever was acquired
before must then be given back; at teardown all of it goes.  :class:`DeviceResources`
records each acquisition as it succeeds and :meth:`~DeviceResources.release` undoes them
all, once: mappings are unmapped (their unmap notifications fire), shares are ended,
those the peer still maps going to the :class:`~.quarantine.GrantQuarantine` instead of
being reused (R8), and the ports are unbound last (optionally signalled first).

Drivers therefore write setup as a straight sequence of ``res.grant(...)``,
``res.map(...)``, ``res.alloc_unbound(...)`` / ``res.bind(...)`` inside
``with res.undo_on_error():`` and never write undo code themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from xenpv.drivers.quarantine import GrantQuarantine, end_shares, unmap_all
from xenpv.errors import LocalError, PlatformError
from xenpv.platforms.base import (
    EventChannels,
    GrantTable,
    MappedGrants,
    SharedPages,
    UnmapNotify,
)

__all__ = ["DeviceResources"]


class DeviceResources:
    """Shares, mappings and ports of one device connection; see the module docstring.

    ``quarantine`` receives shares the peer still maps at release (a private one is made
    if none is given)."""

    def __init__(self, grants: GrantTable, events: EventChannels,
                 quarantine: GrantQuarantine | None = None) -> None:
        """Nothing held yet."""
        self.grants = grants
        self.events = events
        self.quarantine = quarantine if quarantine is not None else GrantQuarantine(grants)
        self.shares: list[SharedPages] = []
        self.mappings: list[MappedGrants] = []
        self.ports: list[int] = []
        self.released = False

    # -- acquiring
    def grant(self, domid: int, count: int = 1, *, writable: bool = True,
              notify: UnmapNotify | None = None) -> SharedPages:
        """Share ``count`` zeroed pages with ``domid`` (held until :meth:`release`)."""
        pages = self.grants.grant(domid, count, writable=writable, notify=notify)
        self.shares.append(pages)
        return pages

    def adopt(self, pages: SharedPages) -> SharedPages:
        """Hold a share made another way (a reserved ref, a granted frame): it is ended
        (or quarantined) at :meth:`release` like the others."""
        self.shares.append(pages)
        return pages

    def map(self, domid: int, refs: Sequence[int], *, writable: bool = True,
            notify: UnmapNotify | None = None) -> MappedGrants:
        """Map grants ``refs`` of ``domid`` (all or nothing; held until :meth:`release`)."""
        mapping = self.grants.map(domid, refs, writable=writable, notify=notify)
        self.mappings.append(mapping)
        return mapping

    def alloc_unbound(self, remote_domid: int) -> int:
        """A new port for ``remote_domid`` to bind (held until :meth:`release`)."""
        port = self.events.alloc_unbound(remote_domid)
        self.ports.append(port)
        return port

    def bind(self, remote_domid: int, remote_port: int) -> int:
        """Bind the port ``remote_domid`` offered (held until :meth:`release`)."""
        port = self.events.bind_interdomain(remote_domid, remote_port)
        self.ports.append(port)
        return port

    @contextlib.contextmanager
    def undo_on_error(self) -> Iterator[DeviceResources]:
        """``with res.undo_on_error():`` — any exception releases what was acquired."""
        try:
            yield self
        except BaseException:
            self.release()
            raise

    # -- releasing
    def release(self, *, notify: bool = False) -> None:
        """Unmap the mappings (their unmap notifications fire), end the shares
        (quarantining those the peer still maps), then unbind the ports — with ``notify``
        each port is signalled first, so the peer looks at the ring once more and sees
        us gone.  Idempotent; a handle already closed is not an error."""
        if self.released:
            return
        self.released = True
        mappings, self.mappings = self.mappings, []
        unmap_all(self.grants, reversed(mappings))
        shares, self.shares = self.shares, []
        end_shares(self.quarantine, reversed(shares))
        ports, self.ports = self.ports, []
        for port in ports:
            if notify:
                with contextlib.suppress(LocalError, PlatformError):
                    self.events.notify(port)
            with contextlib.suppress(LocalError, PlatformError):
                self.events.unbind(port)
        with contextlib.suppress(LocalError, PlatformError):
            self.quarantine.reap()

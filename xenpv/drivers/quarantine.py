"""Pages a peer still maps: kept aside, never reused, ended once the peer lets go (R8).

Theory of operation
-------------------
Ending access to a shared page fails with :class:`~xenpv.platforms.base.GrantInUse`
while the grantee still maps it, and then *nothing* was ended: the page must neither be
reused nor forgotten.  A :class:`GrantQuarantine` holds such page runs for one grant table
and retries ending them: on :meth:`~GrantQuarantine.reap` (drivers call it whenever they
set up or tear down, so a quarantine drains as a side effect of normal work) and in
:meth:`~GrantQuarantine.drain`, which waits (bounded) until the peer has let go.

Who owns it
-----------
A quarantine is an ordinary object, not a module-level list: one per grant table, held by
whoever owns the drivers on that table.  Every driver takes an optional ``quarantine=``
argument; given none, it makes its own (exposed as its ``quarantine`` attribute).  A
program that opens many devices on one platform passes one quarantine to all of them, so
that each new setup also retries what earlier ones left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

from xenpv.errors import LocalError, PlatformError
from xenpv.platforms.base import GrantInUse, GrantTable, MappedGrants, SharedPages

__all__ = ["GrantQuarantine", "end_shares", "unmap_all"]

log = logging.getLogger(__name__)


class GrantQuarantine:
    """Shares of ``grants`` whose grantee still maps them; see the module docstring."""

    def __init__(self, grants: GrantTable) -> None:
        """An empty quarantine for the shares of ``grants``."""
        self.grants = grants
        self._held: list[SharedPages] = []
        #: Shares ever put into quarantine (diagnostics).
        self.quarantined_total = 0

    def __len__(self) -> int:
        return len(self._held)

    def end(self, pages: SharedPages) -> bool:
        """End access to ``pages``; if the grantee still maps them, keep them here.

        Returns True when ended now.  Errors other than :class:`GrantInUse` propagate."""
        try:
            self.grants.end_access(pages)
        except GrantInUse as exc:
            log.debug("share %s still mapped by dom%d (%s): quarantined",
                      pages.refs, pages.domid, exc)
            self._held.append(pages)
            self.quarantined_total += 1
            return False
        return True

    def reap(self) -> int:
        """Retry every held share; returns how many the peer still maps.

        A share whose handle was closed meanwhile is dropped (its close ended it)."""
        left: list[SharedPages] = []
        for pages in self._held:
            try:
                self.grants.end_access(pages)
            except GrantInUse:
                left.append(pages)
            except (LocalError, PlatformError):
                pass  # the handle was closed meanwhile: everything went with it
        self._held = left
        return len(left)

    def drain_blocking(self, timeout: float) -> bool:
        """Retry for up to ``timeout`` seconds (sleeping); True once empty."""
        deadline = time.monotonic() + timeout
        while self.reap():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    async def drain(self, timeout: float) -> bool:
        """asyncio: retry for up to ``timeout`` seconds; True once empty."""
        deadline = time.monotonic() + timeout
        while self.reap():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True


def end_shares(quarantine: GrantQuarantine, shares: Iterable[SharedPages | None]) -> None:
    """End our shares; still-mapped ones go to ``quarantine``.  ``None`` entries are
    skipped; a refusal by a handle already closed is ignored (the close released them)."""
    for pages in shares:
        if pages is not None:
            with contextlib.suppress(PlatformError, LocalError):
                quarantine.end(pages)


def unmap_all(grants: GrantTable, mappings: Iterable[MappedGrants | None]) -> None:
    """Unmap our mappings (their unmap notifications fire); ``None`` entries are skipped
    and a refusal by a handle already closed is ignored."""
    for mapping in mappings:
        if mapping is not None:
            with contextlib.suppress(PlatformError, LocalError):
                grants.unmap(mapping)

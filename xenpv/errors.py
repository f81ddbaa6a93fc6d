"""The two kinds of error xenpv raises, never confused.

* :class:`LocalError` (and subclasses) report misuse of xenpv's own API by the caller:
  wrong arguments, calls in the wrong state.  They are bugs in the calling program.
* :class:`PeerError` (and subclasses) report that something another domain wrote (ring
  bytes, indexes, xenstore values, event storms) broke the protocol.  The peer is then
  marked misbehaving.  Hostile input may only ever produce a :class:`PeerError`; this is
  also the invariant the fuzzers check.
"""

from __future__ import annotations


class XenpvError(Exception):
    """Base class of every error xenpv raises on purpose."""


class LocalError(XenpvError):
    """The caller misused xenpv's API (a bug on this side)."""


class PeerError(XenpvError):
    """A peer domain violated the protocol; the peer is to be treated as misbehaving."""


class RingOverflowError(PeerError):
    """A peer-controlled ring index claims more entries than the ring can hold."""


class PlatformError(XenpvError):
    """The platform (hypervisor, emulator, device file) refused or failed an operation.

    ``errno`` carries the errno value where one applies.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

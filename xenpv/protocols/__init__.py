"""Wire formats of Xen's paravirtual device protocols (sans-IO), shared by both halves.

One module per device, each naming things after Xen's public headers so a reader can hold
the code against the spec:

* :mod:`~xenpv.protocols.layout` -- the machinery every module uses: :class:`Layout`
  (a record's ``struct.Struct`` and numpy ``dtype`` built from one field list),
  :class:`Record` (immutable parsed form with ``parse``/``pack``/``pack_into``), and
  :class:`RingLayout` (``io/ring.h`` slot geometry).
* :mod:`~xenpv.protocols.blkif`, :mod:`~xenpv.protocols.netif`,
  :mod:`~xenpv.protocols.console`, :mod:`~xenpv.protocols.kbdif`,
  :mod:`~xenpv.protocols.vchan`, :mod:`~xenpv.protocols.xsring`,
  :mod:`~xenpv.protocols.usbif` -- the device protocols.

Grant-table and event-channel facts the platforms need live with the platform interfaces
(:mod:`xenpv.platforms.base`), below this layer; numbers peers write in xenstore are
parsed by :func:`xenpv.xenstore.values.parse_xs_number`.

Nothing here performs I/O.  Parsing never trusts the bytes: the validation helpers check a
parsed (private) copy and raise :class:`ProtocolError` (a :class:`~xenpv.errors.PeerError`)
for anything a peer could have written out of range.  Misuse of the API by the caller
(packing a value that does not fit, a buffer too short) raises
:class:`~xenpv.errors.LocalError`.
"""

from __future__ import annotations

from xenpv.errors import PeerError


class ProtocolError(PeerError):
    """A peer-supplied value breaks a device protocol (out of range, unknown, inconsistent).

    ``errno`` is the errno a driver reports for it where one applies (``EINVAL``,
    ``ERANGE``, ``ENOENT`` from :func:`xenpv.xenstore.values.parse_xs_number`), else ``None``.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


__all__ = ["ProtocolError"]

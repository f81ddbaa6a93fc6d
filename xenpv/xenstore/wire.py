"""Xenstore wire codec (sans-IO).

Theory of operation
-------------------
Every xenstore message, in either direction and on every transport (Unix socket,
``/dev/xen/xenbus``, the shared ring page), is a 16-byte header followed by ``len`` payload
bytes (``io/xs_wire.h: struct xsd_sockmsg``)::

    u32 type | u32 req_id | u32 tx_id | u32 len     (little-endian on x86)

``len`` is at most ``XENSTORE_PAYLOAD_MAX`` (4096) in both directions.  Payloads are
sequences of NUL-terminated strings, except the value of WRITE (after the path) and the
reply to READ, which are raw bytes.

:func:`encode` builds one message; :class:`Decoder` is a stream parser in the style of
h11: bytes go in through :meth:`Decoder.feed`, complete :class:`Message` objects come out
of :meth:`Decoder.next_message`.  A length beyond the limit is a :class:`WireError` (a
:class:`~xenpv.errors.PeerError`): the other side broke the protocol and the connection
must be dropped, because the stream can no longer be re-synchronised.  Nothing here does
I/O.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from xenpv.errors import LocalError, PeerError

__all__ = [
    "ABS_PATH_MAX",
    "ERRNO",
    "ERRORS",
    "HEADER",
    "HEADER_SIZE",
    "OK",
    "PAYLOAD_MAX",
    "REL_PATH_MAX",
    "XS_TYPE_COUNT_417",
    "Decoder",
    "Message",
    "WireError",
    "XenstoreError",
    "XsType",
    "encode",
    "errno_of",
    "error_reply_payload",
    "fields",
    "join",
    "parse_error",
]


class XsType(enum.IntEnum):
    """Message types (``io/xs_wire.h: enum xsd_sockmsg_type``)."""

    CONTROL = 0
    DEBUG = 0  # io/xs_wire.h: XS_DEBUG is the old name of XS_CONTROL
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESTRICT = 20  # removed from the protocol; always invalid
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    GET_FEATURE = 23  # upstream (after 4.17)
    SET_FEATURE = 24  # upstream
    GET_QUOTA = 25  # upstream
    SET_QUOTA = 26  # upstream
    INVALID = 0xFFFF


#: ``XS_TYPE_COUNT`` in the Xen 4.17 header (types 0..22).
XS_TYPE_COUNT_417 = 23

#: ``io/xs_wire.h: xsd_errors[]`` in table order (new names are only ever appended).
ERRORS: tuple[str, ...] = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)

#: Linux errno numbers of the names in :data:`ERRORS`.
ERRNO: dict[str, int] = {
    "EINVAL": 22,
    "EACCES": 13,
    "EEXIST": 17,
    "EISDIR": 21,
    "ENOENT": 2,
    "ENOMEM": 12,
    "ENOSPC": 28,
    "EIO": 5,
    "ENOTEMPTY": 39,
    "ENOSYS": 38,
    "EROFS": 30,
    "EBUSY": 16,
    "EAGAIN": 11,
    "EISCONN": 106,
    "E2BIG": 7,
    "EPERM": 1,
}

#: io/xs_wire.h: struct xsd_sockmsg { uint32_t type, req_id, tx_id, len; }
HEADER = struct.Struct("<IIII")
HEADER_SIZE = 16
#: io/xs_wire.h: XENSTORE_PAYLOAD_MAX
PAYLOAD_MAX = 4096
#: io/xs_wire.h: XENSTORE_ABS_PATH_MAX
ABS_PATH_MAX = 3072
#: io/xs_wire.h: XENSTORE_REL_PATH_MAX
REL_PATH_MAX = 2048
#: The payload of every "OK" reply.
OK = b"OK\0"


class WireError(PeerError):
    """The peer sent bytes that are not a valid xenstore message stream."""


class XenstoreError(Exception):
    """The xenstore server answered a request with an ``ERROR`` reply.

    ``errno_name`` is the name from the wire (e.g. ``"ENOENT"``), ``errno`` its Linux
    number.  It is neither a local nor a peer error: the server legitimately refused.
    """

    def __init__(self, errno_name: str, message: str | None = None) -> None:
        self.errno_name = errno_name
        self.errno = errno_of(errno_name)
        super().__init__(message or errno_name)


@dataclass(frozen=True, slots=True)
class Message:
    """One xenstore message: header fields and raw payload."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        """Return the message's wire bytes."""
        return encode(self.type, self.req_id, self.tx_id, self.payload)


def encode(type: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """Return header + payload for one message.

    Raises :class:`LocalError` if the payload exceeds :data:`PAYLOAD_MAX` or a header
    field does not fit in a u32.
    """
    n = len(payload)
    if n > PAYLOAD_MAX:
        raise LocalError(f"xenstore payload of {n} bytes exceeds {PAYLOAD_MAX}")
    try:
        return HEADER.pack(type, req_id, tx_id, n) + payload
    except struct.error as exc:
        raise LocalError(f"xenstore header field out of range: {exc}") from None


class Decoder:
    """Sans-IO stream parser for xenstore messages.

    Feed it bytes as they arrive (any chunking); take complete messages out with
    :meth:`next_message` or by iterating.  After a :class:`WireError` the decoder stays
    broken (the stream cannot be re-synchronised) and keeps raising.
    """

    __slots__ = ("_buf", "_error", "_max_payload", "_pos")

    def __init__(self, max_payload: int = PAYLOAD_MAX) -> None:
        """Create a decoder rejecting payloads longer than ``max_payload``."""
        self._buf = bytearray()
        self._pos = 0
        self._max_payload = max_payload
        self._error: WireError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes (copied: the caller may reuse its buffer)."""
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Number of received bytes not yet returned as messages."""
        return len(self._buf) - self._pos

    def next_message(self) -> Message | None:
        """Return the next complete message, or ``None`` if more bytes are needed.

        Raises :class:`WireError` if the header announces a payload beyond the limit.
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < HEADER_SIZE:
            return None
        type_, req_id, tx_id, length = HEADER.unpack_from(buf, pos)
        if length > self._max_payload:
            self._error = WireError(
                f"xenstore message announces {length} payload bytes (limit {self._max_payload})"
            )
            raise self._error
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            return None
        payload = bytes(buf[pos + HEADER_SIZE : end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        elif end > 65536:
            del buf[:end]
            self._pos = 0
        else:
            self._pos = end
        return Message(type_, req_id, tx_id, payload)

    def __iter__(self) -> Iterator[Message]:
        """Yield every complete message buffered so far."""
        while True:
            msg = self.next_message()
            if msg is None:
                return
            yield msg


def fields(payload: bytes) -> list[bytes]:
    """Split a payload of NUL-terminated strings.

    ``b"a\\0b\\0"`` → ``[b"a", b"b"]``; an empty payload gives ``[]``.  Bytes after the
    last NUL (an unterminated last field) are returned as a final field.
    """
    if not payload:
        return []
    parts = payload.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return parts


def join(*items: str | bytes) -> bytes:
    """Build a payload of NUL-terminated strings (``str`` is encoded as UTF-8)."""
    out = bytearray()
    for item in items:
        out += item.encode() if isinstance(item, str) else item
        out += b"\0"
    return bytes(out)


def error_reply_payload(name: str) -> bytes:
    """Return the payload of an ``ERROR`` reply for errno ``name`` (``b"ENOENT\\0"``)."""
    return name.encode("ascii") + b"\0"


def parse_error(payload: bytes) -> str:
    """Return the errno name carried by an ``ERROR`` payload; unknown names → ``"EINVAL"``."""
    name = payload.split(b"\0", 1)[0]
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        return "EINVAL"
    return text if text in ERRNO else "EINVAL"


def errno_of(name: str) -> int:
    """Return the Linux errno number of a xenstore error name (unknown → EINVAL's 22)."""
    return ERRNO.get(name, ERRNO["EINVAL"])

"""Wire format of the loopback control protocol (sans-IO; see docs/loopback-protocol.md).

Only layouts, constants and pure encode/decode helpers live here; the daemon
(``daemon.py``) and the Python client (``client.py``) do the socket I/O.
"""

from __future__ import annotations

import enum
import socket
import struct

VERSION = 1
MAX_MESSAGE = 131072
MAX_FDS = 250
#: control space sized for the kernel's SCM_MAX_FD (253)
CMSG_SPACE = socket.CMSG_SPACE(253 * 4)

#: recvmsg flags of a message that did not fit (a plain int: enum arithmetic per message
#: costs more than the rest of a small request's framing)
TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)

REQUEST = struct.Struct("<III")  # op, seq, len
REPLY = struct.Struct("<IIiI")  # op, seq, status, len

U32 = struct.Struct("<I")
U32x2 = struct.Struct("<II")
U32x3 = struct.Struct("<III")
U32x4 = struct.Struct("<IIII")
U32x6 = struct.Struct("<IIIIII")
HELLO_REPLY = U32x6  # version, domid, privileged, max_grants, max_ports, page_size
# grants, revoking, mappings, ports, shares, handles, xenstore watches
STATS_REPLY = struct.Struct("<IIIIIII")
SHARE_REQ = struct.Struct("<HHI")  # domid, flags, count
SHARE_RESERVED_REQ = struct.Struct("<IHH")  # ref, domid, flags
GRANT_FRAME_REQ = struct.Struct("<IIHH")  # gfn, ref (ANY_REF: a free one), domid, flags
ANY_REF = 0xFFFFFFFF
MAP_FAIL = struct.Struct("<Ii")  # index, GNTST
COPY_SEG = struct.Struct("<IHHIHHHHI")  # src ref, domid, off; dst ref, domid, off; len, flags, pad
STATUS_I32 = struct.Struct("<i")
NAME_MAX = 64

SHARE_WRITABLE = 1
END_DEFER = 1
MAP_WRITABLE = 1
GNTCOPY_source_gref = 1
GNTCOPY_dest_gref = 2
#: loopback extension: the local side lies in pages the caller shared or allocated itself
#: (its ref field holds the share's handle id, its domid field the page in the share)
GNTCOPY_source_own = 0x100
GNTCOPY_dest_own = 0x200
DOMFLAG_PRIVILEGED = 1
DOMFLAG_DYING = 2
DOMFLAG_RUNNING = 4
DOMFLAG_SHUTDOWN = 8
# DOMAIN_INFO entry: domid, flags (DOMFLAG_*), shutdown reason, uuid (xen_domain_handle_t)
DOMAIN_INFO_ENTRY = struct.Struct("<III16s")


class Op(enum.IntEnum):
    """Control operations (docs/loopback-protocol.md §4)."""

    HELLO = 1
    GNT_SHARE = 2
    GNT_END = 3
    GNT_MAP = 4
    GNT_UNMAP = 5
    GNT_SET_NOTIFY = 6
    GNT_COPY = 7
    EVT_ALLOC_UNBOUND = 8
    EVT_BIND_INTERDOMAIN = 9
    EVT_UNBIND = 10
    EVT_NOTIFY = 11
    EVT_RESTRICT = 12
    EVT_STATUS = 13
    DOMAIN_LIST = 14
    DOMAIN_CREATE = 15
    DOMAIN_DESTROY = 16
    STATS = 17
    FAULT = 18
    GNT_SHARE_RESERVED = 19
    FRAME_ALLOC = 20
    FOREIGN_MAP = 21
    GNT_GRANT_FRAME = 22
    EVT_BIND_VIRQ = 23
    DOMAIN_SHUTDOWN = 24
    DOMAIN_INFO = 25
    #: Take over the domain builder's xenstore page and port (``builder.py``).
    XS_RING = 32


class ProtocolViolation(Exception):
    """A message that cannot be framed (the connection must be dropped)."""


def encode_request(op: int, seq: int, payload: bytes = b"") -> bytes:
    """One request message."""
    return REQUEST.pack(op, seq, len(payload)) + payload


def decode_request(msg: bytes) -> tuple[int, int, bytes]:
    """``(op, seq, payload)`` of a request; :class:`ProtocolViolation` if unframeable."""
    if len(msg) < REQUEST.size:
        raise ProtocolViolation("short request header")
    op, seq, length = REQUEST.unpack_from(msg)
    if length != len(msg) - REQUEST.size:
        raise ProtocolViolation("request length disagrees with the message size")
    return op, seq, msg[REQUEST.size :]


def encode_reply(op: int, seq: int, status: int, payload: bytes = b"") -> bytes:
    """One reply message (fds travel separately as SCM_RIGHTS)."""
    return REPLY.pack(op, seq, status, len(payload)) + payload


def decode_reply(msg: bytes) -> tuple[int, int, int, bytes]:
    """``(op, seq, status, payload)`` of a reply."""
    if len(msg) < REPLY.size:
        raise ProtocolViolation("short reply header")
    op, seq, status, length = REPLY.unpack_from(msg)
    if length != len(msg) - REPLY.size:
        raise ProtocolViolation("reply length disagrees with the message size")
    return op, seq, status, msg[REPLY.size :]


def fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """Descriptors carried by an SCM_RIGHTS control message."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"<{usable // 4}i", data[:usable]))
    return fds


def ancdata_for(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """The SCM_RIGHTS control message carrying ``fds`` (empty list for none)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"<{len(fds)}i", *fds))]


"""Xenstore client operations, sans-IO: what to send and how to read the replies.

Theory of operation
-------------------
Both clients — the asyncio :class:`~xenpv.xenstore.client.XenstoreClient` and the
blocking :class:`~xenpv.xenstore.blocking.BlockingClient` — speak the same protocol;
only their I/O differs.  So every operation is written once here as a generator (an
:data:`Op`): it *yields* ``(type, payload)`` for each request it needs, is *sent* the
reply payload back, and *returns* the result.  An ``ERROR`` reply is *thrown* into it as
:class:`~xenpv.xenstore.wire.XenstoreError`, so an operation can turn an expected error
into a result (``exists``: ``ENOENT`` → ``False``) or into another request
(``directory``: ``E2BIG`` → a ``DIRECTORY_PART`` walk).  A reply that breaks the protocol
raises :class:`~xenpv.xenstore.wire.WireError` (a peer error); the driver then closes the
connection.  Nothing here touches a socket, a clock or an event loop (design.md rule 1).

A driver is a loop of a few lines: ``next(op)``, send the request, ``op.send(reply)`` or
``op.throw(error)``, until ``StopIteration`` carries the result.  The one-request
operations the hot paths use (READ) are also exposed as plain encoders so a driver can
skip the generator.

Also here, because both clients need them: :class:`Perm`, :class:`WatchEvent`, the
connection error, a transaction's life (:class:`TransactionLife`), path encoding (with a small cache of validated paths), watch-event
parsing, and the way libxenstore picks its connection (:func:`connect_candidates`).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from xenpv.errors import LocalError, PlatformError
from xenpv.xenstore import paths as _paths
from xenpv.xenstore import wire
from xenpv.xenstore.wire import WireError, XenstoreError, XsType

__all__ = [
    "DEFAULT_RUNDIR",
    "XENBUS_DEVICES",
    "InvalidPermError",
    "Op",
    "Perm",
    "TransactionLife",
    "WatchEvent",
    "XenstoreConnectionError",
    "check_token",
    "connect_candidates",
    "daemon_socket_path",
    "encode_path",
    "parse_watch_event",
]

T = TypeVar("T")

#: One request of an operation: (message type, payload).
Request = tuple[int, bytes]
#: An operation: yields requests, is sent reply payloads, returns its result.
Op = Generator[Request, bytes, T]

#: Build-time default of ``XENSTORED_RUNDIR`` in libxenstore.
DEFAULT_RUNDIR = "/var/run/xenstored"
#: Kernel devices carrying the xenstore protocol, in the order libxenstore tries them.
XENBUS_DEVICES = ("/dev/xen/xenbus", "/proc/xen/xenbus")
#: Retries of a DIRECTORY_PART walk whose generation keeps changing.
_DIRECTORY_PART_RESTARTS = 16
#: Bytes of child names one DIRECTORY_PART walk may collect (a server that never sends
#: the last chunk must not make a client loop and grow for ever; hostile-inputs R11).
DIRECTORY_PART_MAX = 1 << 22
#: Valid ordinary paths already encoded for the wire (validation is per request otherwise).
_PATH_CACHE: dict[str, bytes] = {}
_PATH_CACHE_SIZE = 1024


class XenstoreConnectionError(PlatformError):
    """The connection to the xenstore server is closed, lost or could not be opened."""


class InvalidPermError(LocalError, ValueError):
    """A permission entry is not a letter ``n r w b`` followed by a decimal domid."""


_PERM_LETTERS = "nrwb"


@dataclass(frozen=True, slots=True)
class Perm:
    """One xenstore permission entry (xen-protocols.md §4.6), e.g. ``b0`` or ``r5``.

    ``access`` is one of ``n`` (none), ``r`` (read), ``w`` (write), ``b`` (both).
    In a node's list, entry 0 names the owner and gives the access of unlisted domains.
    """

    access: str
    domid: int

    def __post_init__(self) -> None:
        """Check the letter and the domid range."""
        if self.access not in _PERM_LETTERS or len(self.access) != 1:
            raise InvalidPermError(f"invalid permission letter {self.access!r}")
        if not 0 <= self.domid <= 0xFFFF:
            raise InvalidPermError(f"domid {self.domid} out of range")

    @classmethod
    def parse(cls, text: str | bytes) -> Perm:
        """Parse ``"b0"`` / ``b"r5"``; raises :class:`InvalidPermError`."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        if len(text) < 2 or not text[1:].isdigit() or not text[1:].isascii():
            raise InvalidPermError(f"invalid permission entry {text!r}")
        return cls(text[0], int(text[1:]))

    def __str__(self) -> str:
        """Return the wire form, e.g. ``b0``."""
        return f"{self.access}{self.domid}"

    @property
    def can_read(self) -> bool:
        """True for ``r`` and ``b``."""
        return self.access in "rb"

    @property
    def can_write(self) -> bool:
        """True for ``w`` and ``b``."""
        return self.access in "wb"


class WatchEvent(NamedTuple):
    """One watch firing: the changed path (relative if the watch was) and the token."""

    path: str
    token: str


# -- connecting ----------------------------------------------------------------------------


def daemon_socket_path() -> str:
    """Return the socket path libxenstore would use: ``$XENSTORED_PATH`` or rundir/socket."""
    path = os.environ.get("XENSTORED_PATH")
    if path:
        return path
    rundir = os.environ.get("XENSTORED_RUNDIR") or DEFAULT_RUNDIR
    return os.path.join(rundir, "socket")


def connect_candidates(path: str | None) -> list[str]:
    """The paths a client tries, in order: ``path`` alone, or libxenstore's choice
    (``$XENSTORED_PATH``, else ``$XENSTORED_RUNDIR/socket``, then the xenbus devices)."""
    return [path] if path is not None else [daemon_socket_path(), *XENBUS_DEVICES]


def connect_error(candidates: list[str], last: BaseException | None) -> XenstoreConnectionError:
    """The error of a connection attempt that found no usable candidate."""
    code = last.errno if isinstance(last, OSError) else None
    return XenstoreConnectionError(
        f"cannot connect to xenstore ({', '.join(candidates)}): {last}",
        code if last is not None else errno.ENOENT,
    )


# -- encoding and parsing helpers ------------------------------------------------------------


def encode_path(path: str, *, special: bool = False) -> bytes:
    """Validate ``path`` and return it NUL-terminated for the wire.

    ``special`` admits ``@name`` watch paths.  Raises
    :class:`~xenpv.xenstore.paths.InvalidPathError` (a :class:`LocalError`).
    """
    if not special:
        cached = _PATH_CACHE.get(path)
        if cached is not None:
            return cached
    _paths.validate_path(path, allow_special=special)
    wire_path = path.encode("ascii") + b"\0"
    if not special:
        if len(_PATH_CACHE) >= _PATH_CACHE_SIZE:
            _PATH_CACHE.clear()
        _PATH_CACHE[path] = wire_path
    return wire_path


def ascii_field(raw: bytes, what: str) -> str:
    """Decode a field of a server reply; non-ASCII is a :class:`WireError`."""
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise WireError(f"non-ASCII {what} from xenstore: {raw[:64]!r}") from None


def malformed(text: str) -> WireError:
    """The error for a reply that breaks the protocol."""
    return WireError(f"malformed xenstore reply: {text}")


def arg(value: str | bytes | int) -> bytes:
    """One request argument as bytes (``str`` and ``int`` in their text form)."""
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def parse_watch_event(payload: bytes) -> WatchEvent:
    """Parse a ``WATCH_EVENT`` payload (``<path>\\0<token>\\0``); WireError if malformed."""
    parts = payload.split(b"\0")
    if len(parts) != 3 or parts[2] != b"" or not parts[0]:
        raise WireError(f"malformed xenstore watch event {payload[:80]!r}")
    return WatchEvent(ascii_field(parts[0], "watch path"), ascii_field(parts[1], "watch token"))


def reply_error(req_type: int, tx_id: int, msg: wire.Message) -> Exception | None:
    """What the reply ``msg`` to a request of ``req_type`` in ``tx_id`` carries instead of
    a result: a :class:`WireError` if it breaks the protocol (io/xs_wire.h: a reply has
    its request's type, req_id and tx_id), a :class:`XenstoreError` for an ``ERROR``
    reply, ``None`` for a good reply."""
    if msg.tx_id != tx_id:
        return WireError(f"xenstore reply tx_id {msg.tx_id} != request tx_id {tx_id}")
    if msg.type == XsType.ERROR:
        return XenstoreError(wire.parse_error(msg.payload))
    if msg.type != req_type:
        return WireError(f"xenstore reply of type {msg.type} to a request of type {req_type}")
    return None


def _below(path: str, top: str) -> bool:
    """Whether ``path`` is ``top`` or a node under it (special ``@`` paths: only itself)."""
    if path == top:
        return True
    prefix = top if top.endswith("/") else top + "/"
    return not top.startswith("@") and path.startswith(prefix)


def watch_fires(watch_path: str, path: str) -> bool:
    """Whether a watch on ``watch_path`` fires with an event for ``path``: a change at or
    below the watched node, or the removal of one of its ancestors (the event then names
    the removed node).  The server keys watches by (path, token), so a client routes an
    event to the watches of its token for which this holds."""
    return _below(path, watch_path) or _below(watch_path, path)


def _names(raw: Iterable[bytes]) -> list[str]:
    out = []
    for name in raw:
        if not name:
            raise malformed("empty child name")
        out.append(ascii_field(name, "child name"))
    return out


def _ok(reply: bytes, what: str) -> None:
    if reply != wire.OK:
        raise malformed(f"{what}: expected OK, got {reply[:64]!r}")


# -- operations ---------------------------------------------------------------------------


def read(path: str) -> Op[bytes]:
    """READ: the value of ``path`` (raw bytes)."""
    return (yield XsType.READ, encode_path(path))


def write(path: str, value: bytes | str) -> Op[None]:
    """WRITE ``value`` to ``path`` (missing parents are created)."""
    data = value.encode() if isinstance(value, str) else value
    # io/xs_wire.h: XS_WRITE payload is <path>\0<value>, the value not NUL-terminated
    _ok((yield XsType.WRITE, encode_path(path) + data), "WRITE")


def mkdir(path: str) -> Op[None]:
    """MKDIR ``path`` (and parents); existing values are untouched."""
    _ok((yield XsType.MKDIR, encode_path(path)), "MKDIR")


def rm(path: str) -> Op[None]:
    """RM ``path`` and its subtree (no error if absent but its parent exists)."""
    _ok((yield XsType.RM, encode_path(path)), "RM")


def exists(path: str) -> Op[bool]:
    """Whether ``path`` exists: a READ where ``ENOENT`` means False."""
    try:
        yield XsType.READ, encode_path(path)
    except XenstoreError as exc:
        if exc.errno_name == "ENOENT":
            return False
        raise
    return True


def directory(path: str) -> Op[list[str]]:
    """The names of the children of ``path``; a list too big for one reply (``E2BIG``)
    is fetched in chunks with ``DIRECTORY_PART``."""
    payload = encode_path(path)
    try:
        reply = yield XsType.DIRECTORY, payload
    except XenstoreError as exc:
        if exc.errno_name != "E2BIG":
            raise
        return (yield from _directory_part(payload))
    return _names(wire.fields(reply))


def _directory_part(path_arg: bytes) -> Op[list[str]]:
    # xen-protocols.md §4.2: DIRECTORY_PART <path>\0<offset>\0 -> <gen>\0<child>\0...,
    # the last chunk ends in an extra \0; a generation change means restart at 0.
    for _ in range(_DIRECTORY_PART_RESTARTS):
        names: list[bytes] = []
        offset = 0
        generation: bytes | None = None
        while True:
            reply = yield XsType.DIRECTORY_PART, path_arg + b"%d\0" % offset
            gen, sep, rest = reply.partition(b"\0")
            if not sep or not gen.isdigit():
                raise malformed(f"DIRECTORY_PART reply {reply[:64]!r}")
            if generation is None:
                generation = gen
            elif gen != generation:
                break
            final = rest == b"\0" or rest.endswith(b"\0\0") or rest == b""
            chunk = rest[:-1] if final and rest else rest
            if chunk and not chunk.endswith(b"\0"):
                raise malformed("DIRECTORY_PART chunk not NUL-terminated")
            new = chunk.split(b"\0")[:-1] if chunk else []
            if not final and not new:
                raise malformed("DIRECTORY_PART made no progress")
            names.extend(new)
            offset += len(chunk)
            if offset > DIRECTORY_PART_MAX:
                raise malformed(f"DIRECTORY_PART walk beyond {DIRECTORY_PART_MAX} bytes")
            if final:
                return _names(names)
    raise XenstoreError("EAGAIN", "directory kept changing during DIRECTORY_PART")


def get_perms(path: str) -> Op[list[Perm]]:
    """GET_PERMS: the permission list of ``path`` (entry 0 is the owner)."""
    items = wire.fields((yield XsType.GET_PERMS, encode_path(path, special=True)))
    if not items:
        raise malformed("empty permission list")
    try:
        return [Perm.parse(item) for item in items]
    except InvalidPermError as exc:
        raise malformed(str(exc)) from None


def set_perms(path: str, perms: Iterable[Perm | str]) -> Op[None]:
    """SET_PERMS: replace the permission list of ``path`` (first entry: the owner)."""
    entries = [p if isinstance(p, Perm) else Perm.parse(p) for p in perms]
    if not entries:
        raise LocalError("a permission list needs at least the owner entry")
    payload = encode_path(path, special=True) + wire.join(*(str(p) for p in entries))
    _ok((yield XsType.SET_PERMS, payload), "SET_PERMS")


def transaction_start() -> Op[int]:
    """TRANSACTION_START (sent with header tx_id 0, payload ``\\0``): the new tx_id."""
    reply = yield XsType.TRANSACTION_START, b"\0"
    text = reply[:-1] if reply.endswith(b"\0") else reply
    if not text.isdigit() or int(text) == 0 or int(text) > 0xFFFFFFFF:
        raise malformed(f"transaction id {reply[:32]!r}")
    return int(text)


def transaction_end(commit: bool) -> Op[None]:
    """TRANSACTION_END: commit (``T``) or abort (``F``)."""
    _ok((yield XsType.TRANSACTION_END, b"T\0" if commit else b"F\0"), "TRANSACTION_END")


#: What a transaction's ``with`` exit lets pass silently when it aborts after the block
#: raised (the block's own exception is the one to report).
_EXIT_QUIET = (XenstoreError, XenstoreConnectionError, WireError, TimeoutError)


class TransactionLife:
    """The life of a transaction, the same in both clients (only their I/O differs).

    ``new`` → ``open`` when TRANSACTION_START is answered (:meth:`_opened`) → ``committed``
    or ``aborted`` when TRANSACTION_END is answered, or ``failed`` when it was sent and no
    answer came (:meth:`_ending`); it is over either way.  Node operations need it
    ``open`` (:meth:`_check_open`).  Leaving the ``with`` block of an open transaction
    commits it, or aborts it (best effort) when the block raised: :meth:`_exit_end`.
    """

    _tx_id: int = 0
    _state: str = "new"

    @property
    def tx_id(self) -> int:
        """The server's transaction id (0 before start)."""
        return self._tx_id

    def _check_open(self) -> None:
        if self._state != "open":
            raise LocalError(f"transaction is {self._state}, not open")

    def _check_new(self) -> None:
        if self._state != "new":
            raise LocalError("transaction already started")

    def _opened(self, tx_id: int) -> None:
        self._tx_id = tx_id
        self._state = "open"

    @contextlib.contextmanager
    def _ending(self, commit: bool) -> Iterator[None]:
        """Around sending TRANSACTION_END (``commit`` or not) and taking its answer."""
        try:
            yield
        except BaseException:
            if self._state == "open":
                self._state = "failed"
            raise
        self._state = "committed" if commit else "aborted"

    def _exit_end(
        self, exc_type: type[BaseException] | None
    ) -> contextlib.AbstractContextManager[Any]:
        """What the ``with`` exit runs its TRANSACTION_END (commit when ``exc_type`` is
        None) under: nothing when the block finished (a failed commit is the error to
        report), the quiet errors suppressed when it raised (its own exception is)."""
        if exc_type is None:
            return contextlib.nullcontext()
        return contextlib.suppress(*_EXIT_QUIET)


def check_token(token: str) -> None:
    """Refuse a watch token the server's events could not carry back: a NUL would split
    it, and non-ASCII would come back as a malformed event (a peer error)."""
    if not token.isascii() or "\0" in token:
        raise LocalError(f"watch token {token!r} must be ASCII without NUL")


def watch(path: str, token: str, depth: int | None = None) -> Op[None]:
    """WATCH ``path`` under ``token`` (``depth`` only if given: a server feature)."""
    _paths.validate_path(path, allow_special=True)
    check_token(token)
    args: list[str | bytes] = [path, token]
    if depth is not None:
        args.append(str(depth))
    _ok((yield XsType.WATCH, wire.join(*args)), "WATCH")


def unwatch(path: str, token: str) -> Op[None]:
    """UNWATCH ``path``/``token``."""
    _ok((yield XsType.UNWATCH, wire.join(path, token)), "UNWATCH")


def reset_watches() -> Op[None]:
    """RESET_WATCHES: drop every watch and transaction of the connection."""
    _ok((yield XsType.RESET_WATCHES, b"\0"), "RESET_WATCHES")


def get_domain_path(domid: int) -> Op[str]:
    """GET_DOMAIN_PATH: the home path of ``domid``."""
    reply = yield XsType.GET_DOMAIN_PATH, wire.join(str(domid))
    return ascii_field(reply.rstrip(b"\0"), "domain path")


def introduce(domid: int, gfn: int, evtchn: int) -> Op[None]:
    """INTRODUCE a domain (dom0 only)."""
    _ok((yield XsType.INTRODUCE, wire.join(str(domid), str(gfn), str(evtchn))), "INTRODUCE")


def release(domid: int) -> Op[None]:
    """RELEASE a domain (dom0 only); the server fires ``@releaseDomain``."""
    _ok((yield XsType.RELEASE, wire.join(str(domid))), "RELEASE")


def resume(domid: int) -> Op[None]:
    """RESUME: re-enable ``@releaseDomain`` reporting for ``domid``."""
    _ok((yield XsType.RESUME, wire.join(str(domid))), "RESUME")


def set_target(domid: int, target: int) -> Op[None]:
    """SET_TARGET: give ``domid`` owner-like rights over ``target``'s nodes."""
    _ok((yield XsType.SET_TARGET, wire.join(str(domid), str(target))), "SET_TARGET")


def is_domain_introduced(domid: int) -> Op[bool]:
    """IS_DOMAIN_INTRODUCED: whether ``domid`` is known to the server."""
    reply = yield XsType.IS_DOMAIN_INTRODUCED, wire.join(str(domid))
    if reply not in (b"T\0", b"F\0"):
        raise malformed(f"IS_DOMAIN_INTRODUCED reply {reply[:32]!r}")
    return reply == b"T\0"


def control(*args: str | bytes | int) -> Op[bytes]:
    """CONTROL (implementation-defined): the raw reply."""
    if not args:
        raise LocalError("control needs a command")
    return (yield XsType.CONTROL, wire.join(*(arg(a) for a in args)))

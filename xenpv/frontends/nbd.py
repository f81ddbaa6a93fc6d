"""NBD export of a block frontend: a guest's disk served to NBD clients on a Unix socket.

Theory of operation
-------------------
:class:`NbdExport` serves one connected :class:`~xenpv.frontends.block.BlockFrontend`
over the NBD protocol (fixed newstyle handshake, simple replies), so ordinary NBD clients
(``qemu-img``, ``qemu-io``, ``nbdinfo``, ``nbdcopy``) read and write the disk through the
PV path.  Every connection goes through:

* **handshake**: the server greeting with ``NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES``;
  the client's flags (an unknown bit ends the connection, as the protocol requires);
* **option haggling**: ``NBD_OPT_LIST`` (the one export), ``NBD_OPT_INFO`` and
  ``NBD_OPT_GO`` (size, transmission flags, name and block sizes: the minimum is the
  disk's sector size, since the frontend moves whole sectors), ``NBD_OPT_EXPORT_NAME``
  (the old way in), ``NBD_OPT_ABORT``; anything else gets ``NBD_REP_ERR_UNSUP``.  The
  export answers to its name and to the default name ``""``;
* **transmission**: READ, WRITE (``NBD_CMD_FLAG_FUA`` adds a flush), FLUSH (the
  frontend's FLUSH_DISKCACHE, answered once the backend made the data durable), TRIM
  (a discard, rounded inwards to whole sectors, offered only if the backend offers
  discard) and DISC.  Each request runs as its own task, so many are on the rings at
  once, and each reply goes out when its request completes (replies in completion order,
  matched by the client's cookie).

Hostile clients (the socket's peer is not trusted): a wrong magic, an unknown client flag,
an option longer than :data:`MAX_OPTION`, too many options, a write payload over
``max_payload`` or a handshake slower than ``handshake_timeout`` end the connection; a
request outside the disk gets ``EINVAL`` (``ENOSPC`` for a write past the end), an
unaligned write ``EINVAL``, an unknown command ``EINVAL``.  Memory stays bounded: the
requests in flight per connection are capped (``max_inflight``) and so are the payload
bytes held per connection (``max_buffered``), and the number of connections is capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Any

from xenpv.errors import LocalError, PeerError
from xenpv.frontends.block import BlockError, BlockFrontend, BlockUnsupported

__all__ = ["NbdConfig", "NbdExport"]

log = logging.getLogger(__name__)

# -- protocol constants (the NBD protocol description, "fixed newstyle")
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_INFO = 6
OPT_GO = 7

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0
INFO_NAME = 1
INFO_BLOCK_SIZE = 3

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_CAN_MULTI_CONN = 1 << 8

CMD_FLAG_FUA = 1 << 0

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4

EPERM = errno.EPERM
EIO = errno.EIO
EINVAL = errno.EINVAL
ENOSPC = errno.ENOSPC
ESHUTDOWN = errno.ESHUTDOWN

_OPT_HEAD = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_REPLY = struct.Struct(">IIQ")  # magic, error, cookie

#: Longest option payload accepted (a name of at most 4 KiB and its info requests).
MAX_OPTION = 8192
#: Options accepted before transmission starts.
MAX_OPTIONS = 64
#: Seconds a closing connection may take to send its last replies before it is aborted.
CLOSE_TIMEOUT = 5.0


class _Hangup(Exception):
    """The client broke the protocol or asked to leave: close the connection."""


@dataclass(frozen=True)
class NbdConfig:
    """Limits of the export (each bounds memory or work a client can cause)."""

    #: Longest READ or WRITE accepted (larger reads get EINVAL; larger writes end the
    #: connection, whose payload is not read).
    max_payload: int = 32 << 20
    #: Requests of one connection being served at once.
    max_inflight: int = 64
    #: Payload bytes (write data read, read data produced) one connection holds at once.
    max_buffered: int = 64 << 20
    #: Connections served at once (more are closed at once).
    max_connections: int = 16
    #: Seconds a client may take from connecting to the start of transmission.
    handshake_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.max_payload < 4096 or self.max_buffered < self.max_payload:
            raise LocalError("max_payload must be >= 4096 and max_buffered >= max_payload")
        if self.max_inflight < 1 or self.max_connections < 1:
            raise LocalError("max_inflight and max_connections must be >= 1")


class _Budget:
    """Bytes a connection may hold; :meth:`take` waits until they are free."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Event()

    async def take(self, n: int) -> None:
        while self.used and self.used + n > self.limit:
            self._freed.clear()
            await self._freed.wait()
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n
        self._freed.set()


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    budget: _Budget
    slots: asyncio.Semaphore
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class NbdExport:
    """Serve ``frontend`` (connected) to NBD clients; see the module docstring."""

    def __init__(self, frontend: BlockFrontend, name: str, config: NbdConfig | None = None
                 ) -> None:
        """``name`` is the export's name (the default name ``""`` reaches it too)."""
        self.frontend = frontend
        self.name = name
        self.config = config or NbdConfig()
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self.stats = {"connections": 0, "refused": 0, "requests": 0, "reads": 0,
                      "writes": 0, "flushes": 0, "trims": 0, "errors": 0,
                      "protocol_errors": 0, "bytes_read": 0, "bytes_written": 0}
        #: Most requests of one connection seen in flight at once.
        self.max_inflight_seen = 0

    # -- the listening socket
    async def listen(self, path: str) -> None:
        """Listen on the Unix socket ``path`` (a stale socket there is replaced; any other
        file is an error)."""
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise LocalError(f"{path} exists and is not a socket")
            os.unlink(path)
        self._server = await asyncio.start_unix_server(self._accept, path=path,
                                                       limit=MAX_OPTION)
        self._path = path

    async def close(self) -> None:
        """Stop listening, end every connection, remove the socket."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        for t, writer in list(self._conns.items()):
            writer.transport.abort()  # nothing more is sent: the export is going away
            t.cancel()
        for t in list(self._conns):
            with contextlib.suppress(BaseException):
                await t
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        if len(self._conns) >= self.config.max_connections:
            self.stats["refused"] += 1
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._conns[task] = writer
        self.stats["connections"] += 1
        conn = _Conn(reader, writer, _Budget(self.config.max_buffered),
                     asyncio.Semaphore(self.config.max_inflight))
        try:
            await self._serve(conn)
        except _Hangup as exc:
            self.stats["protocol_errors"] += 1
            log.info("nbd client dropped: %s", exc)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            self._conns.pop(task, None)
            for t in list(conn.tasks):
                t.cancel()
            if conn.tasks:
                await asyncio.gather(*conn.tasks, return_exceptions=True)
            writer.close()  # sends what is buffered, unless the client stopped reading:
            try:
                await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
            except (TimeoutError, ConnectionError):
                writer.transport.abort()

    async def _serve(self, conn: _Conn) -> None:
        async with asyncio.timeout(self.config.handshake_timeout):
            go = await self._handshake(conn)
        if go:
            await self._transmission(conn)

    # -- handshake and options
    def _tflags(self) -> int:
        fe = self.frontend
        flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN
        if fe.readonly:
            flags |= TFLAG_READ_ONLY
        if fe.features.get("discard"):
            flags |= TFLAG_SEND_TRIM
        return flags

    def _known(self, name: str) -> bool:
        return name in ("", self.name)

    def _reply(self, conn: _Conn, option: int, rtype: int, data: bytes = b"") -> None:
        conn.writer.write(_OPT_REPLY.pack(REPLY_MAGIC, option, rtype, len(data)) + data)

    async def _handshake(self, conn: _Conn) -> bool:
        """Greeting and options; True when transmission starts, False on ABORT."""
        r, w = conn.reader, conn.writer
        w.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        await w.drain()
        (cflags,) = struct.unpack(">I", await r.readexactly(4))
        if cflags & ~CLIENT_FLAGS:
            raise _Hangup(f"unknown client flags {cflags:#x}")
        no_zeroes = bool(cflags & FLAG_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, option, length = _OPT_HEAD.unpack(await r.readexactly(_OPT_HEAD.size))
            if magic != IHAVEOPT:
                raise _Hangup(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                raise _Hangup(f"option {option} of {length} bytes")
            data = await r.readexactly(length)
            if option == OPT_EXPORT_NAME:
                if not self._known(data.decode("utf-8", "replace")):
                    raise _Hangup("unknown export requested by NBD_OPT_EXPORT_NAME")
                w.write(struct.pack(">QH", self.frontend.size, self._tflags()))
                if not no_zeroes:
                    w.write(bytes(124))
                await w.drain()
                return True
            if option == OPT_ABORT:
                self._reply(conn, option, REP_ACK)
                await w.drain()
                return False
            if option == OPT_LIST:
                if length:
                    self._reply(conn, option, REP_ERR_INVALID)
                else:
                    name = self.name.encode()
                    self._reply(conn, option, REP_SERVER, struct.pack(">I", len(name)) + name)
                    self._reply(conn, option, REP_ACK)
            elif option in (OPT_INFO, OPT_GO):
                if self._info(conn, option, data) and option == OPT_GO:
                    await w.drain()
                    return True
            else:
                self._reply(conn, option, REP_ERR_UNSUP)
            await w.drain()
        raise _Hangup(f"more than {MAX_OPTIONS} options")

    def _info(self, conn: _Conn, option: int, data: bytes) -> bool:
        """Answer INFO/GO; True if the export was found and described."""
        if len(data) < 6:
            self._reply(conn, option, REP_ERR_INVALID)
            return False
        (nlen,) = struct.unpack_from(">I", data)
        if 4 + nlen + 2 > len(data):
            self._reply(conn, option, REP_ERR_INVALID)
            return False
        (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
        if len(data) != 4 + nlen + 2 + 2 * nreq:
            self._reply(conn, option, REP_ERR_INVALID)
            return False
        name = data[4:4 + nlen].decode("utf-8", "replace")
        if not self._known(name):
            self._reply(conn, option, REP_ERR_UNKNOWN)
            return False
        fe = self.frontend
        self._reply(conn, option, REP_INFO,
                    struct.pack(">HQH", INFO_EXPORT, fe.size, self._tflags()))
        self._reply(conn, option, REP_INFO, struct.pack(">H", INFO_NAME) + self.name.encode())
        self._reply(conn, option, REP_INFO,
                    struct.pack(">HIII", INFO_BLOCK_SIZE, fe.sector_size,
                                max(4096, fe.sector_size), self.config.max_payload))
        self._reply(conn, option, REP_ACK)
        return True

    # -- transmission
    async def _transmission(self, conn: _Conn) -> None:
        r = conn.reader
        while True:
            head = await r.readexactly(_REQUEST.size)
            magic, flags, cmd, cookie, offset, length = _REQUEST.unpack(head)
            if magic != REQUEST_MAGIC:
                raise _Hangup(f"bad request magic {magic:#x}")
            self.stats["requests"] += 1
            if cmd == CMD_DISC:
                break
            payload: bytes | None = None
            held = 0
            if cmd == CMD_WRITE:
                if length > self.config.max_payload:
                    raise _Hangup(f"write of {length} bytes (most {self.config.max_payload})")
                held = length
                await conn.budget.take(held)
                payload = await r.readexactly(length)
            elif cmd == CMD_READ and length <= self.config.max_payload:
                held = length
                await conn.budget.take(held)
            await conn.slots.acquire()
            task = asyncio.create_task(self._one(conn, flags, cmd, cookie, offset, length,
                                                 payload, held))
            conn.tasks.add(task)
            self.max_inflight_seen = max(self.max_inflight_seen, len(conn.tasks))
            task.add_done_callback(conn.tasks.discard)
        # DISC: every request received before it is answered, then the connection ends
        if conn.tasks:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        await conn.writer.drain()

    async def _one(self, conn: _Conn, flags: int, cmd: int, cookie: int, offset: int,
                   length: int, payload: bytes | None, held: int) -> None:
        try:
            try:
                error, data = await self._do(flags, cmd, offset, length, payload)
            except (BlockError, PeerError, LocalError) as exc:
                log.info("nbd request %d at %d+%d failed: %s", cmd, offset, length, exc)
                error, data = EIO, b""
            if error:
                self.stats["errors"] += 1
            conn.writer.write(_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie))
            if data:
                conn.writer.write(data)
            with contextlib.suppress(ConnectionError):
                await conn.writer.drain()
        finally:
            conn.budget.give(held)
            conn.slots.release()

    def _bad_range(self, offset: int, length: int) -> bool:
        return offset + length > self.frontend.size

    async def _do(self, flags: int, cmd: int, offset: int, length: int,
                  payload: bytes | None) -> tuple[int, bytes]:
        """Serve one request: (NBD error, reply data)."""
        fe = self.frontend
        ss = fe.sector_size
        if cmd == CMD_READ:
            if length > self.config.max_payload or self._bad_range(offset, length):
                return EINVAL, b""
            if not length:
                return 0, b""
            start = offset - offset % ss
            end = -(-(offset + length) // ss) * ss
            data = await fe.read(start, end - start)
            self.stats["reads"] += 1
            self.stats["bytes_read"] += length
            return 0, data[offset - start:offset - start + length]
        if cmd == CMD_WRITE:
            assert payload is not None
            if fe.readonly:
                return EPERM, b""
            if self._bad_range(offset, length):
                return ENOSPC, b""
            if offset % ss or length % ss:
                return EINVAL, b""
            if length:
                await fe.write(offset, payload)
            if flags & CMD_FLAG_FUA:
                await fe.flush()
            self.stats["writes"] += 1
            self.stats["bytes_written"] += length
            return 0, b""
        if cmd == CMD_FLUSH:
            await fe.flush()
            self.stats["flushes"] += 1
            return 0, b""
        if cmd == CMD_TRIM:
            if fe.readonly:
                return EPERM, b""
            if self._bad_range(offset, length):
                return EINVAL, b""
            start = -(-offset // ss) * ss
            end = (offset + length) // ss * ss
            if end > start and fe.features.get("discard"):
                with contextlib.suppress(BlockUnsupported):  # a trim is only advice
                    await fe.discard(start, end - start)
            if flags & CMD_FLAG_FUA:
                await fe.flush()
            self.stats["trims"] += 1
            return 0, b""
        return EINVAL, b""

    def info(self) -> dict[str, Any]:
        """Counters of the export and of its frontend."""
        return {"name": self.name, "size": self.frontend.size,
                "max_inflight_seen": self.max_inflight_seen, **self.stats,
                "frontend": self.frontend.info()}

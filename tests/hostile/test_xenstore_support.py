"""Harness for the xenstored socket tests: a server thread and a raw wire-level client.

The server runs on its own asyncio loop in a background thread, so the tests can drive
plain blocking sockets (and send deliberately broken bytes) from the test thread.  Every
socket wait has a timeout.  This module holds no tests itself.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from xenpv.xenstore import wire
from xenpv.xenstore.server import XenstoredServer
from xenpv.xenstore.store import Quotas
from xenpv.xenstore.wire import XsType as T

R = TypeVar("R")

TIMEOUT = 10.0


class ServerThread:
    """An :class:`XenstoredServer` on a private event loop in a daemon thread."""

    def __init__(self, directory: Path, quotas: Quotas, domids: tuple[int, ...]) -> None:
        self.directory = directory
        self.quotas = quotas
        self.domids = domids
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: XenstoredServer | None = None

    def path(self, domid: int) -> str:
        return str(self.directory / f"xs-{domid}.sock")

    def start(self) -> None:
        self.thread.start()

        async def boot() -> XenstoredServer:
            server = XenstoredServer(quotas=self.quotas)
            await server.listen(self.path(0), 0)
            for domid in self.domids:
                await server.listen(self.path(domid), domid)
            return server

        self.server = self.run(boot())

    def run(self, coro: object) -> R:  # type: ignore[type-var]
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return fut.result(TIMEOUT)  # type: ignore[no-any-return]

    def call(self, fn: Callable[[], R]) -> R:
        """Run ``fn`` on the server's loop (the server is not thread-safe) and return its result."""
        fut: Future[R] = Future()

        def job() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(job)
        return fut.result(TIMEOUT)

    @property
    def srv(self) -> XenstoredServer:
        assert self.server is not None
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@contextmanager
def running_server(
    directory: Path, quotas: Quotas | None = None, domids: tuple[int, ...] = (5, 6)
) -> Iterator[ServerThread]:
    """Run a server with dom0's socket and one socket per domid; tear it down afterwards."""
    st = ServerThread(directory, quotas if quotas is not None else Quotas(), domids)
    st.start()
    try:
        yield st
    finally:
        st.stop()


class Requests:
    """``ok``/``err``/``write`` helpers over a ``req`` returning ``("ok"|"error", payload)``."""

    def req(
        self, type_: int, *args: str | bytes, tx: int = 0, raw: bytes | None = None
    ) -> tuple[str, bytes]:
        raise NotImplementedError

    def ok(self, type_: int, *args: str | bytes, tx: int = 0, raw: bytes | None = None) -> bytes:
        kind, payload = self.req(type_, *args, tx=tx, raw=raw)
        assert kind == "ok", payload
        return payload

    def err(self, type_: int, *args: str | bytes, tx: int = 0, raw: bytes | None = None) -> str:
        kind, payload = self.req(type_, *args, tx=tx, raw=raw)
        assert kind == "error", payload
        return wire.parse_error(payload)

    def write(self, path: str, value: bytes = b"", tx: int = 0) -> str:
        """WRITE; returns ``"OK"`` or the error name."""
        kind, payload = self.req(T.WRITE, tx=tx, raw=path.encode() + b"\0" + value)
        return "OK" if kind == "ok" else wire.parse_error(payload)

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.ok(T.READ, path, tx=tx)


class RawClient(Requests):
    """A blocking wire-level xenstore client (watch events are kept aside)."""

    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.decoder = wire.Decoder(1 << 20)
        self.events: list[tuple[bytes, bytes]] = []
        self.req_id = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, type_: int, payload: bytes, tx: int = 0) -> int:
        self.req_id += 1
        self.sock.sendall(wire.HEADER.pack(type_, self.req_id, tx, len(payload)) + payload)
        return self.req_id

    def recv_message(self) -> wire.Message | None:
        """Return the next message, or None when the server closed the connection."""
        while True:
            msg = self.decoder.next_message()
            if msg is not None:
                return msg
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.decoder.feed(data)

    def reply(self) -> wire.Message:
        """Return the next reply, collecting watch events met on the way."""
        while True:
            msg = self.recv_message()
            assert msg is not None, "connection closed by the server"
            if msg.type == T.WATCH_EVENT:
                path, token = wire.fields(msg.payload)
                self.events.append((path, token))
                continue
            return msg

    def req(
        self, type_: int, *args: str | bytes, tx: int = 0, raw: bytes | None = None
    ) -> tuple[str, bytes]:
        payload = raw if raw is not None else wire.join(*args)
        req_id = self.send(type_, payload, tx)
        msg = self.reply()
        assert msg.req_id == req_id and msg.tx_id == tx
        if msg.type == T.ERROR:
            return "error", msg.payload
        assert msg.type == type_
        return "ok", msg.payload

    def closed_by_server(self) -> bool:
        """Drain the connection: True once the server closed it, False on timeout."""
        try:
            while self.recv_message() is not None:
                pass
        except TimeoutError:
            return False
        return True


def setup_home(dom0: RawClient, domid: int) -> None:
    """Create ``/local/domain/<domid>`` owned by the domain, as a toolstack does."""
    home = f"/local/domain/{domid}"
    dom0.ok(T.MKDIR, home)
    dom0.ok(T.SET_PERMS, home, f"n{domid}")


def assert_other_domain_served(st: ServerThread, domid: int = 6) -> None:
    """Another domain's fresh connection can still write and read its own key."""
    with RawClient(st.path(domid), timeout=5.0) as c:
        assert c.write(f"/local/domain/{domid}/alive", b"yes") == "OK"
        assert c.read(f"/local/domain/{domid}/alive") == b"yes"


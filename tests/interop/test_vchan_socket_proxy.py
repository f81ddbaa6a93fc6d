"""Debian's ``vchan-socket-proxy`` on the loopback emulator: a server proxy in domain 1
and a client proxy in domain 2 carry Unix-socket connections over libxenvchan, using the
replacement ``libxengnttab``/``libxenevtchn``/``libxenctrl``."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from shim_peers import LoopbackRun, wait_for

from xenpv import peers

VCHAN = "/local/domain/1/data/vchan/echo"


class EchoServer:
    """A Unix-socket echo server in a thread (what the server proxy connects to)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.accepted = 0
        self.threads: list[threading.Thread] = []
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        # shutdown wakes the thread blocked in accept(); close alone would not
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for conn in self.conns:
            conn.close()
        for t in (self.thread, *self.threads):
            t.join(10)


def _connect(path: Path, echo: EchoServer, timeout: float = 60.0) -> socket.socket:
    """Connect to the client proxy and wait until the chain reaches the echo server.

    vchan-socket-proxy's server waits for the vchan client, then connects to its socket
    and only then looks at the ring; data the client sends together with its connection
    (one coalesced event) would sit in the ring until the next event.  Waiting for the
    echo server's accept keeps the test off that race of the program under test.
    """
    before = echo.accepted
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        wait_for("the server proxy to connect", lambda: echo.accepted > before)
    except BaseException:
        s.close()
        raise
    return s


def _echo_through(path: Path, echo: EchoServer, payload: bytes, timeout: float = 60.0) -> bytes:
    """Send ``payload`` through the proxies while reading the echo back."""
    with _connect(path, echo, timeout) as s:
        sender = threading.Thread(target=s.sendall, args=(payload,), daemon=True)
        sender.start()
        got = bytearray()
        while len(got) < len(payload):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        sender.join(timeout)
        return bytes(got)


@pytest.fixture
def proxies() -> Iterator[tuple[LoopbackRun, EchoServer, Path]]:
    """Domains 1 and 2, an echo server, a server proxy (dom1) and a client proxy (dom2)
    listening on the returned socket path."""
    proxy = str(peers.find("vchan-socket-proxy"))
    run = LoopbackRun({1: "vchan-server", 2: "vchan-client"})
    echo = None
    try:
        echo = EchoServer(run.rundir / "echo.sock")
        state = "/local/domain/1/data/proxy-state"
        run.spawn(1, [proxy, "-m", "server", "-s", state, "2", VCHAN, str(echo.path)])
        wait_for("the server proxy", lambda: run.xenstore_read(state) == "running")
        wait_for("the vchan ring", lambda: run.xenstore_read(f"{VCHAN}/ring-ref"))
        client_sock = run.rundir / "client.sock"
        run.spawn(2, [proxy, "-m", "client", "1", VCHAN, str(client_sock)])
        wait_for("the client proxy's socket", client_sock.exists)
        yield run, echo, client_sock
    finally:
        run.close()
        if echo is not None:
            echo.close()


def test_vchan_socket_proxy_echoes_through_two_domains(
    proxies: tuple[LoopbackRun, EchoServer, Path],
) -> None:
    _run, echo, client_sock = proxies
    payload = os.urandom(4 << 20)
    assert _echo_through(client_sock, echo, payload) == payload
    assert echo.accepted == 1


def test_vchan_socket_proxy_serves_subsequent_connections(
    proxies: tuple[LoopbackRun, EchoServer, Path],
) -> None:
    _run, echo, client_sock = proxies
    for i in range(3):
        payload = bytes([i]) * 70_000 + os.urandom(1000)
        assert _echo_through(client_sock, echo, payload) == payload
    assert echo.accepted == 3


def test_killing_the_server_proxy_closes_the_client_connection(
    proxies: tuple[LoopbackRun, EchoServer, Path],
) -> None:
    run, echo, client_sock = proxies
    with _connect(client_sock, echo) as s:
        s.sendall(b"hello")
        got = b""
        while len(got) < 5:
            got += s.recv(5 - len(got))
        assert got == b"hello"
        server = run.procs[0]
        server.kill()
        server.wait(10)
        # The client proxy learns of the death through the unmap notification of the
        # server's shared page (srv_live cleared, port signalled) and closes our socket.
        assert s.recv(100) == b""

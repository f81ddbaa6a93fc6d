"""xenpv vchan against Xen's own ``vchan-socket-proxy`` (Debian 4.17) on the loopback emulator.

Xen's program runs unmodified as an emulated domain through the replacement libraries;
its stdin/stdout carry the stream.  Every direction is checked with a CRC over all bytes.
Also: ``xenpv vchan-proxy`` in each mode against Xen's proxy in the other mode.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from xenpv import peers
from xenpv.platforms.loopback.env import domain_env
from xenpv.testing.vchan import VchanLab, vchan_path
from xenpv.xenstore.client import BlockingClient

SERVER, CLIENT = 1, 2
MiB = 1 << 20


@pytest.fixture
def lab() -> Iterator[VchanLab]:
    with VchanLab((SERVER, CLIENT)) as lab:
        yield lab


def xen_proxy() -> str:
    return str(peers.find("usr/lib/xen-4.17/bin/vchan-socket-proxy"))


def release(tool: subprocess.Popen[bytes]) -> None:
    """End a tool's ``--hold`` by closing its stdin."""
    assert tool.stdin is not None
    tool.stdin.close()


def exchange_stdio(proc: subprocess.Popen[bytes], data: bytes, expect: int,
                   timeout: float = 60.0) -> bytes:
    """Write ``data`` to ``proc``'s stdin while reading ``expect`` bytes from its stdout;
    stdin is closed only once everything expected arrived (the proxy stops at EOF)."""
    got: list[bytes] = []

    def reader() -> None:
        n = 0
        assert proc.stdout is not None
        while n < expect:
            chunk = proc.stdout.read1(MiB) if hasattr(proc.stdout, "read1") else os.read(proc.stdout.fileno(), MiB)
            if not chunk:
                return
            got.append(chunk)
            n += len(chunk)

    def writer() -> None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(data)
            proc.stdin.flush()

    threads = [threading.Thread(target=f, daemon=True) for f in (reader, writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "proxy stalled"
    assert proc.stdin is not None
    proc.stdin.close()
    return b"".join(got)


@pytest.mark.parametrize("ring", [0, MiB], ids=["in-page", "1MiB"])
def test_our_server_with_xen_proxy_client(lab: VchanLab, ring: int) -> None:
    size = 2 * MiB if ring == 0 else 32 * MiB
    path = vchan_path(SERVER, CLIENT, "xenclient")
    server = lab.tool(SERVER, "server", str(CLIENT), path, "--send", str(size), "--recv",
                      str(size), "--read-min", str(ring), "--write-min", str(ring), "--hold")
    assert lab.read_json(server)["event"] == "ready"
    client = lab.spawn(CLIENT, [xen_proxy(), str(SERVER), path, "-"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    data = os.urandom(size)
    got = exchange_stdio(client, data, size)
    done = lab.read_json(server)
    assert done["event"] == "done"
    assert (done["sent"], done["received"]) == (size, size)
    assert zlib.crc32(got) == done["sent_crc"] and len(got) == size
    assert zlib.crc32(data) == done["received_crc"]
    # Xen's proxy drops what is still in the ring when the vchan closes, so our server
    # held the vchan until the proxy delivered everything; after its stdin closed the
    # proxy waits for one more event, which our close gives it
    release(server)
    assert lab.read_json(server)["event"] in ("released", "peer-closed")
    assert client.wait(30) == 0
    assert server.wait(30) == 0
    lab.assert_released()


def test_xen_proxy_server_with_our_client(lab: VchanLab) -> None:
    size = 4 * MiB
    path = vchan_path(SERVER, CLIENT, "xenserver")
    state = f"/local/domain/{SERVER}/data/proxy-state"
    server = lab.spawn(SERVER, [xen_proxy(), "-m", "server", "-s", state, str(CLIENT), path, "-"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    client = lab.tool(CLIENT, "client", str(SERVER), path, "--send", str(size), "--recv", str(size),
                      "--hold")
    first = lab.read_json(client)
    assert first["event"] == "ready"
    data = os.urandom(size)
    got = exchange_stdio(server, data, size)
    done = lab.read_json(client)
    assert done["event"] == "done"
    assert zlib.crc32(got) == done["sent_crc"] and len(got) == size
    assert zlib.crc32(data) == done["received_crc"]
    # stdin closed: Xen's server writes what it holds and waits for one more event
    release(client)
    assert lab.read_json(client)["event"] in ("released", "peer-closed")
    assert client.wait(30) == 0
    assert server.wait(30) == 0
    lab.assert_released()


def read_state(lab: VchanLab, path: str, timeout: float = 10.0) -> bytes:
    """The value at ``path`` once it exists (the proxy writes it after it listens)."""
    deadline = time.monotonic() + timeout
    with BlockingClient(domain_env(lab.rundir, 0)["XENSTORED_PATH"], timeout=10) as xs:
        while not xs.exists(path):
            assert time.monotonic() < deadline, f"{path} was never written"
            time.sleep(0.05)
        return xs.read(path)


def wait_published(lab: VchanLab, path: str, timeout: float = 30.0) -> None:
    """Wait until the vchan at ``path`` is published (both keys exist)."""
    deadline = time.monotonic() + timeout
    with BlockingClient(domain_env(lab.rundir, 0)["XENSTORED_PATH"], timeout=10) as xs:
        while not (xs.exists(f"{path}/ring-ref") and xs.exists(f"{path}/event-channel")):
            assert time.monotonic() < deadline, f"{path} was not published"
            time.sleep(0.05)


def xenpv_proxy(*args: str) -> list[str]:
    return [sys.executable, "-m", "xenpv", "vchan-proxy", *args]


def echo_listener(path: str, connections: int = 1) -> tuple[socket.socket, threading.Thread]:
    """A Unix socket server answering ``connections`` connections one after the other,
    each until EOF, with every byte XOR 0x5A."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(4)
    lsock.settimeout(30)

    def serve() -> None:
        for _ in range(connections):
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                while data := conn.recv(65536):
                    conn.sendall(bytes(b ^ 0x5A for b in data))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return lsock, t


def test_our_proxy_server_with_xen_proxy_client(lab: VchanLab, tmp_path: Any) -> None:
    path = vchan_path(SERVER, CLIENT, "ours-server")
    sock_path = str(tmp_path / "echo.sock")
    lsock, t = echo_listener(sock_path, connections=2)
    state = f"/local/domain/{SERVER}/data/xenpv-proxy-state"
    try:
        server = lab.spawn(SERVER, xenpv_proxy("-m", "server", "-s", state, str(CLIENT), path, sock_path))
        wait_published(lab, path)
        for _ in range(2):  # one vchan client after the other, like Xen's proxy allows
            client = lab.spawn(CLIENT, [xen_proxy(), str(SERVER), path, "-"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            data = os.urandom(300_000)
            got = exchange_stdio(client, data, len(data))
            assert got == bytes(b ^ 0x5A for b in data)
            assert client.wait(30) == 0
        t.join(30)
        assert server.poll() is None  # a socket path: it keeps serving
        assert read_state(lab, state) == b"running"
        server.kill()
        server.wait(10)
    finally:
        lsock.close()
    lab.assert_released()


def test_xen_proxy_server_with_our_proxy_client(lab: VchanLab, tmp_path: Any) -> None:
    path = vchan_path(SERVER, CLIENT, "ours-client")
    sock_path = str(tmp_path / "client.sock")
    state = f"/local/domain/{CLIENT}/data/xenpv-proxy-state"
    server = lab.spawn(SERVER, [xen_proxy(), "-m", "server", str(CLIENT), path, "-"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    wait_published(lab, path)
    client = lab.spawn(CLIENT, xenpv_proxy("-s", state, str(SERVER), path, sock_path))
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(30)
    for _ in range(300):
        try:
            conn.connect(sock_path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            threading.Event().wait(0.05)
    assert read_state(lab, state) == b"running"
    with conn:
        payload = os.urandom(200_000)
        got = bytearray()

        def pump_server() -> None:
            assert server.stdout is not None
            while len(got) < len(payload):
                chunk = server.stdout.read1(65536)
                if not chunk:
                    return
                got.extend(chunk)

        t = threading.Thread(target=pump_server, daemon=True)
        t.start()
        conn.sendall(payload)
        t.join(30)
        assert bytes(got) == payload
        assert server.stdin is not None
        server.stdin.write(b"reply from xen")
        server.stdin.flush()
        answer = b""
        while len(answer) < 14:
            answer += conn.recv(64)
        assert answer == b"reply from xen"
    server.stdin.close()
    assert server.wait(30) == 0  # our proxy closed the vchan when the connection ended
    client.kill()
    client.wait(10)
    lab.assert_released()


def test_xen_proxy_client_waiting_before_the_server_publishes(lab: VchanLab) -> None:
    """Xen's proxy client waits on a watch of the vchan path; the server comes later."""
    path = vchan_path(SERVER, CLIENT, "late-server")
    client = lab.spawn(CLIENT, [xen_proxy(), str(SERVER), path, "-"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    time.sleep(0.5)  # let it register its watch and fail its first attempt
    server = lab.tool(SERVER, "server", str(CLIENT), path, "--send", "1000", "--recv", "1000",
                      "--hold")
    assert lab.read_json(server)["event"] == "ready"
    got = exchange_stdio(client, os.urandom(1000), 1000, timeout=3)
    assert len(got) == 1000


def test_our_proxy_client_on_stdio_with_xen_proxy_server(lab: VchanLab) -> None:
    """``xenpv vchan-proxy DOMID PATH -`` (client on stdin/stdout) against Xen's server."""
    path = vchan_path(SERVER, CLIENT, "ours-stdio")
    server = lab.spawn(SERVER, [xen_proxy(), "-m", "server", str(CLIENT), path, "-"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    wait_published(lab, path)
    client = lab.spawn(CLIENT, xenpv_proxy(str(SERVER), path, "-"),
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    up, down = os.urandom(500_000), os.urandom(400_000)
    results: dict[str, bytes] = {}

    def to_server() -> None:
        results["server_got"] = exchange_stdio_half(client, up, server, len(up))

    t = threading.Thread(target=to_server, daemon=True)
    t.start()
    results["client_got"] = exchange_stdio_half(server, down, client, len(down))
    t.join(60)
    assert results["server_got"] == up
    assert results["client_got"] == down
    assert client.stdin is not None
    client.stdin.close()  # end of input: our proxy flushes, closes the vchan and exits
    assert client.wait(30) == 0
    assert server.stdin is not None
    server.stdin.close()
    assert server.wait(30) == 0
    lab.assert_released()


def exchange_stdio_half(writer: subprocess.Popen[bytes], data: bytes,
                        reader: subprocess.Popen[bytes], expect: int,
                        timeout: float = 60.0) -> bytes:
    """Write ``data`` to one process's stdin and read ``expect`` bytes from another's
    stdout (stdin left open)."""
    got = bytearray()

    def pump() -> None:
        assert reader.stdout is not None
        while len(got) < expect:
            chunk = reader.stdout.read1(MiB)
            if not chunk:
                return
            got.extend(chunk)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    assert writer.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        writer.stdin.write(data)
        writer.stdin.flush()
    t.join(timeout)
    assert not t.is_alive(), "proxy stalled"
    return bytes(got)

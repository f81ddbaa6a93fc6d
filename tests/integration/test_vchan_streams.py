"""vchan server and client on the loopback daemon, both ends in this process.

Covers in-page and multi-page rings, wrap-around, a large transfer with a digest, the
xenstore keys and their permissions, close from either side, and the accounting after
each test (no grant, mapping or port left behind).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from xenpv.protocols.vchan import choose_orders
from xenpv.testing.vchan import InProcessVchanLab, VchanLab, vchan_path
from xenpv.vchan import VchanClient, VchanServer, open_connection, start_server
from xenpv.xenstore.wire import XenstoreError

SERVER, CLIENT = 1, 2
MiB = 1 << 20


LABS = {"inprocess": InProcessVchanLab, "crossprocess": VchanLab}


@pytest.fixture(scope="module", params=sorted(LABS))
def lab(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The loopback emulator in this process, or the daemon (both ends here)."""
    with LABS[request.param]((SERVER, CLIENT)) as lab:
        yield lab


@pytest.fixture
def pfs(lab: Any) -> Iterator[tuple[Any, Any]]:
    s, c = lab.platform(SERVER), lab.platform(CLIENT)
    yield s, c
    lab.assert_released()
    s.close()
    c.close()


def run(coro: Any, timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def echo_upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data.upper())
        await writer.drain()
    writer.close()


@pytest.mark.parametrize(("read_min", "write_min"), [(0, 0), (2048, 1024), (MiB, MiB), (5000, 100)])
def test_echo_over_each_ring_placement(pfs: tuple[Any, Any], read_min: int, write_min: int) -> None:
    spf, cpf = pfs
    path = vchan_path(SERVER, CLIENT, f"echo{read_min}-{write_min}")

    async def main() -> None:
        server = await start_server(spf, CLIENT, path, echo_upper, read_min=read_min,
                                    write_min=write_min)
        reader, writer = await open_connection(cpf, SERVER, path)
        client = writer.get_extra_info("vchan")
        lo, ro = choose_orders(read_min, write_min)
        assert (client.rings.wr_size, client.rings.rd_size) == (1 << lo, 1 << ro)
        payload = os.urandom(200_000)  # far beyond the in-page rings: wraps many times
        writer.write(payload.lower())
        await writer.drain()
        got = await reader.readexactly(len(payload))
        assert got == payload.lower().upper()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        assert await server.quarantine.drain(5.0)

    run(main())


async def source(writer: asyncio.StreamWriter, size: int) -> str:
    """Write ``size`` random bytes in 64 KiB pieces; return their SHA-256."""
    h = hashlib.sha256()
    for _ in range(size // (1 << 16)):
        block = os.urandom(1 << 16)
        h.update(block)
        writer.write(block)
        await writer.drain()
    return h.hexdigest()


async def sink(reader: asyncio.StreamReader, size: int) -> str:
    """Read exactly ``size`` bytes; return their SHA-256."""
    h = hashlib.sha256()
    left = size
    while left:
        chunk = await reader.read(min(left, 1 << 16))
        assert chunk
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def test_large_transfer_both_ways_with_digest(pfs: tuple[Any, Any]) -> None:
    spf, cpf = pfs
    path = vchan_path(SERVER, CLIENT, "bulk")
    size = 32 * MiB
    digests: dict[str, str] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digests["server_got"], digests["server_sent"] = await asyncio.gather(
            sink(reader, size), source(writer, size))
        await reader.read()  # until the client closes

    async def main() -> None:
        server = await start_server(spf, CLIENT, path, handler, read_min=MiB, write_min=MiB)
        reader, writer = await open_connection(cpf, SERVER, path)
        digests["client_sent"], digests["client_got"] = await asyncio.gather(
            source(writer, size), sink(reader, size))
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        assert await server.quarantine.drain(5.0)

    run(main(), 120)
    assert digests["client_sent"] == digests["server_got"]
    assert digests["server_sent"] == digests["client_got"]


def test_xenstore_keys_permissions_and_removal(pfs: tuple[Any, Any]) -> None:
    spf, _cpf = pfs
    path = vchan_path(SERVER, CLIENT, "keys")

    async def main() -> None:
        server = await VchanServer.create(spf, CLIENT, path, read_min=MiB, write_min=8192)
        xs = await spf.xenstore()
        try:
            ref = int(await xs.read(f"{path}/ring-ref"))
            port = int(await xs.read(f"{path}/event-channel"))
            assert ref == server.ctrl.refs[0] and ref >= 8
            assert port == server.port and port > 0
            for key in ("ring-ref", "event-channel"):
                perms = [str(p) for p in await xs.get_perms(f"{path}/{key}")]
                assert perms == [f"n{SERVER}", f"r{CLIENT}"]
            page = bytes(server.ctrl.mem[:4096])
            left, right = struct.unpack_from("<HH", page, 16)
            assert (left, right) == (20, 13)
            assert page[20:24] == bytes([2, 1, 1, 0])  # cli_live, srv_live, cli_notify, srv_notify
            refs = struct.unpack_from("<258I", page, 24)
            assert list(refs) == [r for pages in server.shares for r in pages.refs]
            await server.aclose(xs)
            assert not await xs.exists(path)
        finally:
            await server.aclose(xs)
            await xs.close()

    run(main())


@pytest.mark.parametrize("closer", ["server", "client"])
def test_close_from_either_side_reports_eof_and_releases(pfs: tuple[Any, Any], closer: str) -> None:
    spf, cpf = pfs
    path = vchan_path(SERVER, CLIENT, f"close-{closer}")

    async def main() -> None:
        server = await VchanServer.create(spf, CLIENT, path, read_min=8192, write_min=8192)
        client = await VchanClient.create(cpf, SERVER, path)
        assert server.wait_connected(5)
        first, second = (server, client) if closer == "server" else (client, server)
        first.send(b"last words")
        await first.aclose()
        # the other side drains what was sent, then sees the end of the stream
        assert second.recv(100, timeout=5) == b"last words"
        assert second.recv(100, timeout=5) == b""
        assert not second.is_open
        with pytest.raises(BrokenPipeError):
            second.send(b"anyone?")
        await second.aclose()
        assert await server.quarantine.drain(5.0)

    run(main())


@pytest.fixture(scope="module")
def daemon_lab() -> Iterator[VchanLab]:
    """The daemon mode only: its platforms may be used from two threads."""
    with VchanLab((SERVER, CLIENT)) as lab:
        yield lab


def test_blocking_api_across_threads(daemon_lab: VchanLab) -> None:
    spf, cpf = daemon_lab.platform(SERVER), daemon_lab.platform(CLIENT)
    path = vchan_path(SERVER, CLIENT, "blocking")
    server = VchanServer(spf, CLIENT, path, read_min=65536, write_min=65536)
    data = os.urandom(3 * MiB + 17)
    got = bytearray()

    def serve() -> None:
        server.wait_connected(10)
        buf = bytearray(50_000)
        while len(got) < len(data):
            n = server.recv_into(buf, timeout=10)
            got.extend(buf[:n])
        server.send(hashlib.sha256(got).digest(), timeout=10)

    t = threading.Thread(target=serve)
    t.start()
    client = VchanClient(cpf, SERVER, path)
    try:
        client.send(data, timeout=30)
        assert client.wait_readable(10)
        assert client.recv_exactly(32, timeout=10) == hashlib.sha256(data).digest()
    finally:
        t.join(30)
        client.close()
        server.close(linger=5)
    assert bytes(got) == data
    daemon_lab.assert_released()


def test_blocking_zero_copy_forms(daemon_lab: VchanLab) -> None:
    """send of a memoryview larger than the ring (continued at an offset, no slices),
    recv_exactly_into the caller's buffer, recv from the kept scratch buffer, and the
    notifications the blocking calls counted on the way."""
    spf, cpf = daemon_lab.platform(SERVER), daemon_lab.platform(CLIENT)
    path = vchan_path(SERVER, CLIENT, "zerocopy")
    server = VchanServer(spf, CLIENT, path)  # in-page rings: 1 KiB and 2 KiB
    data = os.urandom(50_000)
    sent: list[int] = []

    def feed() -> None:
        server.wait_connected(10)
        sent.append(server.send(memoryview(data)[1:], timeout=20))
        sent.append(server.send(bytearray(b"tail"), timeout=20))

    t = threading.Thread(target=feed)
    t.start()
    client = VchanClient(cpf, SERVER, path)
    try:
        buf = bytearray(len(data) + 10)
        assert client.recv_exactly_into(buf, len(data) - 1, timeout=20) == len(data) - 1
        assert buf[: len(data) - 1] == data[1:]
        assert client.recv(2, timeout=10) == b"ta"
        assert client.recv(64, timeout=10) == b"il"
        with pytest.raises(ValueError):
            client.recv_exactly_into(bytearray(3), 4)
        t.join(30)
        assert sent == [len(data) - 1, 4]
        # 50 KB through a 2 KiB ring: a writer that slept for room was woken by the
        # reader's signal (whether it slept at all depends on scheduling: its bounded
        # poll can see the reader's progress every time), and every signal was counted
        assert server.sleeps == 0 or client.notifies > 0
        assert client.notifies == client.rings.kicks
    finally:
        t.join(30)
        client.close()
        server.close(linger=5)
    daemon_lab.assert_released()


def test_empty_send_after_the_peer_left_is_a_no_op(pfs: tuple[Any, Any]) -> None:
    """send(b"") returns 0 without looking at the peer, as it always did (the one-call
    write path declines a gone peer; the empty case must not reach the checks)."""
    spf, cpf = pfs
    path = vchan_path(SERVER, CLIENT, "empty")
    server = VchanServer(spf, CLIENT, path)
    client = VchanClient(cpf, SERVER, path)
    try:
        client.close()
        assert server.send(b"") == 0
        assert server.send(memoryview(b"")) == 0
        with pytest.raises(BrokenPipeError):
            server.send(b"x")
    finally:
        client.close()
        server.close(linger=5)


def test_server_may_write_before_client_connects(pfs: tuple[Any, Any]) -> None:
    spf, cpf = pfs
    path = vchan_path(SERVER, CLIENT, "early")
    server = VchanServer(spf, CLIENT, path)
    assert server.is_open == 2
    assert server.send_nowait(b"early bird") == 10
    client = VchanClient(cpf, SERVER, path)
    try:
        assert client.recv(64, timeout=5) == b"early bird"
        assert server.is_open == 1
    finally:
        client.close()
        server.close(linger=5)


@pytest.mark.parametrize("victim", ["server", "client"])
def test_peer_platform_dies_other_side_reports_and_releases(pfs: tuple[Any, Any],
                                                            victim: str) -> None:
    """A domain's platform goes away without closing its vchan (as when its process
    dies): the unmap notification clears its live byte and signals; the survivor drains
    what was sent, sees the end of the stream, and releases everything on close."""
    spf, cpf = pfs
    path = vchan_path(SERVER, CLIENT, f"death-{victim}")

    async def main() -> None:
        server = await VchanServer.create(spf, CLIENT, path, read_min=MiB, write_min=MiB)
        client = await VchanClient.create(cpf, SERVER, path)
        dead, survivor, platform = ((server, client, spf) if victim == "server"
                                    else (client, server, cpf))
        dead.send(b"famous last words")
        platform.close()  # no vchan close: the platform (the "process") is gone
        assert survivor.recv(100, timeout=5) == b"famous last words"
        assert survivor.recv(100, timeout=5) == b""
        assert survivor.is_open == 0
        await survivor.aclose()

    run(main())



def test_failed_create_releases_everything_while_its_error_is_alive(
        lab: Any, pfs: tuple[Any, Any]) -> None:
    """A server whose xenstore keys cannot be written (a path under another domain's
    home) fails with the xenstore error, and every grant and port is released by then,
    even while the caller still holds the exception (whose traceback still references
    views of the pages)."""
    spf, _ = pfs

    async def attempt() -> XenstoreError:
        with pytest.raises(XenstoreError) as info:
            await VchanServer.create(spf, CLIENT, f"/local/domain/{CLIENT}/data/vchan-x")
        return info.value

    error = run(attempt())
    assert error.errno_name == "EACCES"
    lab.assert_released(timeout=0.5)
    assert error.__traceback__ is not None  # (still held)

"""Hostile scenario 26: a vchan peer writes arbitrary indexes, orders and setup values.

The hostile side is played by hand on the loopback daemon: a server domain that shares a
control page it filled in itself and publishes it, or an honest endpoint whose shared page
the test then scribbles on.  Required behaviour: ``init`` rejects bad orders and values
with :class:`VchanPeerError` and releases whatever it had set up; mid-stream insanity reads
as 0 available, never copies more than the ring or touches anything outside it, and is
reported as :class:`VchanBroken` (a PeerError), which stays.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from xenpv.errors import PeerError
from xenpv.testing.vchan import VchanLab, vchan_path
from xenpv.vchan import VchanBroken, VchanClient, VchanPeerError, VchanServer, open_connection

SERVER, CLIENT = 1, 2


@pytest.fixture(scope="module")
def lab() -> Iterator[VchanLab]:
    with VchanLab((SERVER, CLIENT)) as lab:
        yield lab


@pytest.fixture
def pfs(lab: VchanLab) -> Iterator[tuple[Any, Any]]:
    s, c = lab.platform(SERVER), lab.platform(CLIENT)
    yield s, c
    s.close()
    c.close()
    lab.assert_released()


def client_holds_nothing(cpf: Any) -> None:
    grants, _revoking, mappings, ports, shares = cpf.grants.stats()[:5]
    assert (grants, mappings, ports, shares) == (0, 0, 0, 0)


def publish(spf: Any, path: str, ring_ref: str, port: str) -> None:
    async def main() -> None:
        xs = await spf.xenstore()
        try:
            await xs.write(f"{path}/ring-ref", ring_ref)
            await xs.write(f"{path}/event-channel", port)
            for key in ("ring-ref", "event-channel"):
                await xs.set_perms(f"{path}/{key}", [f"n{SERVER}", f"r{CLIENT}"])
        finally:
            await xs.close()

    asyncio.run(main())


def hostile_server(spf: Any, path: str, left: int, right: int, grants: list[int] | None = None,
                   extra_pages: int = 0) -> tuple[Any, int]:
    """Share a control page with the given orders (and grant list) and publish it."""
    port = spf.events.alloc_unbound(CLIENT)
    page = spf.grants.grant(CLIENT, 1)
    struct.pack_into("<HHBBBB", page.mem, 16, left, right, 2, 1, 1, 0)
    refs = list(grants or [])
    if extra_pages:
        ring = spf.grants.grant(CLIENT, extra_pages)
        refs += list(ring.refs)
    if refs:
        struct.pack_into(f"<{len(refs)}I", page.mem, 24, *refs[:1000])
    publish(spf, path, str(page.refs[0]), str(port))
    return page, port


@pytest.mark.parametrize(("left", "right"), [(9, 11), (10, 21), (0, 0), (0xFFFF, 12), (21, 21), (12, 9)])
def test_scenario_26_orders_outside_range(pfs: tuple[Any, Any], left: int, right: int) -> None:
    spf, cpf = pfs
    path = vchan_path(SERVER, CLIENT, f"orders-{left}-{right}")
    hostile_server(spf, path, left, right)
    with pytest.raises(VchanPeerError, match="order"):
        VchanClient(cpf, SERVER, path)
    client_holds_nothing(cpf)


@pytest.mark.parametrize("order", [10, 11])
def test_scenario_26_equal_in_page_orders(pfs: tuple[Any, Any], order: int) -> None:
    spf, cpf = pfs
    path = vchan_path(SERVER, CLIENT, f"equal-{order}")
    hostile_server(spf, path, order, order)
    with pytest.raises(VchanPeerError, match="in-page"):
        VchanClient(cpf, SERVER, path)
    client_holds_nothing(cpf)


def test_scenario_26_grant_list_overlapping_the_in_page_ring(pfs: tuple[Any, Any]) -> None:
    spf, cpf = pfs
    path = vchan_path(SERVER, CLIENT, "overlap")
    hostile_server(spf, path, 20, 10)  # 256 refs end at 1048, past the ring at 1024
    with pytest.raises(VchanPeerError, match="grant list"):
        VchanClient(cpf, SERVER, path)
    client_holds_nothing(cpf)


def test_scenario_26_grant_refs_not_granted_to_us(pfs: tuple[Any, Any]) -> None:
    spf, cpf = pfs
    path = vchan_path(SERVER, CLIENT, "badrefs")
    hostile_server(spf, path, 12, 11, grants=[0])  # ref 0 is reserved, never ours
    with pytest.raises(VchanPeerError, match="map"):
        VchanClient(cpf, SERVER, path)
    client_holds_nothing(cpf)


BAD_KEYS = [("0", "5"), ("abc", "5"), ("-1", "5"), ("8", "0"), ("8", "99999999999"), ("", "5"),
            ("8", " 7")]


@pytest.mark.parametrize(("ring_ref", "port"), BAD_KEYS)
def test_scenario_26_bad_xenstore_values(pfs: tuple[Any, Any], ring_ref: str, port: str) -> None:
    spf, cpf = pfs
    path = vchan_path(SERVER, CLIENT, f"keys{BAD_KEYS.index((ring_ref, port))}")
    publish(spf, path, ring_ref, port)
    with pytest.raises(VchanPeerError):
        VchanClient(cpf, SERVER, path)
    client_holds_nothing(cpf)


def connected_pair(spf: Any, cpf: Any, name: str, size: int) -> tuple[VchanServer, VchanClient]:
    path = vchan_path(SERVER, CLIENT, name)
    server = VchanServer(spf, CLIENT, path, read_min=size, write_min=size)
    client = VchanClient(cpf, SERVER, path)
    assert server.wait_connected(5)
    return server, client


@pytest.mark.parametrize("size", [0, 1 << 16])
@pytest.mark.parametrize("value", [lambda p: p + (1 << 20) + 1, lambda p: p + 0x80000000,
                                   lambda p: 0xFFFFFFFF, lambda p: p - 1])
def test_scenario_26_prod_set_arbitrarily_mid_stream(pfs: tuple[Any, Any], size: int,
                                                     value: Any) -> None:
    spf, cpf = pfs
    server, client = connected_pair(spf, cpf, f"prod-{size}-{id(value) % 997}", size)
    try:
        server.send(b"sane data")
        assert client.recv(100, timeout=5) == b"sane data"
        # the hostile server moves right.prod (offset 12) anywhere
        prod = struct.unpack_from("<I", server.ctrl.mem, 12)[0]
        struct.pack_into("<I", server.ctrl.mem, 12, value(prod) & 0xFFFFFFFF)
        buf = bytearray(4 << 20)
        with pytest.raises(VchanBroken):
            client.recv_into(buf, timeout=5)
        assert buf == bytearray(len(buf))  # nothing was copied
        assert client.rings.data_ready() == 0
        with pytest.raises(VchanBroken):  # and it stays broken (R4)
            client.send_nowait(b"x")
    finally:
        client.close()
        server.close(linger=5)


def test_scenario_26_peer_rewrites_our_consumer_index(pfs: tuple[Any, Any]) -> None:
    spf, cpf = pfs
    server, client = connected_pair(spf, cpf, "cons", 1 << 14)
    try:
        client.send(b"0123456789")
        assert server.recv(4, timeout=5) == b"0123"
        # the hostile client rewinds left.cons (offset 0), the server's own index
        struct.pack_into("<I", client.ctrl.mem, 0, 0xFFFFFF00)
        with pytest.raises(VchanBroken, match="consumer index"):
            server.recv(100, timeout=5)
    finally:
        client.close()
        server.close(linger=5)


def test_scenario_26_live_byte_garbage(pfs: tuple[Any, Any]) -> None:
    spf, cpf = pfs
    server, client = connected_pair(spf, cpf, "live", 0)
    try:
        server.ctrl.mem[21] = 7  # srv_live must be 0 or 1
        with pytest.raises(VchanBroken, match="live byte"):
            client.send(b"hello", timeout=5)
    finally:
        client.close()
        server.close(linger=5)


def test_scenario_26_stream_reader_gets_the_peer_error(pfs: tuple[Any, Any]) -> None:
    spf, cpf = pfs
    path = vchan_path(SERVER, CLIENT, "stream-broken")
    server = VchanServer(spf, CLIENT, path, read_min=4096, write_min=4096)

    async def main() -> None:
        reader, writer = await open_connection(cpf, SERVER, path)
        server.send(b"abc")
        assert await asyncio.wait_for(reader.readexactly(3), 5) == b"abc"
        struct.pack_into("<I", server.ctrl.mem, 12, 0x7FFFFFFF)
        server.events.notify(server.port)
        with pytest.raises(PeerError):
            await asyncio.wait_for(reader.read(10), 5)
        writer.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        server.close(linger=5)


def test_notification_storm_keeps_waits_bounded(pfs: tuple[Any, Any]) -> None:
    """R10: a peer signalling without writing anything only causes bounded spurious
    wake-ups: a read with a timeout still times out, and real data still arrives."""
    spf, cpf = pfs
    server, client = connected_pair(spf, cpf, "storm", 0)
    stop = threading.Event()

    def storm() -> None:
        while not stop.is_set():
            for _ in range(100):
                cpf.events.notify(client.port)
            time.sleep(0.0005)

    t = threading.Thread(target=storm)
    t.start()
    try:
        with pytest.raises(TimeoutError):
            server.recv(10, timeout=0.3)
        assert server.hub.deliveries > 0  # the storm did reach us
    finally:
        stop.set()
        t.join(10)
    try:
        client.send(b"real data")
        assert server.recv(100, timeout=5) == b"real data"
    finally:
        client.close()
        server.close(linger=5)

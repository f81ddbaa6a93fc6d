"""Hostile-inputs scenarios 21-25 over the xenstore ring, against the embedded xenstored.

A hostile dom1 writes raw bytes and indexes into its own xenstore page (taken over with
``platform.xenstore_ring()``) and signals its port; dom2, a well-behaved guest on its own
ring, must keep being served throughout, and the server must do bounded work.
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenpv.errors import RingOverflowError
from xenpv.platforms.loopback.emulator import InProcessEmulator
from xenpv.xenstore.page import (
    ERROR_NONE,
    ERROR_PROTO,
    ERROR_RINGIDX,
    REQ_CONS_OFFSET,
    REQ_PROD_OFFSET,
    RING_SIZE,
    RSP_CONS_OFFSET,
    RSP_PROD_OFFSET,
    XS_CONNECTED,
    XS_RECONNECT,
    XsRingPage,
)
from xenpv.xenstore.wire import HEADER, XsType

TIMEOUT = 20.0


class Hostile:
    """Dom1's raw view of its xenstore page and port."""

    def __init__(self, emu: InProcessEmulator, domid: int) -> None:
        self.platform = emu.platform(domid)
        self.ring = self.platform.xenstore_ring()
        self.page = XsRingPage(self.ring.mem, server=False)
        self.events = self.platform.events
        self.rx = bytearray()
        self.rx_pos = 0

    def notify(self) -> None:
        self.events.notify(self.ring.port)

    def wait(self, cond: Callable[[], bool], what: str, poll: float = 0.2) -> None:
        """Wait on the port (bounded) until ``cond()``; each wake-up, and every ``poll``
        seconds without one, re-checks it."""
        deadline = time.monotonic() + TIMEOUT
        while not cond():
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {what}"
            got = self.events.pending(min(left, poll))
            if got is not None:
                self.events.unmask(got)

    def send(self, data: bytes) -> None:
        """Write ``data`` into ``req`` (waiting for room) and signal."""
        view = memoryview(data)
        while view:
            n = self.page.write(view)
            view = view[n:]
            self.notify()
            if view:
                self.wait(lambda: self.page.writable() > 0, "room in req")

    def reconnect(self) -> None:
        self.page.connection = XS_RECONNECT
        self.notify()
        self.wait(lambda: self.page.connection == XS_CONNECTED, "the reconnection")
        self.page.release()
        self.page = XsRingPage(self.ring.mem, server=False)
        self.rx.clear()
        self.rx_pos = 0

    def close(self) -> None:
        self.page.release()
        self.ring.release()
        self.platform.close()


@pytest.fixture(scope="module")
def emu() -> Iterator[InProcessEmulator]:
    with InProcessEmulator([1, 2]) as e:
        yield e


@pytest.fixture
def hostile(emu: InProcessEmulator) -> Iterator[Hostile]:
    h = Hostile(emu, 1)
    h.reconnect()
    try:
        yield h
    finally:
        h.reconnect()  # whatever the test did, the ring works again afterwards
        h.close()


def well_behaved(emu: InProcessEmulator) -> None:
    """Dom2, over its own ring, still gets answers (one request of each kind)."""
    import asyncio

    platform = emu.platform(2)

    async def body() -> None:
        async with asyncio.timeout(TIMEOUT):
            async with await platform.xenstore_over_ring(timeout=TIMEOUT) as g:
                await g.write("data/alive", "1")
                assert await g.read("data/alive") == b"1"

    try:
        asyncio.run(body())
    finally:
        platform.close()


def request(type_: int, payload: bytes, req_id: int = 1, tx_id: int = 0) -> bytes:
    return HEADER.pack(type_, req_id, tx_id, len(payload)) + payload


def reply_of(h: Hostile) -> tuple[int, int, int, bytes]:
    """The next whole message from ``rsp`` (waiting for it; what follows it is kept)."""
    buf = h.rx

    def whole() -> bool:
        buf.extend(h.page.read())
        if len(buf) - h.rx_pos >= 16:
            h.notify()  # we consumed: the server may have more to put in
        return (len(buf) - h.rx_pos >= 16
                and len(buf) - h.rx_pos >= 16 + HEADER.unpack_from(buf, h.rx_pos)[3])

    h.wait(whole, "a reply")
    type_, req_id, tx_id, length = HEADER.unpack_from(buf, h.rx_pos)
    start = h.rx_pos + 16
    h.rx_pos = start + length
    return type_, req_id, tx_id, bytes(buf[start:start + length])


def ring_conn(emu: InProcessEmulator, domid: int) -> Any:
    return emu.xenstored.rings.rings[domid]


def test_corrupt_indexes_and_event_flood_mark_the_ring_bad(
    emu: InProcessEmulator, hostile: Hostile
) -> None:
    """Scenario 25: ``req_prod - req_cons > 1024`` → error RINGIDX, the ring ignored, the
    domain kept; an event flood on the ignored ring costs one look each; others served."""
    mem = hostile.ring.mem
    cons = struct.unpack_from("<I", mem, REQ_CONS_OFFSET)[0]
    struct.pack_into("<I", mem, REQ_PROD_OFFSET, (cons + 2000) & 0xFFFFFFFF)
    hostile.notify()
    hostile.wait(lambda: hostile.page.error == ERROR_RINGIDX, "error RINGIDX")
    conn = ring_conn(emu, 1)
    assert conn.ignored and conn.stats["faults"] == 1
    assert emu.xenstored.store.domains[1].introduced  # kept until destroyed (XSA-325)
    before = conn.stats["events"]
    for _ in range(5000):
        hostile.notify()
    well_behaved(emu)
    assert conn.stats["events"] - before <= 5000  # at most one pass per event
    assert conn.ignored and emu.xenstored.buffered_bytes(1) == 0
    # the reconnection protocol is the way back
    hostile.reconnect()
    assert hostile.page.error == ERROR_NONE and not conn.ignored
    hostile.send(request(XsType.READ, b"domid\0", 7))
    assert reply_of(hostile) == (XsType.READ, 7, 0, b"1")
    # the response ring's indexes too: the server finds them when it writes the reply
    prod = struct.unpack_from("<I", mem, RSP_PROD_OFFSET)[0]
    struct.pack_into("<I", mem, RSP_CONS_OFFSET, (prod - 3000) & 0xFFFFFFFF)
    hostile.send(request(XsType.READ, b"domid\0", 8))
    hostile.wait(lambda: hostile.page.error == ERROR_RINGIDX, "error RINGIDX (rsp)")
    assert conn.ignored and conn.stats["faults"] == 2
    well_behaved(emu)


@pytest.mark.parametrize("length", [4097, 0x80000000, 0xFFFFFFFF])
def test_oversized_length_is_a_protocol_error(
    emu: InProcessEmulator, hostile: Hostile, length: int
) -> None:
    """Scenario 25: a header with ``len`` over 4096 → error PROTO, nothing handled."""
    hostile.send(HEADER.pack(XsType.WRITE, 1, 0, length) + b"data/x\0" + b"y" * 64)
    hostile.wait(lambda: hostile.page.error == ERROR_PROTO, "error PROTO")
    assert ring_conn(emu, 1).ignored
    assert not emu.xenstore(0).exists("/local/domain/1/data/x")
    well_behaved(emu)


def test_partial_header_garbage_types_and_bad_transactions(
    emu: InProcessEmulator, hostile: Hostile
) -> None:
    """Scenario 25: half a header then silence (others served; completed later it is
    answered), unknown and unsupported types and a TRANSACTION_START with a tx_id are
    answered with errors, a watch token too long for its event is refused."""
    whole = request(XsType.READ, b"domid\0", 3)
    hostile.send(whole[:8])
    well_behaved(emu)
    assert ring_conn(emu, 1).decoder.buffered == 8
    hostile.send(whole[8:])
    assert reply_of(hostile) == (XsType.READ, 3, 0, b"1")
    for type_, tx_id in ((99, 0), (20, 0), (XsType.TRANSACTION_START, 5)):
        hostile.send(request(type_, b"\0", 4, tx_id))
        got = reply_of(hostile)
        assert got[0] == XsType.ERROR and got[1] == 4, got
    # a token that fits the WATCH (and its initial event) but not an event of a child
    token = b"t" * 4080
    hostile.send(request(XsType.WATCH, b"data\0" + token + b"\0", 5))
    assert reply_of(hostile) == (XsType.WATCH, 5, 0, b"OK\0")
    assert reply_of(hostile)[0] == XsType.WATCH_EVENT
    dropped = emu.xenstored.store.dropped_events
    emu.xenstore(0).write("/local/domain/1/data/a-child-with-a-long-name", "1")
    assert emu.xenstored.store.dropped_events == dropped + 1  # dropped, not sent
    hostile.send(request(XsType.READ, b"domid\0", 6))
    assert reply_of(hostile) == (XsType.READ, 6, 0, b"1")  # nothing came before it
    assert hostile.page.error == ERROR_NONE and not ring_conn(emu, 1).ignored


def test_guest_never_reading_responses_is_bounded(
    emu: InProcessEmulator, hostile: Hostile
) -> None:
    """Scenario 23: a guest that never reads ``rsp`` while sending requests and having
    watch events queued: the server stops taking its requests once its unread output
    passes the mark, queued events stay within the quota, others are served."""
    dom0 = emu.xenstore(0)
    dom0.write("/local/domain/1/big", b"z" * 2000)
    dom0.set_perms("/local/domain/1/big", ["n0", "r1"])
    hostile.send(request(XsType.WATCH, b"data/flood\0tok\0", 1))
    conn = ring_conn(emu, 1)
    sent = 0
    while not conn.write_paused:
        assert sent < 200, "the server never stopped taking requests"
        hostile.send(request(XsType.READ, b"big\0", 2))
        sent += 1
        # the server takes what it can before the next one (it runs in its own thread:
        # a loaded machine must not let the guest run ahead into a full ring)
        hostile.wait(lambda: conn.write_paused or hostile.page.writable() == RING_SIZE,
                     "the server to take the request or pause", poll=0.002)
    bound = conn.high_water + conn.batch * (16 + 2000)
    assert len(conn.out) <= bound
    with dom0.transaction() as t:
        for i in range(300):
            t.write(f"/local/domain/1/data/flood/n{i}", "1")
    dom0.rm("/local/domain/1/data/flood")
    well_behaved(emu)
    quotas = emu.xenstored.store.quotas
    assert len(conn.queue) <= quotas.watch_events
    assert emu.xenstored.buffered_bytes(1) <= bound + quotas.watch_events * 64 + 65536


def test_quotas_and_permissions_apply_over_the_ring(emu: InProcessEmulator) -> None:
    """Scenarios 21 and 24 over the ring: the per-domain quotas and the owner rules are
    those of socket connections."""
    import asyncio

    from xenpv.xenstore.wire import XenstoreError

    async def body() -> None:
        async with asyncio.timeout(TIMEOUT):
            async with await emu.platform(2).xenstore_over_ring(timeout=TIMEOUT) as g:
                txs = [await g.transaction().start() for _ in range(10)]
                with pytest.raises(XenstoreError) as info:
                    await g.transaction().start()
                assert info.value.errno_name in ("ENOSPC", "EQUOTA")
                for t in txs:
                    await t.abort()
                with pytest.raises(XenstoreError) as info:
                    await g.write("data/v", b"v" * 2049)
                assert info.value.errno_name in ("E2BIG", "ENOSPC")
                with pytest.raises(XenstoreError) as info:
                    await g.set_perms("data", ["n1"])
                assert info.value.errno_name == "EACCES"  # only dom0 changes owners
                with pytest.raises(XenstoreError) as info:
                    await g.set_perms("domid", ["n2"])
                assert info.value.errno_name == "EACCES"  # dom0's node
                with pytest.raises(XenstoreError) as info:
                    await g.rm("/")
                assert info.value.errno_name == "EACCES"

    asyncio.run(body())


_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("bytes"), st.binary(max_size=1500)),
        st.tuples(st.just("header"), st.sampled_from([0, 1, 2, 11, 12, 16, 20, 22, 99]),
                  st.integers(0, 5000)),
        st.tuples(st.sampled_from(["req_prod", "req_cons", "rsp_prod", "rsp_cons"]),
                  st.integers(0, 0xFFFFFFFF)),
        st.tuples(st.just("notify")),
    ),
    max_size=8,
)
_OFFSETS = {"req_prod": REQ_PROD_OFFSET, "req_cons": REQ_CONS_OFFSET,
            "rsp_prod": RSP_PROD_OFFSET, "rsp_cons": RSP_CONS_OFFSET}


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=_ACTIONS)
def test_any_ring_contents_leave_the_server_serving(
    emu: InProcessEmulator, actions: list[tuple[Any, ...]]
) -> None:
    """Whatever a guest puts in its page (bytes, headers, indexes) and however it
    signals: no internal error, other domains served, and a reconnection gives the
    guest a working connection again."""
    h = Hostile(emu, 1)
    try:
        h.reconnect()
        mem = h.ring.mem
        for action in actions:
            kind = action[0]
            if kind in ("bytes", "header"):
                data = action[1] if kind == "bytes" else HEADER.pack(action[1], 9, 0, action[2])
                with contextlib.suppress(RingOverflowError):  # its own indexes are junk
                    h.page.write(data)
            elif kind == "notify":
                h.notify()
            else:
                struct.pack_into("<I", mem, _OFFSETS[kind], action[1])
        h.notify()
        well_behaved(emu)
        assert emu.xenstored.store.internal_errors == 0
        h.reconnect()
        h.send(request(XsType.READ, b"domid\0", 77))
        assert reply_of(h) == (XsType.READ, 77, 0, b"1")
    finally:
        h.close()

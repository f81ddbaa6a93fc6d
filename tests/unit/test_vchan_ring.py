"""VchanRings over plain memory: data path, wrap-around, notify bits, insane states."""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.protocols.vchan import (
    VCHAN_CLI_LIVE_OFFSET,
    VCHAN_CLI_NOTIFY_OFFSET,
    VCHAN_NOTIFY_READ,
    VCHAN_NOTIFY_WRITE,
    VCHAN_SRV_LIVE_OFFSET,
    VCHAN_SRV_NOTIFY_OFFSET,
)
from xenpv.testing.clock import clock_installer
from xenpv.vchan.ring import implementation

IMPLS = ["reference", "cython"]


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> Any:
    """Each test runs against both implementations (the compiled one must be built)."""
    return implementation(request.param)

PAGE = 4096


def pair(cls: Any, left: int = 1024, right: int = 2048, start: int = 0) -> tuple[Any, Any, bytearray]:
    """A server and a client over one control page with in-page rings (left at 1024,
    right at 2048), indexes starting at ``start``."""
    page = bytearray(PAGE)
    struct.pack_into("<IIII", page, 0, start, start, start, start)
    mv = memoryview(page)
    lv, rv = mv[1024 : 1024 + left], mv[2048 : 2048 + right]
    server = cls(mv, lv, left, rv, right, is_server=True)
    client = cls(mv, rv, right, lv, left, is_server=False)
    return server, client, page


def test_bytes_flow_both_ways(impl: Any) -> None:
    server, client, _ = pair(impl)
    assert client.send(b"hello") == 5
    buf = bytearray(16)
    assert server.recv_into(buf) == 5 and buf[:5] == b"hello"
    assert server.send(b"world!") == 6
    assert client.recv_into(buf) == 6 and buf[:6] == b"world!"
    assert server.data_ready() == 0 and client.data_ready() == 0


def test_send_stops_at_ring_size_and_recv_never_exceeds_it(impl: Any) -> None:
    server, client, _ = pair(impl)
    assert client.send(b"x" * 5000) == 1024  # left ring holds 1024
    assert client.send(b"y") == 0
    assert client.buffer_space() == 0
    buf = bytearray(4096)
    assert server.recv_into(buf) == 1024


@pytest.mark.parametrize("start", [0, 0x7FFFFF00, 0xFFFFFF00])
def test_wrap_around_keeps_bytes_in_order(impl: Any, start: int) -> None:
    server, client, _ = pair(impl, start=start)
    data = os.urandom(50_000)
    out = bytearray()
    buf = bytearray(777)
    pos = 0
    while len(out) < len(data):
        pos += client.send(data[pos : pos + 613])
        n = server.recv_into(buf)
        out += buf[:n]
    assert bytes(out) == data


def test_kick_only_when_peer_asked(impl: Any) -> None:
    server, client, page = pair(impl)
    page[VCHAN_SRV_NOTIFY_OFFSET] = 0
    page[VCHAN_CLI_NOTIFY_OFFSET] = 0
    client.send(b"a")
    assert not client.kick  # nobody asked
    buf = bytearray(8)
    assert server.recv_into(buf) == 1
    assert server.recv_into(buf) == 0
    assert not page[VCHAN_CLI_NOTIFY_OFFSET] & VCHAN_NOTIFY_WRITE  # polling asks nothing
    server.request_notify(VCHAN_NOTIFY_WRITE)  # about to sleep: ask to hear of writes
    assert page[VCHAN_CLI_NOTIFY_OFFSET] & VCHAN_NOTIFY_WRITE
    client.send(b"b")
    assert client.kick  # ... so the client must signal, and the bit is consumed
    assert not page[VCHAN_CLI_NOTIFY_OFFSET] & VCHAN_NOTIFY_WRITE


def test_read_notification_kicks_the_waiting_writer(impl: Any) -> None:
    server, client, page = pair(impl)
    client.send(b"z" * 1024)
    assert client.send(b"more") == 0
    client.request_notify(VCHAN_NOTIFY_READ)
    assert page[VCHAN_SRV_NOTIFY_OFFSET] & VCHAN_NOTIFY_READ
    server.recv_into(bytearray(10))
    assert server.kick


def live_pair(cls: Any) -> tuple[Any, Any, bytearray]:
    """A connected pair: both live bytes set."""
    server, client, page = pair(cls)
    page[VCHAN_CLI_LIVE_OFFSET] = 1
    page[VCHAN_SRV_LIVE_OFFSET] = 1
    return server, client, page


SPIN_NS = 200_000  # 0.2 ms: long enough to go round the polling loop many times


def test_wait_ready_sees_data_room_and_departure(impl: Any) -> None:
    server, client, page = live_pair(impl)
    assert not server.wait_ready(True, False, SPIN_NS)  # nothing to read yet
    assert client.wait_ready(False, True, SPIN_NS)  # an empty ring has room
    client.send(b"x" * 1024)  # fills the left ring
    assert not client.wait_ready(False, True, SPIN_NS)
    assert server.wait_ready(True, False, SPIN_NS)
    assert server.recv_into(bytearray(10)) == 10
    assert client.wait_ready(False, True, 0)  # room again, seen without spinning
    page[VCHAN_CLI_LIVE_OFFSET] = 0  # the client leaves: a waiting server must look
    assert server.wait_ready(False, False, SPIN_NS)
    assert server.broken is None and client.broken is None


def test_spinning_calls_give_up_with_nothing_to_move(impl: Any) -> None:
    server, client, _ = live_pair(impl)
    buf = bytearray(64)
    assert server.recv_into(buf, -1, SPIN_NS) == 0
    assert client.send(b"y" * 1024, SPIN_NS) == 1024
    assert client.send(b"z", SPIN_NS) == 0  # full: spun, then gave up
    assert server.recv_into(buf, -1, SPIN_NS) == 64  # data there: no spin needed
    assert bytes(buf) == b"y" * 64
    assert client.send(b"z", SPIN_NS) == 1
    assert server.recv_into(buf, 0, SPIN_NS) == 0  # want 0: nothing, no wait


def test_scenario_26_wait_ready_reports_insane_indexes(impl: Any) -> None:
    server, client, page = live_pair(impl)
    struct.pack_into("<I", page, 4, 1024 + 5)  # left.prod beyond the ring, mid-wait
    assert server.wait_ready(True, False, SPIN_NS)
    assert server.broken is not None and server.data_ready() == 0
    struct.pack_into("<I", page, 8, 0x40000)  # the server rewrites the client's right.cons
    assert client.wait_ready(True, False, SPIN_NS) and client.broken is not None
    assert server.wait_ready(False, True, SPIN_NS)  # broken rings never keep us spinning


def test_scenario_26_prod_beyond_ring_reads_as_zero_and_locks(impl: Any) -> None:
    server, _client, page = pair(impl)
    struct.pack_into("<I", page, 4, 1024 + 5)  # left.prod claims more than the ring holds
    buf = bytearray(8192)
    assert server.recv_into(buf) == 0
    assert server.broken is not None and server.insane_count >= 1
    assert buf == bytearray(8192)
    struct.pack_into("<I", page, 4, 3)  # even a sane value later: stays locked (R4)
    assert server.recv_into(buf) == 0


def test_scenario_26_peer_rewrites_our_index(impl: Any) -> None:
    _server, client, page = pair(impl)
    client.send(b"abc")
    struct.pack_into("<I", page, 4, 0x12345)  # the server rewrites the client's left.prod
    assert client.send(b"d") == 0
    assert client.broken is not None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 4, 8, 12]), st.integers(0, 0xFFFFFFFF)),
                max_size=6),
       st.lists(st.integers(1, 3000), min_size=1, max_size=8))
def test_scenario_26_arbitrary_indexes_never_overrun(writes: list[tuple[int, int]],
                                                     sizes: list[int]) -> None:
    for name in IMPLS:
        run_arbitrary(implementation(name), writes, sizes)


def run_arbitrary(cls: Any, writes: list[tuple[int, int]], sizes: list[int]) -> None:
    server, client, page = pair(cls)
    for (off, value), size in zip(writes + [(0, 0)] * len(sizes), sizes, strict=False):
        if writes:
            struct.pack_into("<I", page, off, value)
        for ep, ring in ((server, 1024), (client, 2048)):
            buf = bytearray(size)
            n = ep.recv_into(buf)
            assert 0 <= n <= min(size, ring)
            assert 0 <= ep.send(os.urandom(size)) <= min(size, 2048 if ep is server else 1024)
            assert 0 <= ep.data_ready() <= ring
            assert 0 <= ep.recv_into(buf, -1, 1000) <= min(size, ring)  # spins stay bounded
            assert isinstance(ep.wait_ready(True, True, 1000), bool)  # and returns


def test_released_rings_are_empty_and_broken(impl: Any) -> None:
    server, _client, _ = pair(impl)
    server.release()
    assert server.recv_into(bytearray(4)) == 0
    assert server.send(b"x") == 0
    assert server.peer_live() == 0
    assert server.broken == "released"


def test_write_some_only_while_peer_connected(impl: Any) -> None:
    server, client, page = pair(impl)
    assert client.write_some(b"abc") == -1  # server live byte 0: nothing written
    assert server.data_ready() == 0
    page[VCHAN_SRV_LIVE_OFFSET] = 1
    assert client.write_some(b"abc") == 3
    page[VCHAN_CLI_LIVE_OFFSET] = 2  # a server whose client is still waiting: slow path
    assert server.write_some(b"x") == -1
    page[VCHAN_CLI_LIVE_OFFSET] = 1
    assert server.write_some(b"x") == 1
    server.release()
    assert server.write_some(b"x") == -1


def test_write_some_continues_at_offset_without_slicing(impl: Any) -> None:
    server, client, _ = live_pair(impl)
    data = os.urandom(3000)
    out = bytearray()
    buf = bytearray(4096)
    pos = 0
    while pos < len(data):
        n = client.write_some(memoryview(data), pos)  # the left ring holds 1024
        assert 0 < n <= 1024
        pos += n
        out += buf[: server.recv_into(buf)]
    assert bytes(out) == data
    assert client.write_some(data, len(data)) == 0
    with pytest.raises(ValueError):
        client.write_some(data, len(data) + 1)
    with pytest.raises(ValueError):
        client.write_some(data, -1)


def test_write_some_spins_for_room_then_gives_up(impl: Any) -> None:
    """The blocking write's poll runs inside the call: a full ring is polled for spin_ns
    and 0 comes back; a peer that leaves meanwhile is seen at the next call (-1)."""
    server, client, page = live_pair(impl)
    assert client.write_some(b"y" * 1500, 0, SPIN_NS) == 1024
    assert client.write_some(b"y" * 1500, 1024, SPIN_NS) == 0  # full: spun, gave up
    assert server.recv_into(bytearray(100)) == 100
    assert client.write_some(b"y" * 1500, 1024, SPIN_NS) == 100  # room: no spin needed
    page[VCHAN_SRV_LIVE_OFFSET] = 0
    assert client.write_some(b"y" * 1500, 1124, SPIN_NS) == -1


def test_on_kick_replaces_the_kick_flag_and_kicks_are_counted(impl: Any) -> None:
    server, client, _page = live_pair(impl)
    calls: list[str] = []
    client.on_kick = lambda: calls.append("kick")
    server.request_notify(VCHAN_NOTIFY_WRITE)
    assert client.write_some(b"a") == 1
    assert calls == ["kick"] and not client.kick and client.kicks == 1
    assert client.send(b"b") == 1  # nobody asked again
    assert calls == ["kick"] and client.kicks == 1
    server.request_notify(VCHAN_NOTIFY_WRITE)
    client.on_kick = None  # back to the flag
    client.send(b"c")
    assert client.kick and client.kicks == 2 and calls == ["kick"]


def test_on_kick_errors_propagate_after_the_data_is_published(impl: Any) -> None:
    server, client, _page = live_pair(impl)

    def boom() -> None:
        raise OSError("event channel gone")

    server.on_kick = boom
    client.send(b"z" * 1024)
    client.request_notify(VCHAN_NOTIFY_READ)
    with pytest.raises(OSError):
        server.recv_into(bytearray(10))
    assert client.buffer_space() == 10  # the read was published before the signal


OPS = st.lists(
    st.tuples(st.sampled_from(["send", "write_some", "recv", "request", "live", "discard",
                               "poke"]),
              st.integers(0, 3000), st.integers(0, 255)),
    max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops=OPS, start=st.sampled_from([0, 0xFFFFFC00]))
def test_twins_agree_on_every_call(ops: list[tuple[str, int, int]], start: int) -> None:
    """The compiled rings and ring.py give the same results, kicks, counters and memory
    for the same calls (including a peer poking the control page)."""
    sides = []
    for name in IMPLS:
        server, client, page = pair(implementation(name), start=start)
        page[VCHAN_CLI_LIVE_OFFSET] = page[VCHAN_SRV_LIVE_OFFSET] = 1
        sides.append((server, client, page, []))
    for i, (op, size, byte) in enumerate(ops):
        for server, client, page, log in sides:
            ep = server if i % 2 else client
            data = bytes([byte]) * size
            if op == "send":
                log.append(ep.send(data))
            elif op == "write_some":
                log.append(ep.write_some(data, size // 3))
            elif op == "recv":
                buf = bytearray(size)
                n = ep.recv_into(buf, size // 2 if byte & 1 else -1)
                log.append((n, bytes(buf[:n])))
            elif op == "request":
                ep.request_notify(byte & 3)
            elif op == "live":
                page[VCHAN_CLI_LIVE_OFFSET if byte & 1 else VCHAN_SRV_LIVE_OFFSET] = byte % 3
            elif op == "discard":
                log.append(ep.discard())
            else:  # a hostile peer rewrites an index
                struct.pack_into("<I", page, 4 * (byte % 4), (start + size * (byte % 5)) & 0xFFFFFFFF)
            log.append((ep.kick, ep.kicks, ep.broken is None, ep.insane_count,
                        ep.data_ready(), ep.buffer_space()))
            ep.kick = False
    (_, _, page_a, log_a), (_, _, page_b, log_b) = sides
    assert log_a == log_b
    assert page_a == page_b


# -- the busy-wait, step by step (the reference rings; the compiled twin polls in C) --------
#
# ring.py reads the time only through ``time.perf_counter_ns``.  A scripted clock makes
# the spin deterministic: every reading advances by ``step`` ns, and the peer acts at a
# chosen reading (data arrives, room appears), as a peer on another CPU would while we
# poll.  What the docstrings promise: a zero budget (the default) never polls; a budget
# polls until the deadline (now + spin_ns) and sees whatever the peer did before it;
# what the peer does after the deadline is not waited for.


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install a scripted clock in ring.py; the test sets it up with ``clock(...)``."""
    import xenpv.vchan.ring as ring

    return clock_installer(monkeypatch, ring)


REF = implementation("reference")


def test_spin_sees_data_the_peer_writes_while_we_poll(clock: Any) -> None:
    """recv_into and wait_ready(reading) with a budget: data written by the peer during
    the spin is seen (and received), whenever it comes before the deadline - at the first
    reading, in the middle, or at the reading that reaches the deadline (1 ns budget)."""
    for spin, step, at in [(1000, 10, 3), (1000, 10, 1), (1000, 10, 100), (1, 10, 1)]:
        server, client, _ = live_pair(REF)
        c = clock(step, at, lambda client=client: client.send(b"abc"))
        buf = bytearray(8)
        assert server.recv_into(buf, -1, spin) == 3 and buf[:3] == b"abc", (spin, at)
        assert c.reads == max(at, 2)  # polling stops at the first look after the peer acted
        server, client, _ = live_pair(REF)
        c = clock(step, at, lambda client=client: client.send(b"abc"))
        assert server.wait_ready(True, False, spin), (spin, at)
        assert server.data_ready() == 3
        # wanting a single byte is wanting something: it spins too
        server, client, _ = live_pair(REF)
        clock(step, at, lambda client=client: client.send(b"abc"))
        assert server.recv_into(buf, 1, spin) == 1 and buf[:1] == b"a"


def test_spin_sees_room_the_peer_makes_while_we_poll(clock: Any) -> None:
    """send, write_some and wait_ready(writing) with a budget on a full ring: room the
    peer makes during the spin is used."""
    for spin, step, at in [(1000, 10, 3), (1000, 10, 100), (1, 10, 1)]:
        for call in ("send", "write_some", "wait"):
            server, client, _ = live_pair(REF)
            assert client.send(b"f" * 1024) == 1024  # the left ring is full
            c = clock(step, at, lambda server=server: server.recv_into(bytearray(5)))
            if call == "send":
                assert client.send(b"0123456789", spin) == 5, (spin, at)
                c = clock(step, at, lambda server=server: server.recv_into(bytearray(1)))
                assert client.send(b"!", spin) == 1  # a single byte is worth a spin too
            elif call == "write_some":
                assert client.write_some(b"0123456789", 2, spin) == 5, (spin, at)
            else:
                assert client.wait_ready(False, True, spin) and client.buffer_space() == 5
            assert c.reads == max(at, 2)  # polling stops at the first look after the peer acted
            if call != "wait":
                out = bytearray(2048)
                assert server.recv_into(out) == 1024  # the f's left, then the new bytes
                tail = b"01234!" if call == "send" else b"23456"
                assert out[1024 - len(tail) : 1024] == tail


def test_spin_waits_only_for_what_was_asked(clock: Any) -> None:
    """A writer's spin is not ended by data in the ring it reads, a reader's not by room
    in the ring it writes: with the other ring ready all along, the spin goes on until
    the peer acts (then the call moves the bytes), or until the deadline (then 0)."""
    for at, moved in [(5, True), (1000, False)]:
        server, client, _ = live_pair(REF)
        server.send(b"for the client")  # the client has data to read ...
        assert client.send(b"f" * 1024) == 1024  # ... and no room to write
        clock(10, at, lambda server=server: server.recv_into(bytearray(5)))
        assert client.send(b"x", 1000) == (1 if moved else 0), at
        clock(10, at, lambda server=server: server.recv_into(bytearray(5)))
        assert client.wait_ready(False, True, 1000) is moved
        server, client, _ = live_pair(REF)  # the server has room to write, nothing to read
        clock(10, at, lambda client=client: client.send(b"late"))
        assert server.recv_into(bytearray(8), -1, 1000) == (4 if moved else 0), at
        clock(10, at, lambda client=client: client.send(b"late"))
        assert server.wait_ready(True, False, 1000) is moved


def test_spin_stops_at_the_deadline(clock: Any) -> None:
    """The budget ends at now + spin_ns: a peer that acts only at the first reading past
    the deadline is not waited for, whether a reading lands on the deadline exactly
    (steps of 500 ns) or jumps past it (300 ns)."""
    for step in (500, 300):
        # reading 1 sets the deadline; readings 2.. are at +step, +2*step, ...: the one
        # at or past +1000 ends the spin, and the peer acts at the reading after it
        last = 1 + -(-1000 // step)
        for call in ("wait", "recv"):
            server, client, _ = live_pair(REF)
            acted: list[int] = []
            clock(step, last + 1, lambda client=client, acted=acted: acted.append(client.send(b"late")))
            if call == "wait":
                assert not server.wait_ready(True, False, 1000)
            else:
                assert server.recv_into(bytearray(8), -1, 1000) == 0
            assert acted == [], (step, call)  # we stopped reading the clock in time


def test_no_budget_means_no_polling(clock: Any) -> None:
    """spin_ns 0 - the default of recv_into, send and write_some - checks once and never
    reads the clock, so a peer acting 'meanwhile' is not waited for; the same for a
    read of 0 bytes, however large the budget."""
    server, client, _ = live_pair(REF)
    c = clock(10, 1, lambda: client.send(b"abc"))
    assert server.recv_into(bytearray(8)) == 0
    assert server.recv_into(bytearray(8), -1, 0) == 0
    assert not server.wait_ready(True, False, 0)
    assert server.recv_into(bytearray(8), 0, 10_000) == 0  # want 0: nothing to wait for
    assert c.reads == 0
    assert client.send(b"f" * 1024) == 1024
    c = clock(10, 1, lambda: server.recv_into(bytearray(5)))
    assert client.send(b"x") == 0
    assert client.write_some(b"x") == 0
    assert client.send(b"x", 0) == 0
    assert client.send(b"", 10_000) == 0  # nothing to send: nothing to wait for
    assert not client.wait_ready(False, True, 0)
    assert c.reads == 0
    # what is ready now is reported at once, with no budget, for either direction
    server, client, _ = live_pair(REF)
    client.send(b"abc")
    assert server.wait_ready(True, False, 0) and server.wait_ready(True, True, 0)
    assert client.wait_ready(False, True, 0)


def test_vchan_rings_bookkeeping() -> None:
    """is_server as given; set_live stores our own live byte (server: srv_live at 21,
    client: cli_live at 20, xen-protocols.md §10.1) and nothing else; release is
    idempotent; an unknown implementation is refused by name."""
    for cls in (REF, implementation("cython")):
        server, client, page = pair(cls)
        assert server.is_server is True and client.is_server is False
        before = bytes(page)
        server.set_live(1)
        assert page[21] == 1 and bytes(page[:21]) + bytes(page[22:]) == before[:21] + before[22:]
        client.set_live(2)
        assert page[20] == 2 and page[21] == 1
        assert client.peer_live() == 1 and server.peer_live() == 2
        server.release()
        server.release()  # twice: nothing left to drop
        server.set_live(0)  # released: the page is no longer ours to write
        assert page[21] == 1 and server.broken == "released"
    with pytest.raises(ValueError, match="'bogus'"):
        implementation("bogus")
    with pytest.raises(ValueError, match="offset 9 outside a buffer of 3 bytes"):
        live_pair(REF)[1].write_some(b"abc", 9)

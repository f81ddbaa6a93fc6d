"""The reference shared rings (ring.py's readable twin) at the edges mutation testing found.

What is checked, from io/ring.h as xen-protocols.md §1 states it and from the methods'
docstrings: the ring-size formula at its small ends; a count of entries equal to what a
buffer holds; ``max_n`` 0 takes nothing; a poll that finds nothing re-arms the event
field at ``cons + 1`` whatever ``max_n`` (but 0) is; one-entry calls take one entry;
responses beyond the consumed requests are refused by the one-call submit too; the busy
wait (under a scripted clock: the peer publishes at a chosen clock reading) sees what the
peer publishes before the deadline, never reads the clock without a budget (the default),
and stops at the deadline; refusals carry their text; a broken ring keeps its reason.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest

from xenpv.errors import LocalError, RingOverflowError
from xenpv.rings import _reference as ref
from xenpv.testing.clock import clock_installer

PAGE = 4096
E = 16  # slot size: 252 // 16 -> 252 slots -> 128 (a power of two)


def pair() -> tuple[Any, Any, bytearray]:
    page = bytearray(PAGE)
    return ref.FrontRing(page, E), ref.BackRing(page, E), page


def entries(*tags: int) -> bytes:
    return b"".join(bytes([t]) * E for t in tags)


def header(page: bytearray) -> tuple[int, int, int, int]:
    """(req_prod, req_event, rsp_prod, rsp_event)."""
    return struct.unpack_from("<IIII", page, 0)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install a scripted clock in the reference module; set up with ``clock(...)``."""
    return clock_installer(monkeypatch, ref)


def test_ring_size_small_ends() -> None:
    assert ref.ring_size(65, 1) == 1 and ref.ring_size(64 + 7, 1) == 4
    assert ref.ring_size(64, 1) == 0 and ref.ring_size(10, 8) == 0 and ref.ring_size(0, 1) == 0
    for bad in (0, -1):
        with pytest.raises(LocalError, match=rf"^slot size must be positive, not {bad}$"):
            ref.ring_size(PAGE, bad)
    with pytest.raises(LocalError, match=r"^a 100-byte buffer holds no 40-byte slot after the 64-byte header$"):
        ref.FrontRing(bytearray(100), 40)


def test_counts_max_n_and_single_entries() -> None:
    front, back, _ = pair()
    assert front.put_requests(entries(1, 2, 3), 3) == 3  # exactly what the buffer holds
    with pytest.raises(LocalError, match=r"^4 entries asked for but the buffer holds 3 of 16 bytes$"):
        front.put_requests(entries(1, 2, 3), 4)
    front.push_requests()
    assert back.take_requests(0) == b""  # max_n 0: nothing, the entries stay
    assert back.take_request() == entries(1)  # one call, one entry
    arr = back.take_requests(1, dtype=np.dtype([("tag", "u1"), ("rest", "u1", (E - 1,))]))
    assert isinstance(arr, np.ndarray) and arr["tag"].tolist() == [2]
    dst = bytearray(4 * E)
    assert back.take_requests_into(dst) == 1 and dst[:E] == entries(3)
    assert back.take_requests_into(dst) == 0  # empty, no budget: no wait, no error
    # responses: at most one per consumed request, refused by the one-call submit too
    with pytest.raises(LocalError, match=r"^4 entries do not fit: room for 3$"):
        back.submit_responses(entries(9, 9, 9, 9))
    assert back.submit_responses(entries(7, 8)) in (True, False)
    assert front.take_response() == entries(7)  # one of the two waiting
    arr = front.take_responses(dtype=np.dtype([("tag", "u1"), ("rest", "u1", (E - 1,))]))
    assert isinstance(arr, np.ndarray) and arr["tag"].tolist() == [8]
    assert front.take_responses_into(dst) == 0


def test_polls_rearm_at_cons_plus_one() -> None:
    front, back, page = pair()
    for max_n in (1, 2, -1):
        assert back.poll_requests_into(bytearray(4 * E), max_n) == 0
        assert header(page)[1] == back.req_cons + 1
        page[4:8] = bytes(4)
    assert back.poll_requests_into(bytearray(4 * E), 0) == 0
    assert header(page)[1] == 0  # max_n 0 asked for nothing: no re-arm
    front.set_rsp_event(1234)
    assert header(page)[3] == 1234


def test_one_call_turns_at_their_edges() -> None:
    front, back, page = pair()
    # the backend: a single waiting request is answered
    front.put_requests(entries(5))
    front.push_requests()
    dst = bytearray(4 * E)
    k, _ = back.take_and_respond(dst, entries(6))
    assert k == 1 and dst[:E] == entries(5)
    assert front.take_response() == entries(6)
    # the frontend: queuing one request with room takes only what is there, no re-arm
    before = header(page)[3]
    assert front.take_and_submit(bytearray(4 * E), entries(8), 1)[:2] == (0, 1)
    assert header(page)[3] == before
    # nothing to queue: it polls, and re-arms
    assert front.take_and_submit(bytearray(4 * E), b"", 0)[:2] == (0, 0)
    assert header(page)[3] == front.rsp_cons + 1


def test_spin_sees_what_the_peer_publishes_in_time(clock: Any) -> None:
    for budget, step, at in [(1000, 10, 3), (1000, 10, 100), (1, 10, 1)]:
        front, back, _ = pair()
        front.put_requests(entries(4))
        c = clock(step, at, front.push_requests)
        assert back.spin(budget) == 1, (budget, at)
        assert c.reads == at  # it stops looking once it has seen the entry


def test_spin_stops_at_the_deadline_and_needs_a_budget(clock: Any) -> None:
    # readings at +500 and +1000 = the deadline: the peer acting at the next is not seen
    front, back, _ = pair()
    front.put_requests(entries(4))
    clock(500, 4, front.push_requests)
    assert back.spin(1000) == 0
    front, back, _ = pair()
    front.put_requests(entries(4))
    c = clock(10, 1, front.push_requests)
    dst = bytearray(4 * E)
    assert back.spin(0) == 0 and back.take_requests_into(dst) == 0
    assert back.poll_requests_into(dst, 1) == 0 and back.take_and_respond(dst, entries(1)) == (0, False)
    assert front.take_responses_into(dst) == 0 and front.poll_responses_into(dst, 1) == 0
    assert front.take_and_submit(dst, b"", 0)[0] == 0
    assert c.reads == 0  # no budget, no clock


def test_refusal_texts_and_a_broken_ring_keeps_its_reason() -> None:
    front, back, _ = pair()
    with pytest.raises(LocalError, match=r"^a 17-byte entry does not fit a 16-byte slot$"):
        front.put_request(bytes(17))
    for _ in range(128):
        front.put_request(b"x")
    with pytest.raises(LocalError, match=r"^no room for another entry$"):
        front.put_request(b"x")
    front.push_requests()
    with pytest.raises(LocalError, match=r"^destination buffer must be writable$"):
        back.take_requests_into(bytes(4 * E))
    page2 = bytearray(PAGE)
    front2 = ref.FrontRing(page2, E)
    struct.pack_into("<I", page2, 8, 3)  # rsp_prod: 3 responses, no request outstanding
    with pytest.raises(RingOverflowError) as first:
        front2.take_responses()
    reason = str(first.value)
    assert "claims 3 responses" in reason and front2.broken
    with pytest.raises(RingOverflowError) as again:
        front2.take_response()
    assert str(again.value) == reason
    front2.release()
    back.release()
    with pytest.raises(LocalError, match=r"^the ring memory was released$"):
        back.take_request()


def test_byte_ring_texts_and_a_second_release() -> None:
    buf = bytearray(64)
    ring = ref.ByteRing(buf, data_offset=16, size=32, prod_offset=0, cons_offset=4)
    with pytest.raises(LocalError, match=r"^destination buffer must be writable$"):
        ring.read_into(bytes(8))
    ring.release()
    ring.release()  # nothing left to let go of


def byte_ring(buf: bytearray, **kw: Any) -> Any:
    args = {"data_offset": 16, "size": 32, "prod_offset": 0, "cons_offset": 4, **kw}
    return ref.ByteRing(buf, **args)


def test_byte_ring_geometry_edges() -> None:
    """size 1..2^31 units of >= 1 byte, the data area inside the buffer, the two index
    words outside the data area (touching it is fine) and distinct; the texts."""
    byte_ring(bytearray(64), size=1)
    byte_ring(bytearray(64), size=16, slot=3)  # 16..64 exactly
    for kw, text in [
        ({"size": 0}, r"^bad ring geometry: 0 units of 1 bytes$"),
        ({"size": 0x80000001}, r"^bad ring geometry: 2147483649 units of 1 bytes$"),
        ({"slot": 0}, r"^bad ring geometry: 32 units of 0 bytes$"),
        ({"size": 0x80000000}, r"^data area \[16, 2147483664\) is outside the 64-byte buffer$"),
        ({"size": 32, "slot": 2}, r"^data area \[16, 80\) is outside the 64-byte buffer$"),
        ({"prod_offset": 16}, r"^index offset 16 overlaps the data area$"),
        ({"cons_offset": 44}, r"^index offset 44 overlaps the data area$"),
        ({"cons_offset": 0}, r"^prod and cons cannot share one word$"),
        ({"on_insane": "ignore"}, r"^on_insane must be 'error' or 'zero', not 'ignore'$"),
    ]:
        with pytest.raises(LocalError, match=text):
            byte_ring(bytearray(64), **kw)
    # index words right before and right after the data area
    byte_ring(bytearray(64), data_offset=8, size=32, prod_offset=4, cons_offset=40)


def test_byte_ring_units_and_release_with_a_separate_data_buffer() -> None:
    buf = bytearray(64)
    ring = byte_ring(buf, size=16, slot=2)
    assert ring.write(bytes(range(16))) == 8
    out = bytearray(6)
    assert ring.read_into(out) == 3 and out == bytes(range(6))
    ring.release()
    buf.extend(b"x")  # every view of the buffer was let go of
    index, data = bytearray(8), bytearray(32)
    ring = ref.ByteRing(index, data_offset=0, size=32, prod_offset=0, cons_offset=4,
                        data_buffer=data)
    assert ring.write(b"abc") == 3 and ring.read() == b"abc"
    ring.release()
    index.extend(b"x")
    data.extend(b"x")


def test_byte_ring_modulo_sizes_broken_and_released_states() -> None:
    """A ring of 6 units (not a power of two: indexes taken modulo the size) keeps the
    bytes in order across its end; an insane index pair breaks an "error" ring with the
    reason, which every later call repeats; a released ring says so."""
    buf = bytearray(64)
    ring = byte_ring(buf, size=6)
    for chunk in (b"abcd", b"efgh", b"ijklm"):
        assert ring.write(chunk) == len(chunk) and ring.read() == chunk
    struct.pack_into("<I", buf, 0, 1000)  # prod 1000 units past cons
    with pytest.raises(RingOverflowError) as first:
        ring.available()
    assert str(first.value).startswith("ring indexes prod 1000 cons 13 claim 987 units")
    with pytest.raises(RingOverflowError) as again:
        ring.read()
    assert str(again.value) == str(first.value) and ring.broken
    ring = byte_ring(bytearray(64))
    ring.release()
    with pytest.raises(LocalError, match=r"^the ring memory was released$"):
        ring.available()


def test_byte_atomics_and_memory_refusals() -> None:
    """The byte atomics return the old byte unsigned; offsets outside the buffer, index
    words that are misaligned and read-only ring memory are refused with their texts."""
    buf = bytearray([0x80, 0xFF])
    assert ref.atomic_or8(buf, 0, 0x01) == 0x80 and buf[0] == 0x81
    assert ref.atomic_fetch_and_clear8(buf, 1, 0x80) == 0xFF and buf[1] == 0x7F
    with pytest.raises(LocalError, match=r"^offset 2 is outside the 2-byte buffer$"):
        ref.atomic_or8(buf, 2, 1)
    with pytest.raises(LocalError, match=r"^index offset 2 is not an aligned word of the 64-byte buffer$"):
        byte_ring(bytearray(64), prod_offset=2)
    with pytest.raises(LocalError, match=r"^ring memory must be writable$"):
        ref.FrontRing(bytes(PAGE), E)

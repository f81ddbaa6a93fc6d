"""Shared request/response rings: geometry, initialisation, notify decisions, batches.

Every test runs once per implementation (``rings`` fixture: cython and reference).
"""

from __future__ import annotations

import gc
import mmap
import struct
from types import SimpleNamespace

import numpy as np
import pytest
from rings_conftest import MASK32, PAGE, pattern, rings_fixture  # noqa: F401

from xenpv.errors import LocalError, PeerError, RingOverflowError

BLKIF = 112
HEADER = struct.Struct("<IIII")


def header(page: bytearray) -> tuple[int, int, int, int]:
    """(req_prod, req_event, rsp_prod, rsp_event) as stored in the page."""
    return HEADER.unpack_from(page, 0)


@pytest.mark.parametrize("pages,slot,expected", [
    (1, 112, 32), (2, 112, 64), (4, 112, 128), (8, 112, 256), (16, 112, 512), (1, 108, 32),
    (1, 12, 256), (1, 8, 256), (1, 16, 128), (1, 148, 16), (1, 4, 512), (1, 4032, 1),
    (1, 4033, 0),
])
def test_ring_size_follows_the_formula(rings: SimpleNamespace, pages: int, slot: int,
                                       expected: int) -> None:
    """xen-protocols.md §0.2 / §1.2: N = largest power of two <= (bytes - 64) // E."""
    assert rings.ring_size(pages * PAGE, slot) == expected


def test_front_init_writes_the_header_only(rings: SimpleNamespace) -> None:
    """SHARED_RING_INIT: prods 0, events 1, pvt and pad zeroed, slots untouched."""
    page = bytearray(pattern(3, PAGE))
    front = rings.FrontRing(page, BLKIF)
    assert header(page) == (0, 1, 0, 1)
    assert page[16:64] == bytes(48)
    assert page[64:] == pattern(3, PAGE)[64:]
    assert (front.nr_ents, front.slot_size, front.free_requests()) == (32, BLKIF, 32)
    assert (front.req_prod_pvt, front.rsp_cons) == (0, 0)


def test_init_and_attach_at_an_arbitrary_index(rings: SimpleNamespace) -> None:
    """Both ends can start at any index (reconnect); arithmetic wraps at 2^32."""
    page = bytearray(2 * PAGE)
    start = MASK32 - 3
    front = rings.FrontRing(page, BLKIF, start)
    back = rings.BackRing(page, BLKIF, start)
    assert front.nr_ents == 64
    assert header(page) == (start, MASK32 - 2, start, MASK32 - 2)
    assert front.put_requests(pattern(1, 10 * BLKIF)) == 10
    assert front.push_requests_and_check_notify() is True
    assert front.req_prod_pvt == 6  # wrapped
    assert back.unconsumed_requests() == 10
    assert back.take_requests() == pattern(1, 10 * BLKIF)
    assert back.req_cons == 6


def test_front_attach_keeps_the_header(rings: SimpleNamespace) -> None:
    """init=False attaches without touching shared memory."""
    page = bytearray(pattern(9, PAGE))
    before = bytes(page)
    front = rings.FrontRing(page, 64, 1234, init=False)
    assert bytes(page) == before
    assert (front.req_prod_pvt, front.rsp_cons) == (1234, 1234)


@pytest.mark.parametrize("event,notify", [(6, True), (8, True), (5, False), (9, False)])
def test_notify_exactly_when_the_event_lies_in_the_pushed_window(
        rings: SimpleNamespace, event: int, notify: bool) -> None:
    """§1.4 examples: old=5, new=8; notify iff req_event is in (old, new]."""
    page = bytearray(PAGE)
    front = rings.FrontRing(page, BLKIF, 5)
    struct.pack_into("<I", page, 4, event)
    front.put_requests(bytes(3 * BLKIF))
    assert front.push_requests_and_check_notify() is notify
    assert header(page)[0] == 8


@pytest.mark.parametrize("event,notify", [(MASK32, True), (0, True), (1, True), (2, False),
                                          (MASK32 - 1, False)])
def test_notify_window_across_the_wrap(rings: SimpleNamespace, event: int,
                                       notify: bool) -> None:
    """§1.4: old = 2^32-2, new = 1: events 2^32-1, 0 and 1 are inside the window."""
    page = bytearray(PAGE)
    back = rings.BackRing(page, BLKIF, MASK32 - 1)
    front = rings.FrontRing(page, BLKIF, MASK32 - 1)
    front.put_requests(bytes(3 * BLKIF))
    front.push_requests()
    assert back.take_requests_into(bytearray(3 * BLKIF)) == 3
    struct.pack_into("<I", page, 12, event)
    back.put_responses(bytes(3 * BLKIF))
    assert back.push_responses_and_check_notify() is notify
    assert header(page)[2] == 1


def test_plain_push_publishes_without_looking_at_the_event(rings: SimpleNamespace) -> None:
    page = bytearray(PAGE)
    front = rings.FrontRing(page, 12)
    front.put_request(b"\x01" * 12)
    assert header(page)[0] == 0  # not published yet
    front.push_requests()
    assert header(page)[0] == 1


def test_final_check_rearms_the_event(rings: SimpleNamespace) -> None:
    """§1.6: with nothing pending the event is set to cons + 1 and False returned."""
    page = bytearray(PAGE)
    front = rings.FrontRing(page, 16, 100)
    back = rings.BackRing(page, 16, 100)
    struct.pack_into("<I", page, 4, 7)
    assert back.final_check_for_requests() is False
    assert header(page)[1] == 101
    front.put_request(bytes(16))
    assert front.push_requests_and_check_notify() is True
    struct.pack_into("<I", page, 4, 7)
    assert back.final_check_for_requests() is True
    assert header(page)[1] == 7  # work pending: event left alone
    assert back.take_request() == bytes(16)
    back.put_response(b"ok")
    assert back.push_responses_and_check_notify() is True  # rsp_event 101 in (100, 101]
    assert front.final_check_for_responses() is True
    assert front.take_response() == b"ok" + bytes(14)
    assert front.final_check_for_responses() is False
    assert header(page)[3] == 102


def test_custom_rearm_batches_notifications(rings: SimpleNamespace) -> None:
    page = bytearray(PAGE)
    front = rings.FrontRing(page, 8)
    back = rings.BackRing(page, 8)
    back.set_req_event(4)
    front.put_requests(bytes(8 * 3))
    assert front.push_requests_and_check_notify() is False
    front.put_requests(bytes(8))
    assert front.push_requests_and_check_notify() is True
    assert back.req_event == 4


def test_batches_wrap_around_the_end_of_the_slot_array(rings: SimpleNamespace) -> None:
    page = bytearray(PAGE)
    front = rings.FrontRing(page, BLKIF, 30)  # slots 30, 31, then 0 ...
    back = rings.BackRing(page, BLKIF, 30)
    reqs = pattern(5, 5 * BLKIF)
    assert front.put_requests(reqs) == 5
    front.push_requests()
    assert page[64 + 30 * BLKIF : 64 + 32 * BLKIF] == reqs[: 2 * BLKIF]
    assert page[64 : 64 + 3 * BLKIF] == reqs[2 * BLKIF :]
    dst = bytearray(8 * BLKIF)
    assert back.take_requests_into(dst) == 5
    assert dst[: 5 * BLKIF] == reqs
    rsps = pattern(6, 5 * BLKIF)
    assert back.submit_responses(rsps) is True
    assert front.take_responses(2) == rsps[: 2 * BLKIF]
    assert front.take_responses() == rsps[2 * BLKIF :]
    assert front.take_responses() == b""


def test_put_requests_stops_at_a_full_ring(rings: SimpleNamespace) -> None:
    page = bytearray(PAGE)
    front = rings.FrontRing(page, BLKIF)
    assert front.put_requests(pattern(0, 40 * BLKIF)) == 32
    assert front.full() and front.free_requests() == 0
    with pytest.raises(LocalError):
        front.put_request(b"x")
    with pytest.raises(LocalError):
        front.submit_requests(bytes(BLKIF))
    assert front.put_requests(bytes(BLKIF)) == 0


def test_take_honours_max_n_and_the_destination_size(rings: SimpleNamespace) -> None:
    page = bytearray(PAGE)
    front = rings.FrontRing(page, 64)
    back = rings.BackRing(page, 64)
    front.submit_requests(pattern(2, 10 * 64))
    assert back.take_requests_into(bytearray(3 * 64 + 10)) == 3
    assert back.take_requests_into(bytearray(10 * 64), 2) == 2
    assert back.take_requests_into(bytearray(10 * 64), 0) == 0
    assert back.unconsumed_requests() == 5
    assert len(back.take_requests(4)) == 4 * 64
    assert back.pending_responses() == 9


def test_numpy_views_of_a_batch(rings: SimpleNamespace) -> None:
    """With a dtype the batch comes back as a writable numpy array over a private copy."""
    dtype = np.dtype([("operation", "u1"), ("nr_segments", "u1"), ("handle", "<u2"),
                      ("pad", "V4"), ("id", "<u8"), ("sector_number", "<u8"),
                      ("seg", "V88")])
    assert dtype.itemsize == BLKIF
    page = bytearray(PAGE)
    front = rings.FrontRing(page, BLKIF)
    back = rings.BackRing(page, BLKIF)
    reqs = np.zeros(4, dtype)
    reqs["id"] = [10, 11, 12, 13]
    reqs["operation"] = 1
    front.submit_requests(reqs)
    got = back.take_requests(3, dtype=dtype)
    assert got.dtype == dtype and got.shape == (3,)
    assert list(got["id"]) == [10, 11, 12]
    got["id"][0] = 99  # private copy: the ring is unchanged
    assert struct.unpack_from("<Q", page, 64 + 8)[0] == 10
    into = np.zeros(4, dtype)
    assert back.take_requests_into(into) == 1
    assert into["id"][0] == 13


def test_per_entry_calls_zero_fill_short_entries(rings: SimpleNamespace) -> None:
    page = bytearray(b"\xff" * PAGE)
    front = rings.FrontRing(page, 16)
    back = rings.BackRing(page, 16)
    front.put_request(b"abc")
    front.push_requests()
    assert back.take_request() == b"abc" + bytes(13)
    assert back.take_request() is None
    with pytest.raises(LocalError):
        back.put_response(bytes(17))
    back.put_response(b"")
    with pytest.raises(LocalError):
        back.put_response(b"x")  # only one request was consumed
    back.push_responses()
    assert front.take_response() == bytes(16)
    assert front.take_response() is None


def test_more_responses_than_consumed_requests_is_a_local_error(rings: SimpleNamespace) -> None:
    page = bytearray(PAGE)
    front = rings.FrontRing(page, 8)
    back = rings.BackRing(page, 8)
    front.submit_requests(bytes(8 * 4))
    back.take_requests(2)
    with pytest.raises(LocalError) as err:
        back.put_responses(bytes(8 * 3))
    assert not isinstance(err.value, PeerError)
    assert back.put_responses(bytes(8 * 2)) == 2
    with pytest.raises(LocalError):
        back.put_responses(bytes(8), 2)  # the buffer holds only one entry


def test_poll_rearms_only_when_empty(rings: SimpleNamespace) -> None:
    page = bytearray(PAGE)
    front = rings.FrontRing(page, 8)
    back = rings.BackRing(page, 8)
    dst = bytearray(8 * 8)
    assert back.poll_requests_into(dst) == 0
    assert back.req_event == 1  # re-armed for the next request
    front.submit_requests(bytes(8 * 3))
    struct.pack_into("<I", page, 4, 50)
    assert back.poll_requests_into(dst) == 3
    assert back.req_event == 50  # work found: event untouched
    assert back.submit_responses(bytes(8 * 3)) is True
    assert front.poll_responses_into(dst) == 3
    assert front.poll_responses_into(dst) == 0
    assert front.rsp_event == 4


@pytest.mark.parametrize("pages", [1, 2, 4])
def test_rings_over_mmap_and_numpy_memory(rings: SimpleNamespace, pages: int) -> None:
    """Any writable buffer serves: an anonymous shared mapping, a numpy array, a slice."""
    with mmap.mmap(-1, pages * PAGE) as mem:
        front = rings.FrontRing(mem, BLKIF)
        back = rings.BackRing(memoryview(mem), BLKIF)
        assert front.nr_ents == 32 * pages
        front.submit_requests(pattern(4, front.nr_ents * BLKIF))
        assert back.take_requests() == pattern(4, front.nr_ents * BLKIF)
        front.release()
        back.release()
    arr = np.zeros(pages * PAGE, np.uint8)
    front = rings.FrontRing(arr, 12)
    assert arr[:16].view("<u4").tolist() == [0, 1, 0, 1]
    front.release()


def test_bad_geometry_and_released_memory_are_local_errors(rings: SimpleNamespace) -> None:
    with pytest.raises(LocalError):
        rings.FrontRing(bytearray(64 + 111), BLKIF)
    with pytest.raises(LocalError):
        rings.BackRing(bytearray(PAGE), 0)
    with pytest.raises((LocalError, TypeError, BufferError)):
        rings.FrontRing(bytes(PAGE), 8)  # read-only memory
    page = bytearray(PAGE)
    front = rings.FrontRing(page, 8)
    front.release()
    front.release()  # idempotent
    with pytest.raises(LocalError):
        front.put_requests(bytes(8))


def test_overflow_marks_the_ring_broken_for_good(rings: SimpleNamespace) -> None:
    page = bytearray(PAGE)
    front = rings.FrontRing(page, 8)
    back = rings.BackRing(page, 8)
    struct.pack_into("<I", page, 0, 257)  # N = 256
    with pytest.raises(RingOverflowError):
        back.take_requests()
    assert back.broken
    struct.pack_into("<I", page, 0, 1)  # even a sane value later does not revive it
    for call in (back.unconsumed_requests, back.final_check_for_requests,
                 back.push_responses, lambda: back.take_requests_into(bytearray(8))):
        with pytest.raises(RingOverflowError):
            call()
    assert not front.broken


def test_a_ring_in_a_reference_cycle_gives_its_memory_back(rings: SimpleNamespace) -> None:
    """Regression: collecting a cycle through a ring must release its buffer export (the
    exporter could otherwise never be resized or closed again)."""
    page = bytearray(PAGE)
    holder: list[object] = []
    holder.append(rings.BackRing(page, 8))
    holder.append(holder)  # a cycle only the garbage collector can break
    del holder
    gc.collect()
    page.append(0)  # BufferError while an export is outstanding


def test_take_and_respond_echoes_in_one_call(rings: SimpleNamespace) -> None:
    page = bytearray(PAGE)
    front = rings.FrontRing(page, 16)
    back = rings.BackRing(page, 16)
    buf = bytearray(16 * 8)
    assert back.take_and_respond(buf, buf) == (0, False)
    assert back.req_event == 1  # empty: re-armed
    front.submit_requests(pattern(7, 16 * 5))
    assert back.take_and_respond(buf, buf, 3) == (3, True)
    assert front.take_responses() == pattern(7, 16 * 5)[: 16 * 3]
    with pytest.raises(LocalError):
        back.take_and_respond(buf, bytes(16))  # two requests taken, one answer given


def test_take_and_submit_is_one_frontend_turn(rings: SimpleNamespace) -> None:
    """take_and_submit: responses first (waiting and re-arming only when nothing can be
    queued), then as many requests as fit after them, pushed with the notify check."""
    page = bytearray(PAGE)
    front = rings.FrontRing(page, 16)  # 252 slots of 16 bytes -> 128
    back = rings.BackRing(page, 16)
    n = front.nr_ents
    dst = bytearray(16 * n)
    reqs = pattern(3, 16 * n)
    # room and requests to send: no wait, no re-arm; the first push notifies (req_event 1)
    assert front.take_and_submit(dst, reqs, 5, -1, 10**12) == (0, 5, True)
    assert front.rsp_event == 1
    assert back.take_and_respond(bytearray(16 * 8), reqs[16:]) == (5, True)
    # nothing to queue (n=0): responses are waited for, found, taken
    assert front.take_and_submit(dst, reqs, 0, 3) == (3, 0, False)
    assert dst[: 16 * 3] == reqs[16 : 16 * 4]
    # responses and requests in one call; as many requests as fit
    assert front.take_and_submit(dst, reqs, -1) == (2, n, False)
    assert front.free_requests() == 0
    event = front.rsp_event
    # a full ring, nothing answered: spin (bounded), re-arm, nothing -> safe to sleep
    assert front.take_and_submit(dst, reqs, 4, -1, 1000) == (0, 0, False)
    assert front.rsp_event == front.rsp_cons + 1 != event
    # the responses taken free their slots for the requests queued in the same call
    assert back.take_and_respond(bytearray(16 * n), reqs, 6) == (6, True)
    assert front.take_and_submit(dst, reqs, 10, 4) == (4, 4, False)
    assert front.req_prod == front.req_prod_pvt  # pushed
    # the four new requests went into the slots of the responses just taken (5..8)
    assert bytes(page[64 + 16 * 5 : 64 + 16 * 9]) == reqs[: 16 * 4]
    with pytest.raises(LocalError):  # checked before anything is taken
        front.take_and_submit(dst, bytes(16), 2)
    assert front.unconsumed_responses() == 2
    struct.pack_into("<I", page, 8, front.rsp_cons + n + 1)  # the backend goes insane
    with pytest.raises(RingOverflowError):
        front.take_and_submit(dst, reqs, 1)
    assert front.broken


def test_poll_and_take_and_respond_spin_first(rings: SimpleNamespace) -> None:
    """With spin_ns, poll_*_into and take_and_respond busy-wait (bounded) before they
    re-arm; entries already there are taken at once without touching the event."""
    page = bytearray(PAGE)
    front = rings.FrontRing(page, 8)
    back = rings.BackRing(page, 8)
    dst = bytearray(8 * 8)
    struct.pack_into("<I", page, 4, 77)
    assert back.poll_requests_into(dst, -1, 1000) == 0
    assert back.req_event == 1  # re-armed after the spin
    front.submit_requests(bytes(8 * 2))
    struct.pack_into("<I", page, 4, 77)
    assert back.take_and_respond(dst, dst, -1, 10**12) == (2, True)
    assert back.req_event == 77  # found at once: no re-arm
    assert back.take_and_respond(dst, dst, -1, 1000) == (0, False)
    assert back.req_event == 3
    assert front.poll_responses_into(dst, -1, 10**12) == 2


def test_implementation_choice() -> None:
    """The compiled core is chosen when built; XENPV_PURE_PYTHON=1 forces the reference."""
    import os
    import subprocess
    import sys

    import xenpv.rings
    from xenpv.rings import implementation

    chosen = "reference" if os.environ.get("XENPV_PURE_PYTHON") == "1" else "cython"
    assert xenpv.rings.IMPLEMENTATION == chosen
    assert xenpv.rings.FrontRing is implementation(chosen).FrontRing
    with pytest.raises(LocalError):
        implementation("assembler")
    code = "import xenpv.rings as r; print(r.IMPLEMENTATION, r.BackRing.__module__)"
    env = dict(os.environ, XENPV_PURE_PYTHON="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert out == ["reference", "xenpv.rings._reference"]


def test_spin_waits_a_bounded_time_and_sees_new_entries(rings: SimpleNamespace) -> None:
    """spin() busy-waits at most max_ns (never sleeps, never re-arms) and returns the
    validated count; a take with spin_ns does the same before copying."""
    page = bytearray(PAGE)
    front = rings.FrontRing(page, 8)
    back = rings.BackRing(page, 8)
    event = back.req_event
    assert back.spin(2_000_000) == 0  # 2 ms, then time is up
    assert back.spin(0) == 0
    assert back.req_event == event  # no re-arm
    front.submit_requests(bytes(8 * 3))
    assert back.spin(10**12) == 3  # returns at once: something is there
    dst = bytearray(8 * 4)
    assert back.take_requests_into(dst, 2, spin_ns=10**12) == 2
    assert back.take_requests_into(dst, -1, 1000) == 1
    assert back.take_requests_into(dst, -1, 1000) == 0
    back.put_responses(bytes(8 * 3))
    back.push_responses()
    assert front.take_responses_into(bytearray(64), -1, 10**12) == 3
    struct.pack_into("<I", page, 0, 1000)  # the peer goes insane while we would spin
    with pytest.raises(RingOverflowError):
        back.spin(10**12)

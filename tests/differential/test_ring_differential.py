"""Differential test: the Cython ring, the reference ring and Xen's io/ring.h macros.

Hypothesis draws a ring geometry (slot size, 1/2/4 pages, a starting index that may sit near
2^31 or 2^32) and a sequence of operations on both ends, including a peer scribbling on the
shared header.  The three implementations each run on their own copy of the same memory;
after every step the page bytes, the returned values (counts, notify decisions, entries
copied out, overflow detection) and the private indexes must be identical.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rings_conftest import MASK32, PAGE, pattern

from xenpv.errors import RingOverflowError
from xenpv.rings import implementation

SLOTS = (4, 8, 12, 16, 64, 112)  # usbif conn, netif rx, netif tx, netif ctrl, 64, blkif
ALL = 1 << 20  # "as many as possible"

FRONT_OPS = ("put", "push", "push_notify", "submit", "take_rsp", "take_rsp_into", "poll_rsp",
             "unconsumed_rsp", "final_rsp", "free", "set_rsp_event", "take_submit")
BACK_OPS = ("take_req", "take_req_into", "poll_req", "unconsumed_req", "final_req", "put_rsp",
            "push_rsp", "push_rsp_notify", "submit_rsp", "set_req_event", "take_respond")

# the ordinary protocol flow is drawn more often than the rest
FLOW = ("put", "push_notify", "submit", "take_req", "poll_req", "put_rsp", "push_rsp_notify",
        "submit_rsp", "take_rsp", "poll_rsp", "final_req", "final_rsp", "take_respond",
        "take_submit")
counts = st.one_of(st.integers(0, 6), st.integers(0, 40), st.just(ALL))
u32 = st.integers(0, MASK32)
# a value near the current index ("rel", delta), near one ring size ahead ("relN", delta),
# or anywhere
values = st.one_of(
    st.integers(-3, 3).map(lambda d: ("rel", d)),
    st.integers(-1, 1).map(lambda d: ("relN", d)),
    st.sampled_from([("rel", 1 << 31), ("rel", -(1 << 31)), ("rel", MASK32)]),
    u32,
)
# a peer (or a bug) writes one of the four header words, mostly a producer index
POKE_WORDS = (0, 0, 2, 2, 1, 3)
operations = st.tuples(st.sampled_from(FLOW * 4 + FRONT_OPS + BACK_OPS + ("poke",) * 2),
                       counts, values)
starts = st.one_of(st.just(0), st.integers(MASK32 - 80, MASK32),
                   st.integers((1 << 31) - 40, (1 << 31) + 40), u32)

OVERFLOW = "overflow"


class MacroRing:
    """One end of a ring driven by the io/ring.h macros (tests/differential/xen_ring_wrappers.c)."""

    def __init__(self, mod: Any, slot: int, front: bool, page: bytearray, init: bool,
                 start: int) -> None:
        self.mod, self.slot = mod, slot
        self.cpage = mod.ffi.from_buffer(page)
        self.h = mod.lib.xr_new(slot, int(front), self.cpage, len(page), int(init), start)
        assert self.h != mod.ffi.NULL

    def close(self) -> None:
        self.mod.lib.xr_free(self.h)

    def op(self, code: int, data: bytes = b"", n: int = 0) -> int:
        buf = self.mod.ffi.new("uint8_t[]", max(len(data), n * self.slot, 1))
        buf[0 : len(data)] = data
        self._last = buf
        return int(self.mod.lib.xr_op(self.h, code, buf, n))

    def taken(self, count: int) -> bytes:
        return bytes(self.mod.ffi.buffer(self._last, count * self.slot))

    def take(self, n: int) -> Any:
        got = self.op(5, b"", n)
        return OVERFLOW if got < 0 else (got, self.taken(got))

    def poll(self, n: int) -> Any:
        got = self.take(n)
        if got == OVERFLOW or got[0] or n == 0:
            return got
        if self.op(6) < 0:  # the final check re-arms the event field
            return OVERFLOW
        return self.take(n)

    def indexes(self) -> tuple[int, int]:
        v = self.op(7)
        return (v >> 32) & MASK32, v & MASK32


def ours(call: Any) -> Any:
    """Run one call on one of our rings; an overflow becomes the OVERFLOW marker."""
    try:
        return call()
    except RingOverflowError:
        return OVERFLOW


def ours_take(ring: Any, method: str, n: int, slot: int) -> Any:
    if method.endswith("_into"):
        buf = bytearray(n * slot)
        got = ours(lambda: getattr(ring, method)(buf, n))
        return got if got == OVERFLOW else (got, bytes(buf[: got * slot]))
    data = ours(lambda: getattr(ring, method)(n))
    return data if data == OVERFLOW else (len(data) // slot, bytes(data))


def ours_take_respond(ring: Any, n: int, slot: int, responses: bytes) -> Any:
    buf = bytearray(n * slot)
    # a short spin sometimes: nothing changes meanwhile, so the answers must not either
    got = ours(lambda: ring.take_and_respond(buf, responses, n, 2000 * (n & 1)))
    return got if got == OVERFLOW else (got[0], bytes(buf[: got[0] * slot]), got[1])


def ours_take_submit(ring: Any, n: int, max_n: int, slot: int, requests: bytes) -> Any:
    buf = bytearray(max_n * slot)
    got = ours(lambda: ring.take_and_submit(buf, requests, n, max_n, 2000 * (n & 1)))
    return got if got == OVERFLOW else (got[0], bytes(buf[: got[0] * slot]), *got[1:])


def run_op(step: int, op: tuple[Any, ...], model: dict[str, Any]) -> list[Any]:
    """Apply one operation to every implementation; return their observations."""
    name, k, value = op
    slot = model["slot"]
    impls = model["impls"]
    ref_front, ref_back = impls[0][1], impls[0][2]
    targets = {"poke": POKE_WORDS[k % 6], "set_rsp_event": 2, "set_req_event": 0}
    if isinstance(value, tuple) and name in targets:  # relative to the index it meets
        word = targets[name]
        kind, delta = value
        if kind.endswith("N"):
            delta += ref_front.nr_ents
        if kind.startswith("cons"):
            base = ref_back.req_cons if word < 2 else ref_front.rsp_cons
        else:
            base = int(memoryview(impls[0][0]).cast("I")[word])
        value = (base + delta) & MASK32
    if name == "poke":
        word = POKE_WORDS[k % 6]
        for page, _f, _b in impls:
            memoryview(page).cast("I")[word] = value
        memoryview(model["cpage"]).cast("I")[word] = value
        return []
    side = "front" if name in FRONT_OPS else "back"
    if model["broken"][side]:
        # a broken ring keeps raising the same peer error, whatever is asked of it
        for _page, f, b in impls:
            with pytest.raises(RingOverflowError):
                if side == "front":
                    f.free_requests()
                else:
                    b.unconsumed_requests()
        return []
    c = model["cfront"] if side == "front" else model["cback"]
    # clamp counts to what a correct caller may ask (the reference decides, all agree)
    if name in ("put", "submit"):
        free = ref_front.free_requests()
        k = min(k, free + 2) if name == "put" else min(k, free)
    elif name in ("put_rsp", "submit_rsp"):
        k = min(k, ref_back.pending_responses())
    elif name == "take_respond":
        k = min(k, ref_back.nr_ents)
    elif name == "take_submit":  # k requests offered (more than fit, at times), k taken
        k = min(k, ref_front.nr_ents + 2)
    else:
        k = min(k, 4 * 4096)
    data = pattern(step, k * slot) if name in ("put", "submit", "put_rsp", "submit_rsp",
                                               "take_respond", "take_submit") else b""
    results = []
    for _page, f, b in impls:
        results.append({
            "put": lambda f=f: ours(lambda: f.put_requests(data, k)),
            "push": lambda f=f: ours(f.push_requests),
            "push_notify": lambda f=f: ours(f.push_requests_and_check_notify),
            "submit": lambda f=f: ours(lambda: f.submit_requests(data, k)),
            "take_rsp": lambda f=f: ours_take(f, "take_responses", k, slot),
            "take_rsp_into": lambda f=f: ours_take(f, "take_responses_into", k, slot),
            "poll_rsp": lambda f=f: ours_take(f, "poll_responses_into", k, slot),
            "unconsumed_rsp": lambda f=f: ours(f.unconsumed_responses),
            "final_rsp": lambda f=f: ours(f.final_check_for_responses),
            "free": lambda f=f: ours(f.free_requests),
            "set_rsp_event": lambda f=f: ours(lambda: f.set_rsp_event(value)),
            "take_req": lambda b=b: ours_take(b, "take_requests", k, slot),
            "take_req_into": lambda b=b: ours_take(b, "take_requests_into", k, slot),
            "poll_req": lambda b=b: ours_take(b, "poll_requests_into", k, slot),
            "unconsumed_req": lambda b=b: ours(b.unconsumed_requests),
            "final_req": lambda b=b: ours(b.final_check_for_requests),
            "put_rsp": lambda b=b: ours(lambda: b.put_responses(data, k)),
            "push_rsp": lambda b=b: ours(b.push_responses),
            "push_rsp_notify": lambda b=b: ours(b.push_responses_and_check_notify),
            "submit_rsp": lambda b=b: ours(lambda: b.submit_responses(data, k)),
            "set_req_event": lambda b=b: ours(lambda: b.set_req_event(value)),
            "take_respond": lambda b=b: ours_take_respond(b, k, slot, data),
            "take_submit": lambda f=f: ours_take_submit(f, k, k, slot, data),
        }[name]())
    # the same operation through Xen's macros
    if name in ("put", "put_rsp"):
        cres: Any = c.op(1, data, k)
    elif name in ("push", "push_rsp"):
        cres = None
        c.op(2)
    elif name in ("push_notify", "push_rsp_notify"):
        cres = bool(c.op(3))
    elif name in ("submit", "submit_rsp"):
        c.op(1, data, k)
        cres = bool(c.op(3))
    elif name in ("take_rsp", "take_rsp_into", "take_req", "take_req_into"):
        cres = c.take(k)
    elif name in ("poll_rsp", "poll_req"):
        cres = c.poll(k)
    elif name == "take_respond":  # poll, then answer what was taken, then push
        cres = c.poll(k)
        if cres != OVERFLOW:
            notify = bool(c.op(1, data, cres[0]) and c.op(3)) if cres[0] else False
            cres = (cres[0], cres[1], notify)
    elif name == "take_submit":  # poll when nothing can be queued (else take), then submit
        cres = c.poll(k) if k == 0 or c.op(0) == 0 else c.take(k)
        if cres != OVERFLOW:
            queued = min(k, c.op(0))
            notify = bool(c.op(1, data, queued) and c.op(3)) if queued else False
            cres = (cres[0], cres[1], queued, notify)
    elif name in ("unconsumed_rsp", "unconsumed_req"):
        v = c.op(4)
        cres = OVERFLOW if v < 0 else v
    elif name in ("final_rsp", "final_req"):
        v = c.op(6)
        cres = OVERFLOW if v < 0 else bool(v)
    elif name == "free":
        cres = c.op(0)
    else:  # set_*_event: a plain store of the event word
        word = 3 if name == "set_rsp_event" else 1
        memoryview(model["cpage"]).cast("I")[word] = value
        cres = None
    results.append(cres)
    if cres == OVERFLOW:
        model["broken"][side] = True
    return results


def check_state(model: dict[str, Any], context: str) -> None:
    pages = [bytes(p) for p, _f, _b in model["impls"]] + [bytes(model["cpage"])]
    assert all(p == pages[-1] for p in pages), f"page bytes differ after {context}"
    cf, cb = model["cfront"].indexes(), model["cback"].indexes()
    for _page, f, b in model["impls"]:
        assert (f.req_prod_pvt, f.rsp_cons) == cf, f"front indexes differ after {context}"
        assert (b.req_cons, b.rsp_prod_pvt) == cb, f"back indexes differ after {context}"


flow_operations = st.tuples(st.sampled_from(FLOW), counts, values)
# ("cons", d): d from the consumer's private index of that producer word (req_cons for
# req_prod, rsp_cons for rsp_prod), right where the overflow checks draw their lines
peer_writes = st.tuples(st.just("poke"), st.integers(0, 5),
                        st.one_of(st.integers(-2, 2).map(lambda d: ("cons", d)),
                                  st.integers(-1, 1).map(lambda d: ("consN", d)),
                                  st.integers(-3, 3).map(lambda d: ("rel", d)), values))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slot=st.sampled_from(SLOTS), pages=st.sampled_from((1, 2, 4)), start=starts,
       init=st.booleans(), seed=st.integers(0, 255),
       ops=st.lists(operations, min_size=10, max_size=60))
def test_rings_match_xen_macros(xen_ring_macros: Any, slot: int, pages: int, start: int,
                                init: bool, seed: int, ops: list[tuple[Any, ...]]) -> None:
    """Cython, reference and io/ring.h agree on every byte and every answer."""
    check_against_macros(xen_ring_macros, slot, pages, start, init, seed, ops)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slot=st.sampled_from(SLOTS), start=starts, seed=st.integers(0, 255),
       before=st.lists(flow_operations, min_size=2, max_size=25),
       drain=st.sampled_from([[], [("take_req", ALL, 0)], [("take_rsp", ALL, 0)],
                              [("put", 3, 0), ("push", 0, 0), ("take_req", 2, 0)]]),
       poke=peer_writes,
       after=st.lists(operations, min_size=1, max_size=10))
def test_rings_match_xen_macros_after_peer_write(
        xen_ring_macros: Any, slot: int, start: int, seed: int, before: list[tuple[Any, ...]],
        drain: list[tuple[Any, ...]], poke: tuple[Any, ...],
        after: list[tuple[Any, ...]]) -> None:
    """A live ring, then one index written by the peer (often just behind, at, or just past
    a ring's worth of the current value): overflow detection and all else still agree."""
    ops = [*before, *drain, poke, *after]
    check_against_macros(xen_ring_macros, slot, 1, start, True, seed, ops)


def check_against_macros(xen_ring_macros: Any, slot: int, pages: int, start: int, init: bool,
                         seed: int, ops: list[tuple[Any, ...]]) -> None:
    """Run ``ops`` on the three implementations and compare after every step."""
    nbytes = pages * PAGE
    filler = pattern(seed, nbytes)
    if not init:  # attaching to a live ring: a sane header at ``start``
        header = bytearray(filler)
        words = memoryview(header).cast("I")
        words[0] = words[2] = start
        words[1] = words[3] = (start + 1) & MASK32
        filler = bytes(header)
    impls = []
    for name in ("reference", "cython"):
        rings = implementation(name)
        page = bytearray(filler)
        front = rings.FrontRing(page, slot, start, init=init)
        back = rings.BackRing(page, slot, start)
        impls.append((page, front, back))
    cpage = bytearray(filler)
    model: dict[str, Any] = {
        "slot": slot, "impls": impls, "cpage": cpage, "broken": {"front": False, "back": False},
        "cfront": MacroRing(xen_ring_macros, slot, True, cpage, init, start),
        "cback": MacroRing(xen_ring_macros, slot, False, cpage, init, start),
    }
    try:
        assert impls[0][1].nr_ents == impls[1][1].nr_ents == model["cfront"].op(8)
        check_state(model, "init")
        for step, op in enumerate(ops):
            results = run_op(step, op, model)
            assert all(r == results[-1] for r in results), f"step {step} {op}: {results}"
            check_state(model, f"step {step} {op}")
    finally:
        model["cfront"].close()
        model["cback"].close()
        for _page, f, b in impls:
            f.release()
            b.release()


@pytest.mark.parametrize("pages,slot,expected", [
    (1, 112, 32), (2, 112, 64), (4, 112, 128), (1, 12, 256), (1, 8, 256), (1, 16, 128),
    (1, 4, 512), (4, 64, 128), (1, 64, 32), (2, 4, 1024),
])
def test_ring_size_matches_macros(xen_ring_macros: Any, pages: int, slot: int,
                                  expected: int) -> None:
    """__RING_SIZE from the macros, ours and the table of xen-protocols.md §0.2 agree."""
    page = bytearray(pages * PAGE)
    c = MacroRing(xen_ring_macros, slot, True, page, True, 0)
    try:
        assert c.op(8) == expected
    finally:
        c.close()
    for name in ("reference", "cython"):
        assert implementation(name).ring_size(pages * PAGE, slot) == expected

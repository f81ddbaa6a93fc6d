"""Differential test of the embedded xenstored's two ring service passes.

A ring connection serves each event through the compiled pass (``cython/xsring.pyx``,
``RingPass``) in its common case and through the Python pass
(``RingConnection._service_general``) otherwise; with the compiled pass switched off,
every event takes the Python pass.  Hypothesis generates request streams of dom1 (reads,
writes, mkdir, rm, directory listings, permissions, watches, unknown transaction ids and
types, bad paths, payloads up to 4096 bytes) cut into chunks at arbitrary points (so a
request may span chunks, and a chunk may hold several whole requests), optionally ending
with a header whose length is over 4096; and whether the write rate limit applies.  The
same stream is played against two emulators, one serving rings with the compiled pass and
one with the Python pass only (the compiled one polling ``req`` after answering, as
``spin_us`` makes it): each chunk is written into ``req`` whole and signalled, and
the next one waits until the server has taken it, so both servers see the same chunk
boundaries.  The reply bytes (watch events included), the ``error`` word and the
connections' fault counts must be identical.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from xenpv.platforms.loopback.emulator import InProcessEmulator
from xenpv.xenstore import ringserver
from xenpv.xenstore.page import (
    ERROR_NONE,
    RING_SIZE,
    XS_CONNECTED,
    XS_RECONNECT,
    XsRingPage,
)
from xenpv.xenstore.wire import HEADER, XsType

TIMEOUT = 20.0
SENTINEL_ID = 0xFFFF0001
PATHS = [b"data/a", b"data/a/b", b"data/c", b"/local/domain/1/data/d", b"domid", b"bad//path",
         b"/local/domain/0/x", b"@releaseDomain"]
TYPES = [XsType.READ, XsType.WRITE, XsType.MKDIR, XsType.RM, XsType.DIRECTORY,
         XsType.GET_PERMS, XsType.WATCH, XsType.UNWATCH, XsType.SET_PERMS, 99]


def _compiled_class() -> Any:
    # The compiled pass must exist: a missing build is a failure, not a skip.
    from xenpv.xenstore._xsring import RingPass  # type: ignore[import-not-found]

    return RingPass


class Guest:
    """Dom1's raw view of its xenstore page, on one emulator."""

    def __init__(self, emu: InProcessEmulator) -> None:
        self.emu = emu
        self.platform = emu.platform(1)
        self.ring = self.platform.xenstore_ring()
        self.events = self.platform.events
        self.page = XsRingPage(self.ring.mem, server=False)

    def _wait(self, cond: Any, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not cond():
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {what}"
            got = self.events.pending(min(left, 0.05))
            if got is not None:
                self.events.unmask(got)

    def reconnect(self) -> None:
        self.page.connection = XS_RECONNECT
        self.events.notify(self.ring.port)
        self._wait(lambda: self.page.connection == XS_CONNECTED, "the reconnection")
        self.page.release()
        self.page = XsRingPage(self.ring.mem, server=False)

    def play(self, chunks: list[bytes], final_error: bool) -> tuple[bytes, int, int]:
        """Feed ``chunks`` one at a time; the replies, ``error`` and the fault count."""
        self.reconnect()
        rx = bytearray()
        for chunk in chunks:
            assert self.page.write(chunk) == len(chunk)
            self.events.notify(self.ring.port)

            def taken() -> bool:
                rx.extend(self.page.read())
                self.events.notify(self.ring.port)  # room in rsp for what waits
                return self.page.readable() == 0 and self._req_empty()

            self._wait(taken, "the server to take a chunk")
        sentinel = HEADER.pack(XsType.READ, SENTINEL_ID, 0, 6) + b"domid\0"
        if not final_error:
            assert self.page.write(sentinel) == len(sentinel)
            self.events.notify(self.ring.port)
        marker = HEADER.pack(XsType.READ, SENTINEL_ID, 0, 1) + b"1"

        def done() -> bool:
            rx.extend(self.page.read())
            self.events.notify(self.ring.port)
            if final_error:
                return self.page.error != ERROR_NONE
            return rx.endswith(marker)

        self._wait(done, "the last reply")
        conn = self.emu.xenstored.rings.rings[1]
        return bytes(rx), self.page.error, conn.stats["faults"]

    def _req_empty(self) -> bool:
        from xenpv.xenstore.page import REQ_CONS_OFFSET, REQ_PROD_OFFSET

        mem = self.ring.mem
        return bytes(mem[REQ_CONS_OFFSET:REQ_CONS_OFFSET + 4]) == bytes(
            mem[REQ_PROD_OFFSET:REQ_PROD_OFFSET + 4])

    def close(self) -> None:
        self.reconnect()
        self.page.release()
        self.ring.release()
        self.platform.close()


def _emulator(pass_class: Any) -> InProcessEmulator:
    saved = ringserver._RingPass
    ringserver._RingPass = pass_class  # read when the ring connection is made
    try:
        return InProcessEmulator([1])
    finally:
        ringserver._RingPass = saved


@pytest.fixture(scope="module")
def guests() -> Iterator[tuple[Guest, Guest]]:
    compiled = _emulator(_compiled_class())
    compiled.xenstored.spin = 50e-6  # its passes also poll for the next chunk
    python = _emulator(None)
    try:
        assert compiled.xenstored.rings.rings[1]._fast is not None
        assert python.xenstored.rings.rings[1]._fast is None
        a, b = Guest(compiled), Guest(python)
        yield a, b
        a.close()
        b.close()
    finally:
        compiled.close()
        python.close()


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    type_ = draw(st.sampled_from(TYPES))
    path = draw(st.sampled_from(PATHS))
    if type_ == XsType.WRITE:
        payload = path + b"\0" + draw(st.binary(max_size=draw(st.sampled_from([8, 300]))))
    elif type_ in (XsType.WATCH, XsType.UNWATCH):
        payload = path + b"\0" + draw(st.sampled_from([b"t1", b"t2"])) + b"\0"
    elif type_ == XsType.SET_PERMS:
        payload = path + b"\0" + draw(st.sampled_from([b"n0", b"b1", b"r1\0n2", b"x"])) + b"\0"
    else:
        payload = path + b"\0"
    req_id = draw(st.integers(0, 0xFFFF))
    tx_id = draw(st.sampled_from([0, 0, 0, 7]))
    return HEADER.pack(type_, req_id, tx_id, len(payload)) + payload


@st.composite
def scenario(draw: st.DrawFn) -> tuple[list[bytes], bool, bool]:
    stream = b"".join(draw(st.lists(requests(), min_size=1, max_size=12)))
    final_error = draw(st.booleans()) and draw(st.booleans())
    if final_error:
        stream += HEADER.pack(XsType.WRITE, 1, 0, draw(st.sampled_from([4097, 0xFFFFFFFF])))
    chunks, pos = [], 0
    while pos < len(stream):
        n = draw(st.integers(1, RING_SIZE))
        chunks.append(stream[pos:pos + n])
        pos += n
    return chunks, final_error, draw(st.booleans())


def _msg(type_: int, payload: bytes, req_id: int = 1, tx_id: int = 0) -> bytes:
    return HEADER.pack(type_, req_id, tx_id, len(payload)) + payload


#: READs the compiled pass answers itself (a path already validated, a readable node)
#: next to the same READs once the node's permissions, then the node itself, changed:
#: each request in its own chunk, then all in one batch.
_CACHED_READS = [
    _msg(XsType.WRITE, b"data/a\0v1"),
    _msg(XsType.READ, b"data/a\0", 2),
    _msg(XsType.READ, b"data/a\0", 3),
    _msg(XsType.READ, b"data/a\0", 4, 7),
    _msg(XsType.READ, b"domid\0", 5),
    _msg(XsType.READ, b"domid\0", 6),
    _msg(XsType.SET_PERMS, b"data/a\0n0\0", 7),
    _msg(XsType.READ, b"data/a\0", 8),
    _msg(XsType.READ, b"/local/domain/0/x\0", 9),
    _msg(XsType.READ, b"/local/domain/0/x\0", 10),
    _msg(XsType.RM, b"data/c\0", 11),
    _msg(XsType.WRITE, b"data/c\0" + b"x" * 900, 12),
    _msg(XsType.READ, b"data/c\0", 13),
    _msg(XsType.READ, b"data/c\0", 14),
    _msg(XsType.RM, b"data/c\0", 15),
    _msg(XsType.READ, b"data/c\0", 16),
    _msg(XsType.READ, b"data/a", 17),
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.data_too_large])
@example(case=(_CACHED_READS, False, False))
@example(case=([b"".join(_CACHED_READS[:10])], False, True))
@given(case=scenario())
def test_compiled_and_python_ring_passes_answer_alike(
    guests: tuple[Guest, Guest], case: tuple[list[bytes], bool, bool]
) -> None:
    chunks, final_error, limited = case
    results = []
    for guest in guests:
        quotas = guest.emu.xenstored.store.quotas
        # the limit applies (never waits: a huge burst) or not at all
        quotas.write_rate, quotas.write_burst = (1e9, 1e9) if limited else (0.0, 10.0)
        results.append(guest.play(chunks, final_error))
    assert results[0] == results[1]


def test_compiled_pass_answers_cached_reads_itself(guests: tuple[Guest, Guest]) -> None:
    """The READs of a validated path to a readable node never reach ``Store.handle`` in
    the compiled pass (it answers them itself), and still answer as the Python pass."""
    results, calls = [], []
    for guest in guests:
        store = guest.emu.xenstored.store
        quotas = store.quotas
        quotas.write_rate, quotas.write_burst = (0.0, 10.0)
        seen: list[int] = []
        handle = store.handle

        def counting(conn: Any, type_: int, *args: Any, _h: Any = handle,
                     _seen: list[int] = seen) -> bytes:
            _seen.append(type_)
            return _h(conn, type_, *args)

        store.handle = counting  # type: ignore[method-assign]
        try:
            results.append(guest.play(_CACHED_READS, False))
        finally:
            del store.handle
        calls.append(seen.count(XsType.READ))
    assert results[0] == results[1]
    # replies: v1 twice, ENOENT (tx 7), domid twice, OK, EACCES, ...
    assert b"v1" in results[0][0] and b"EACCES" in results[0][0]
    # data/a x2, domid x2, data/c x2 and the sentinel's: at least 5 answered in C
    assert calls[1] - calls[0] >= 5, calls

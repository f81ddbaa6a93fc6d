"""The compiled netif RX batch scan (cython/netrx.pyx) against its readable twin
(``netif.scan_rx_reference``), on arbitrary and hostile responses."""

from __future__ import annotations

import struct
from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.compiled import pure_python
from xenpv.protocols import netif
from xenpv.protocols.netif import (
    NETRXF_csum_blank,
    NETRXF_extra_info,
    NETRXF_more_data,
    scan_rx_reference,
)

PAGES = 6
_PATTERN = bytes((i * 7 + i // 4096) % 251 for i in range(PAGES * 4096))
_RSP = struct.Struct("<HHHh")


@st.composite
def _slot(draw: st.DrawFn, rid: int) -> bytes:
    """One RX slot: mostly a plausible data response for page ``rid`` or an extra-info
    record, with every field drawn from its edge values; sometimes random bytes."""
    kind = draw(st.integers(0, 29))
    if kind == 0:
        return draw(st.binary(min_size=8, max_size=8))
    if kind <= 8:  # an extra-info record: GSO, hash, multicast or a bad one
        typ = draw(st.sampled_from([1] * 6 + [4] * 4 + [2, 3, 0, 5, 255]))
        flags = draw(st.sampled_from([0] * 6 + [1] * 4 + [2, 0x81]))
        if typ == 1:
            body = struct.pack("<HBBH", draw(st.sampled_from([1448] * 6 + [1, 0, 0xFFFF])),
                               draw(st.sampled_from([1] * 4 + [2] * 4 + [0, 3])), 0, 0)
        else:
            body = bytes([draw(st.sampled_from([0, 1, 3, 4, 200])), 1]) + \
                struct.pack("<I", draw(st.integers(0, 0xFFFFFFFF)))
        return bytes([typ, flags]) + body
    rid = draw(st.sampled_from([rid] * 30 + [rid ^ 1, 0xFFFF]))
    offset = draw(st.sampled_from([0] * 20 + [10, 4000, 4096, 0xFFFF]))
    status = draw(st.sampled_from([66] * 8 + [4096] * 8 + [100, 0, 1, -1, -2, -3, 4097,
                                                           0x7FFF, -0x8000]))
    flags = draw(st.sampled_from([0] * 4 + [NETRXF_more_data] * 4 + [NETRXF_csum_blank] * 2 +
                                 [NETRXF_extra_info, NETRXF_extra_info | NETRXF_more_data,
                                  0xFFFF]))
    return _RSP.pack(rid, offset, flags, status)


@st.composite
def _chain(draw: st.DrawFn) -> list[tuple[bool, bytes]]:
    """A well-formed chain as (is data, slot) pairs, ids filled in later: 1-4 data
    slots (sometimes one with an error status), the first often with a GSO and/or hash
    record after it."""
    extras = []
    if draw(st.booleans()):
        extras.append(struct.pack("<BBHBBH", 1, 0, 1448, draw(st.sampled_from([1, 2])), 0, 0))
    if draw(st.integers(0, 3)) == 0:
        extras.append(struct.pack("<BBBBI", 4, 0, draw(st.integers(0, 5)), 1,
                                  draw(st.integers(0, 0xFFFFFFFF))))
    extras = [bytes([e[0], 1 if k < len(extras) - 1 else 0]) + e[2:]
              for k, e in enumerate(extras)]
    n = draw(st.integers(1, 4))
    out: list[tuple[bool, bytes]] = []
    for k in range(n):
        flags = (NETRXF_more_data if k < n - 1 else 0) | \
            (NETRXF_extra_info if k == 0 and extras else 0) | \
            (draw(st.sampled_from([0, NETRXF_csum_blank])) if k == 0 else 0)
        size = 4096 if k < n - 1 else draw(st.sampled_from([66, 1, 0, 4096, 3000]))
        if draw(st.integers(0, 7)) == 0:  # a legal error status: the frame is dropped
            size = draw(st.sampled_from([-1, -2]))
        offset = draw(st.sampled_from([0, 0, 96])) if size <= 3000 else 0
        out.append((True, struct.pack("<HHh", offset, flags, size)))
        if k == 0:
            out += [(False, e) for e in extras]
    return out


@st.composite
def _batches(draw: st.DrawFn) -> tuple[bytes, int, list[int], bytes]:
    """Responses for posted pages: well-formed chains, a few slots replaced by arbitrary
    or hostile ones, cut anywhere; sometimes fewer posted pages than responses."""
    plan = [s for c in draw(st.lists(_chain(), max_size=10)) for s in c]
    count = draw(st.integers(0, len(plan) + 2))
    posted = [draw(st.integers(0, PAGES - 1)) for _ in range(count)]
    if draw(st.integers(0, 4)) == 0:
        posted = posted[:draw(st.integers(0, count))]
    slots = []
    for k in range(count):
        rid = posted[k] if k < len(posted) else k
        if k >= len(plan) or draw(st.integers(0, 15)) == 0:
            slots.append(draw(_slot(rid)))
        else:
            data, body = plan[k]
            slots.append(struct.pack("<H", rid) + body if data else body)
    shift = draw(st.integers(0, 255))  # the pages' bytes: a pattern that tells offsets apart
    mem = _PATTERN.translate(bytes((b + shift) & 0xFF for b in range(256)))
    return b"".join(slots) + draw(st.binary(max_size=8)), count, posted, mem


def _outcome(fn: object, *args: object) -> object:
    try:
        return fn(*args)  # type: ignore[operator]
    except ValueError as exc:
        return ("ValueError", str(exc))


@settings(max_examples=300, deadline=None)
@given(_batches(), st.sampled_from([bytes, bytearray, memoryview]),
       st.sampled_from([list, deque]))
def test_compiled_rx_scan_matches_its_twin(case: tuple[bytes, int, list[int], bytes],
                                           kind: type, seq: type) -> None:
    """For any responses, posted pages and page contents the compiled scan gives the
    twin's frames (bytes, flags, GSO, hash), slots used and error text, from any buffer
    kind and with the posted ids in a list or a deque (the frontend's)."""
    from xenpv.protocols import _netrx  # built by setup.py: missing is a failure

    slots, count, posted, mem = case
    twin = _outcome(scan_rx_reference, slots, count, posted, mem)
    assert _outcome(_netrx.scan_rx, kind(slots), count, seq(posted), memoryview(mem)) == twin
    assert _outcome(_netrx.scan_rx, slots, count + 2, posted, mem) == \
        _outcome(scan_rx_reference, slots, count + 2, posted, mem)


def test_rx_scan_of_known_chains() -> None:
    """A one-slot frame, a GSO chain with its extra and a hashed frame come out whole; a
    chain cut at the batch end is left for the next batch; a page id outside the pages is
    the caller's mistake; the frontend uses the compiled scan unless told otherwise."""
    mem = bytearray(PAGES * 4096)
    for p in range(PAGES):
        mem[p * 4096:(p + 1) * 4096] = bytes([p + 1]) * 4096
    gso = struct.pack("<BBHBBH", 1, 0, 1448, 1, 0, 0)
    rss = struct.pack("<BBBBI", 4, 0, 1, 1, 0xABCD1234)
    slots = _RSP.pack(0, 0, NETRXF_csum_blank, 66) + \
        _RSP.pack(1, 0, NETRXF_extra_info | NETRXF_more_data, 4096) + gso + \
        _RSP.pack(2, 10, 0, 100) + \
        _RSP.pack(3, 0, NETRXF_extra_info, 60) + rss + \
        _RSP.pack(4, 0, NETRXF_more_data, 4096)
    posted = [0, 1, 1, 2, 3, 3, 4]
    for scan in (scan_rx_reference, netif.scan_rx):
        frames, used, error = scan(slots, 7, posted, mem)
        assert error is None and used == 6  # the last chain continues
        assert frames == [(b"\x01" * 66, NETRXF_csum_blank, 0, 0, None, 0),
                          (b"\x02" * 4096 + b"\x03" * 100,
                           NETRXF_extra_info | NETRXF_more_data, 1, 1448, None, 0),
                          (b"\x04" * 60, NETRXF_extra_info, 0, 0, 0xABCD1234, 2)]
        try:
            scan(_RSP.pack(9, 0, 0, 60), 1, [9], mem)
        except ValueError as exc:
            assert "outside the pages" in str(exc)
        else:
            raise AssertionError("a page outside the pages was read")
    assert (netif._SCAN_RX is None) == pure_python()

"""The net frontend's TX table: the compiled one (``cython/netfronttx.pyx``) and its readable
twin (``xenpv.frontends.nettx``) driven through the same arbitrary operations (frames of
every size filled or read from a TAP-like fd straight into the pages, GSO records,
staging pushed, and the backend's answers: in any order, NULL, unknown statuses,
unknown ids, duplicates, watched pages) give the same slots, page contents, free pages
and verdicts; the slots are also checked against an independent layout, and the
pure-Python switch picks the twin."""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.frontends import nettx

PAGE = 4096
REQ = struct.Struct("<IHHHH")


def compiled() -> Any:
    from xenpv.frontends import _nettx  # built by setup.py: missing is a failure

    return _nettx


def expected_slots(refs: list[int], idxs: list[int], size: int, flags: int,
                   gso: bytes | None) -> bytes:
    """A frame's slots laid out from netif's rules, independently of the table."""
    out = b""
    pages = len(idxs)
    first = flags | (8 if gso is not None else 0) | (4 if pages > 1 else 0)
    out += REQ.pack(refs[idxs[0]], 0, first, idxs[0], size)
    if gso is not None:
        out += gso.ljust(12, b"\0")
    for k in range(1, pages):
        last = k == pages - 1
        out += REQ.pack(refs[idxs[k]], 0, 0 if last else 4, idxs[k],
                        size - k * PAGE if last else PAGE)
    return out


def outcome(f: Any, *args: Any) -> Any:
    try:
        return ("ok", f(*args))
    except ValueError as exc:
        return ("ValueError", str(exc))


ops = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 1 << 16), st.binary(max_size=8)),
               max_size=40)


def drive(mod: Any, npages: int, slots: int, script: list[tuple[int, int, bytes]]
          ) -> list[Any]:
    """``script`` on ``mod``'s table; everything observable, in order."""
    mem = bytearray(npages * PAGE)
    refs = [1000 + 3 * k for k in range(npages)]
    table = mod.TxTable(mem, refs, slots)
    trace: list[Any] = []
    sent: list[int] = []  # ids in flight, as the test sees them
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    try:
        for op, n, extra in script:
            if op in (0, 1):  # fill or read a frame
                size = [1, 60, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE, 0xFFFF, 0, 0x10000][n % 9]
                size = size if n % 5 else n % 0x10001
                data = bytes((i * 31 + n) & 0xFF for i in range(size))
                gso = (bytes([2, 0]) + extra).ljust(12, b"\0")[:12] if n & 1 else None
                flags = (n >> 1) & 3
                free_before = list(table.free)
                if op == 0:
                    got = outcome(table.fill, data, flags, gso)
                else:
                    b.send(extra.ljust(10, b"\0")[:10] + data)
                    read = outcome(table.read_frame, a.fileno())
                    trace.append(("read", read, bytes(table.hdr)))
                    if read[0] != "ok" or read[1] < 0:
                        while True:  # not read: drop it
                            try:
                                a.recv(0x20000)
                            except BlockingIOError:
                                break
                        continue
                    size = read[1] - 10
                    if 0 < size:
                        assert bytes(table.head(size)) == data[:min(size, PAGE)]
                        assert table.frame(size) == data[:size]
                    got = outcome(table.commit, size, flags, gso)
                trace.append(("frame", op, size, got, table.staged))
                if got[0] == "ok":
                    pages = -(-size // PAGE)
                    idxs = free_before[::-1][:pages]
                    assert got[1] == pages + (gso is not None)
                    at = (table.staged - got[1]) * 12
                    assert bytes(table.out[at:table.staged * 12]) == \
                        expected_slots(refs, idxs, size, flags, gso)
                    for k, idx in enumerate(idxs):
                        piece = data[:size][k * PAGE:(k + 1) * PAGE]
                        assert mem[idx * PAGE:idx * PAGE + len(piece)] == piece
                    sent += idxs
                else:
                    assert table.free == free_before
            elif op == 2:
                trace.append(("push", table.staged, bytes(table.out[:table.staged * 12])))
                table.pushed()
            elif op == 3:  # answers: some for ids in flight, some hostile
                rsps = b""
                for k, byte in enumerate(extra or b"\0"):
                    kind = byte % 8
                    if kind < 4 and sent:
                        rid = sent.pop((byte * 7 + k) % len(sent))
                        status = [0, -1, -2, 0][kind]
                    elif kind == 4:
                        rid, status = byte, 1  # NULL: an extra-info slot's answer
                    elif kind == 5:
                        rid, status = n & 0xFFFF, 0  # any id
                    elif kind == 6:
                        rid, status = byte % npages, (n % 7) - 3  # any status
                    else:
                        rid, status = (sent[0] if sent else 0), 0  # maybe a duplicate
                    rsps += struct.pack("<Hh", rid, status) + bytes(8)
                res = outcome(table.reap, rsps, len(rsps) // 12)
                trace.append(("reap", res))
                sent = sorted(table.out_ids)
            elif op == 4:
                trace.append(("take", outcome(table.take)))
                sent = sorted(table.out_ids)
            elif op == 5:
                table.watch(n % (npages + 2))
            else:
                trace.append(("reap-short", outcome(table.reap, bytes(12), 2)))
            trace.append(("state", list(table.free), sorted(table.out_ids),
                          table.free_pages(), table.outstanding(), table.room()))
        trace.append(("mem", bytes(mem)))
    finally:
        a.close()
        b.close()
    return trace


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 64), ops)
def test_compiled_tx_table_matches_its_twin(npages: int, slots: int,
                                            script: list[tuple[int, int, bytes]]) -> None:
    assert drive(compiled(), npages, slots, script) == drive(nettx, npages, slots, script)


def test_tap_read_needs_the_largest_frame_s_pages_and_reports_an_empty_fd() -> None:
    for mod in (compiled(), nettx):
        r, w = os.pipe()
        os.set_blocking(r, False)
        try:
            table = mod.TxTable(bytearray(20 * PAGE), list(range(20)), 40)
            assert table.read_frame(r) == -1  # nothing ready
            table.fill(bytes(5 * PAGE), 0, None)
            with pytest.raises(ValueError, match="largest frame"):
                table.read_frame(r)
        finally:
            os.close(r)
            os.close(w)
        with pytest.raises(OSError):  # closed: the read fails
            mod.TxTable(bytearray(20 * PAGE), list(range(20)), 40).read_frame(r)


def test_pure_python_switch_picks_the_twin(monkeypatch: Any) -> None:
    from xenpv.frontends import net

    monkeypatch.delenv("XENPV_PURE_PYTHON", raising=False)
    assert net._tx_table_class() is compiled().TxTable
    monkeypatch.setenv("XENPV_PURE_PYTHON", "1")
    assert net._tx_table_class() is nettx.TxTable

"""Byte atomics, the full fence and single 32-bit index accesses (vchan notify bytes)."""

from __future__ import annotations

import mmap
import os
import threading
from types import SimpleNamespace

import pytest
from rings_conftest import rings_fixture  # noqa: F401

from xenpv.errors import LocalError
from xenpv.rings import implementation


def test_or_and_fetch_and_clear_return_the_old_byte(rings: SimpleNamespace) -> None:
    buf = bytearray(32)
    assert rings.atomic_or8(buf, 22, 0x1) == 0
    assert rings.atomic_or8(buf, 22, 0x2) == 0x1
    assert buf[22] == 0x3
    assert rings.atomic_fetch_and_clear8(buf, 22, 0x1) == 0x3
    assert rings.atomic_fetch_and_clear8(buf, 22, 0x1) == 0x2
    assert buf[22] == 0x2 and buf[21] == 0 and buf[23] == 0
    rings.full_barrier()


def test_index_loads_and_stores_are_whole_words(rings: SimpleNamespace) -> None:
    buf = bytearray(16)
    rings.store_u32(buf, 8, 0x1_2345_6789)  # taken mod 2^32
    assert buf[8:12] == bytes.fromhex("89674523")
    assert rings.load_u32(buf, 8) == 0x23456789
    for bad in (-4, 14, 16):
        with pytest.raises(LocalError):
            rings.load_u32(buf, bad)
    with pytest.raises(LocalError):
        rings.store_u32(buf, 2, 1)  # misaligned
    with pytest.raises(LocalError):
        rings.atomic_or8(buf, 16, 1)


def _hammer(rings: SimpleNamespace, buf: object, bit: int, rounds: int) -> int:
    """Set and clear our own bit; count the times it was found already cleared (lost)."""
    lost = 0
    for _ in range(rounds):
        rings.atomic_or8(buf, 0, bit)
        if not rings.atomic_fetch_and_clear8(buf, 0, bit) & bit:
            lost += 1
    return lost


def test_no_update_is_lost_between_threads(rings: SimpleNamespace) -> None:
    buf = bytearray(8)
    results: list[int] = []
    threads = [threading.Thread(target=lambda b=bit: results.append(_hammer(rings, buf, b, 20000)))
               for bit in (1, 2, 4, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [0, 0, 0, 0]
    assert buf[0] == 0


def test_no_update_is_lost_between_processes() -> None:
    """The compiled atomics are real atomic instructions: two processes sharing a page can
    set and clear their own bits of one byte concurrently without losing any.  (The
    reference fallback only promises this between threads.)"""
    rings = implementation("cython")
    with mmap.mmap(-1, 4096) as mem:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 0
            try:
                code = 1 if _hammer(rings, mem, 2, 200000) else 0
            finally:
                os._exit(code)
        try:
            lost_here = _hammer(rings, mem, 1, 200000)
        finally:
            _, status = os.waitpid(pid, 0)
        assert lost_here == 0
        assert os.waitstatus_to_exitcode(status) == 0
        assert mem[0] == 0

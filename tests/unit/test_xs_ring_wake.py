"""The consumer's signal rule on a xenstore ring page (a lost wake-up found in CI).

A producer that finds the ring full waits for the consumer's event.  The consumer samples
the producer index, copies, then publishes its own index; a producer that filled the
ring in between waits for room that is already there.  "The read took a whole ring"
misses that case (the read took only what it had sampled); the rule a guest's xenbus
driver follows does not: after publishing, read the producer index again, and signal when
it is a whole ring past the old consumer index.  Xen's test-xenstore, as a guest over its
ring through ``XenbusDevice`` against Xen's C xenstored, hung on it once (120 s).
"""

from __future__ import annotations

from typing import Any

import pytest

from xenpv.xenstore.page import RING_SIZE, XsRingPage


def _pair() -> tuple[XsRingPage, XsRingPage]:
    mem = bytearray(4096)
    return XsRingPage(mem, server=True), XsRingPage(mem, server=False)


def _race(guest: XsRingPage, server: XsRingPage, monkeypatch: pytest.MonkeyPatch,
          method: str) -> None:
    """The producer fills the ring after the consumer sampled 1000 bytes: the consumer's
    read takes those 1000 only (as its sampled producer index says)."""
    rx = guest._rx
    real = getattr(rx, method)

    class Racing:
        def __getattr__(self, name: str) -> Any:
            return getattr(rx, name)

        def read(self, max_n: int = -1) -> bytes:
            assert server.write(b"y" * 24) == 24  # the ring is full now: the server waits
            data: bytes = real(1000)
            return data

        def read_into(self, dst: Any, max_n: int = -1) -> int:
            assert server.write(b"y" * 24) == 24
            n: int = real(dst, 1000)
            return n

    monkeypatch.setattr(guest, "_rx", Racing())


def test_a_ring_filled_during_the_read_is_signalled(monkeypatch: pytest.MonkeyPatch) -> None:
    server, guest = _pair()
    assert server.write(b"x" * 1000) == 1000
    _race(guest, server, monkeypatch, "read")
    data, wake = guest.read_wake()
    assert data == b"x" * 1000  # less than a whole ring: "it took a whole ring" said no
    assert len(data) < RING_SIZE and wake


def test_read_into_wake_follows_the_same_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    server, guest = _pair()
    assert server.write(b"x" * 1000) == 1000
    _race(guest, server, monkeypatch, "read_into")
    buf = bytearray(RING_SIZE)
    n, wake = guest.read_into_wake(buf)
    assert n == 1000 and buf[:n] == b"x" * 1000 and wake


def test_no_signal_when_the_producer_never_saw_a_full_ring() -> None:
    server, guest = _pair()
    assert guest.read_wake() == (b"", False)
    assert server.write(b"a" * 600) == 600
    assert guest.read_wake() == (b"a" * 600, False)
    assert server.write(b"b" * 900) == 900  # room for all of it after the first read
    assert guest.read_wake() == (b"b" * 900, False)
    assert server.write(b"c" * RING_SIZE) == RING_SIZE  # a whole ring: it may wait
    data, wake = guest.read_wake()
    assert data == b"c" * RING_SIZE and wake

"""``xenevtchn_pending`` of the replacement libxenevtchn, blocking and non-blocking.

On Xen, ``xenevtchn_pending`` reads the device: it sleeps until a port fires while the
descriptor is blocking, and fails with ``EAGAIN`` once the caller has set ``O_NONBLOCK`` on
``xenevtchn_fd()`` (xenconsoled and QEMU poll the descriptor; some set it non-blocking).
The replacement takes a queued port without looking at the descriptor's flags and reads
them only when nothing is queued; these tests hold it to the device's behaviour, also when
the caller switches the flag back and forth between calls.  Driven through cffi on the
replacement library, as domains 1 and 2 of a loopback daemon.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cffi
import pytest
from shim_peers import LoopbackRun
from shim_support import act_as, loopback_fixture

from xenpv.platforms.loopback.env import shim_dir

CDEF = """
void *xenevtchn_open(void *logger, unsigned int flags);
int xenevtchn_close(void *xce);
int xenevtchn_fd(void *xce);
int xenevtchn_notify(void *xce, uint32_t port);
int xenevtchn_bind_unbound_port(void *xce, uint32_t domid);
int xenevtchn_bind_interdomain(void *xce, uint32_t domid, uint32_t remote_port);
int xenevtchn_pending(void *xce);
int xenevtchn_unmask(void *xce, uint32_t port);
"""
ffi = cffi.FFI()
ffi.cdef(CDEF)
#: Bound on every wait of these tests.
WAIT = 10.0


@dataclass
class Channel:
    """An interdomain channel: ``local`` on the handle under test (domain 1), ``remote``
    on the peer's handle (domain 2)."""

    lib: Any
    h: Any
    peer: Any
    local: int
    remote: int

    def fire(self) -> None:
        """The peer signals the channel."""
        assert self.lib.xenevtchn_notify(self.peer, self.remote) == 0

    def pending_now(self) -> tuple[int, int]:
        """``(result, errno)`` of one ``xenevtchn_pending`` on the handle under test."""
        ffi.errno = 0
        rc = self.lib.xenevtchn_pending(self.h)
        return rc, ffi.errno

    def pending(self) -> tuple[int, int]:
        """:meth:`pending_now`, expected to return by itself (a call that sleeps fails)."""
        call = PendingCall(self)
        call.thread.join(WAIT)
        assert not call.thread.is_alive(), "xenevtchn_pending slept where it must return"
        assert call.result is not None
        return call.result

    def set_nonblocking(self, on: bool) -> None:
        """What a caller does to the descriptor: ``fcntl(F_SETFL, O_NONBLOCK)`` or back."""
        os.set_blocking(self.lib.xenevtchn_fd(self.h), not on)

    def take(self) -> None:
        """Consume the channel's event (it is pending now) and unmask it."""
        assert self.pending() == (self.local, 0)
        assert self.lib.xenevtchn_unmask(self.h, self.local) == 0


#: A daemon with domains 1 and 2.
loopback = loopback_fixture({1: "one", 2: "two"})


@pytest.fixture
def channel(loopback: LoopbackRun, monkeypatch: pytest.MonkeyPatch) -> Iterator[Channel]:
    """A fresh channel between a handle of domain 1 and one of domain 2, nothing pending."""
    lib = ffi.dlopen(str(shim_dir() / "libxenevtchn.so.1"))
    handles: list[Any] = []

    def open_as(domid: int) -> Any:
        act_as(monkeypatch, loopback, domid)
        h = lib.xenevtchn_open(ffi.NULL, 0)
        assert h != ffi.NULL, f"xenevtchn_open as domain {domid}: errno {ffi.errno}"
        handles.append(h)
        return h

    try:
        h, peer = open_as(1), open_as(2)
        local = lib.xenevtchn_bind_unbound_port(h, 2)
        assert local > 0
        remote = lib.xenevtchn_bind_interdomain(peer, 1, local)
        assert remote > 0
        ch = Channel(lib, h, peer, local, remote)
        # binding may leave the new ports pending (as on Xen): start from a quiet handle
        ch.set_nonblocking(True)
        while (rc := ch.pending())[0] >= 0:
            assert rc[0] == local
            assert lib.xenevtchn_unmask(h, local) == 0
        assert rc[1] == errno.EAGAIN
        ch.set_nonblocking(False)
        yield ch
    finally:
        for h in handles:
            lib.xenevtchn_close(h)


class PendingCall:
    """``xenevtchn_pending`` called in a thread (cffi releases the GIL while it sleeps), so
    that a call which should not sleep but does cannot hang the test."""

    def __init__(self, ch: Channel) -> None:
        self.ch = ch
        self.result: tuple[int, int] | None = None
        self.thread = threading.Thread(target=self._call, daemon=True)
        self.thread.start()

    def _call(self) -> None:
        self.result = self.ch.pending_now()

    def still_waiting(self, grace: float = 0.3) -> bool:
        """True if the call has not returned after ``grace`` seconds."""
        self.thread.join(grace)
        return self.thread.is_alive()

    def join(self) -> tuple[int, int] | None:
        """Release the call if it still sleeps (the peer fires) and return its result."""
        if self.thread.is_alive():
            self.ch.fire()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "xenevtchn_pending did not return after a notify"
        return self.result


def test_blocking_pending_sleeps_until_the_peer_notifies(channel: Channel) -> None:
    call = PendingCall(channel)
    try:
        assert call.still_waiting(), f"pending returned {call.result} with nothing pending"
        channel.fire()
    finally:
        result = call.join()
    assert result == (channel.local, 0)
    assert channel.lib.xenevtchn_unmask(channel.h, channel.local) == 0


def test_blocking_pending_returns_a_queued_port_at_once(channel: Channel) -> None:
    channel.fire()
    call = PendingCall(channel)
    assert call.join() == (channel.local, 0)


def test_nonblocking_pending_fails_with_eagain_when_nothing_is_pending(channel: Channel) -> None:
    channel.set_nonblocking(True)
    assert channel.pending() == (-1, errno.EAGAIN)
    assert channel.pending() == (-1, errno.EAGAIN)  # and keeps failing, no state left behind
    channel.fire()
    assert channel.pending() == (channel.local, 0)
    # delivered means masked: a notify now is deferred, pending still has nothing
    channel.fire()
    assert channel.pending() == (-1, errno.EAGAIN)
    assert channel.lib.xenevtchn_unmask(channel.h, channel.local) == 0
    channel.take()  # the deferred event fires on unmask
    assert channel.pending() == (-1, errno.EAGAIN)


def test_the_flag_is_honoured_as_the_caller_switches_it(channel: Channel) -> None:
    channel.set_nonblocking(True)
    assert channel.pending() == (-1, errno.EAGAIN)
    channel.set_nonblocking(False)  # blocking again: pending must sleep, not fail
    call = PendingCall(channel)
    try:
        assert call.still_waiting(), f"pending returned {call.result} on a blocking descriptor"
    finally:
        assert call.join() == (channel.local, 0)
    assert channel.lib.xenevtchn_unmask(channel.h, channel.local) == 0
    channel.set_nonblocking(True)  # and non-blocking once more
    assert channel.pending() == (-1, errno.EAGAIN)
    channel.fire()
    channel.take()

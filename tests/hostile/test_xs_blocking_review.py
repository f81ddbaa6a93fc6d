"""The blocking xenstore client where a review found it wrong: timeouts that left half a
request on the wire (or blocked in ``write``), a call interrupted by a signal handler,
watch registrations lost to a duplicate or a shared token, the event queue touched
outside the connection lock, a client never closed, and a ``DIRECTORY_PART`` walk a
server can keep going for ever.  Servers are scripted threads on real Unix sockets or
the embedded xenstored in a thread."""

from __future__ import annotations

import gc
import os
import pty
import signal
import socket
import sys
import threading
import tty
from pathlib import Path
from types import FrameType

import pytest
from test_xenstore_support import running_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interop"))

from test_xs_blocking_client import answer, recv_request, scripted

from xenpv.errors import LocalError
from xenpv.xenstore import wire
from xenpv.xenstore.blocking import BlockingClient
from xenpv.xenstore.ops import WatchEvent, XenstoreConnectionError
from xenpv.xenstore.wire import WireError, XenstoreError, XsType

TIMEOUT = 10.0

# -- timeouts and interruptions must not desynchronise the stream -----------------------------


def test_timeout_while_sending_never_leaves_half_a_request() -> None:
    """A server that stops reading a device (a raw pty standing in for /dev/xen/xenbus):
    requests time out in ``write``; no call may block past its timeout, and whatever
    reached the wire must be whole requests (a half-sent request fails the connection)."""
    value = b"v" * 4000
    master, slave = pty.openpty()
    tty.setraw(slave)
    outcomes: list[str] = []
    try:
        client = BlockingClient(os.ttyname(slave), timeout=0.05)

        def calls() -> None:
            for _ in range(60):
                try:
                    client.write("/x", value)
                except TimeoutError:
                    outcomes.append("timeout")
                except XenstoreConnectionError:
                    outcomes.append("closed")
                    return

        th = threading.Thread(target=calls, daemon=True)
        th.start()
        th.join(TIMEOUT)
        hung = th.is_alive()
        received = b""
        os.set_blocking(master, False)
        while True:  # drain (also unblocks a hung write)
            try:
                chunk = os.read(master, 65536)
            except BlockingIOError:
                th.join(0.2)
                if not th.is_alive():
                    break
                continue
            received += chunk
        client.close()
    finally:
        os.close(master)
        os.close(slave)
    assert not hung, "a request blocked past its timeout"
    decoder = wire.Decoder()
    decoder.feed(received)
    messages = list(decoder)
    assert messages and all(m.type == XsType.WRITE and m.payload == b"/x\0" + value
                            for m in messages)
    if decoder.buffered:  # a request cut short: nothing may follow it on the wire
        assert outcomes[-1] == "closed" and not client.connected


class _Interrupted(Exception):
    pass


def test_call_interrupted_by_a_signal_handler_discards_the_late_reply(tmp_path: Path) -> None:
    """A signal handler that raises (KeyboardInterrupt, an alarm) during a call: the
    reply that comes later is discarded like a timed-out one, and the client goes on."""

    def script(s: socket.socket) -> None:
        first = recv_request(s)
        second = recv_request(s)  # only after the first call was interrupted
        answer(s, first, b"late")
        answer(s, second, b"second")

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted

    old = signal.signal(signal.SIGALRM, alarm)
    try:
        with scripted(tmp_path, script) as path, BlockingClient(path, timeout=TIMEOUT) as c:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(_Interrupted):
                c.read("/first")
            signal.setitimer(signal.ITIMER_REAL, 0)
            assert c.read("/second") == b"second"
            assert c.connected
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_deadline_passed_before_sending_still_sends_the_request(tmp_path: Path) -> None:
    """A caller preempted between starting a call and writing its request (here: a
    timeout of zero) must still put the request on the wire when there is room: a
    request id consumed without its request leaves a gap a server cannot explain, and
    the late reply is then discarded like any timed-out one (a CI failure of the
    ``xenstore:blocking-client`` fuzz target under load)."""
    seen: list[int] = []

    def script(s: socket.socket) -> None:
        first = recv_request(s)
        seen.append(first.req_id)
        second = recv_request(s)
        seen.append(second.req_id)
        answer(s, first, b"late")
        answer(s, second, b"second")

    with scripted(tmp_path, script) as path, BlockingClient(path, timeout=TIMEOUT) as c:
        c.default_timeout = 0
        with pytest.raises(TimeoutError):
            c.read("/first")
        c.default_timeout = TIMEOUT
        assert c.read("/second") == b"second"
        assert c.connected
    assert seen[1] == seen[0] + 1


# -- watch registrations ----------------------------------------------------------------------


def test_duplicate_watch_keeps_the_existing_registration(tmp_path: Path) -> None:
    """WATCH of a (path, token) already watched is refused with EEXIST by the server; the
    watch that exists must keep delivering its events."""
    with running_server(tmp_path) as st, BlockingClient(st.path(0), timeout=TIMEOUT) as c:
        c.watch("/w", "tok")
        assert c.read_watch() == WatchEvent("/w", "tok")
        with pytest.raises(XenstoreError) as err:
            c.watch("/w", "tok")
        assert err.value.errno_name == "EEXIST"
        c.write("/w/a", "1")
        assert c.read_watch(timeout=5) == WatchEvent("/w/a", "tok")


def test_one_token_on_two_paths(tmp_path: Path) -> None:
    """The server keys watches by (path, token): unwatching one path of a shared token
    leaves the other one delivering."""
    with running_server(tmp_path) as st, BlockingClient(st.path(0), timeout=TIMEOUT) as c:
        c.watch("/p", "tok")
        c.watch("/q", "tok")
        assert {c.read_watch(), c.read_watch()} == {WatchEvent("/p", "tok"), WatchEvent("/q", "tok")}
        c.write("/p/1", "x")
        c.unwatch("/p", "tok")
        c.write("/q/1", "y")
        assert c.read_watch(timeout=5) == WatchEvent("/q/1", "tok")


def test_unwatch_waits_for_the_connection_lock(tmp_path: Path) -> None:
    """The event queue belongs to whoever holds the connection (a thread in a request or
    in read_watch modifies it): unwatch must not touch it before getting the lock."""
    with running_server(tmp_path) as st, BlockingClient(st.path(0), timeout=TIMEOUT) as c:
        c.watch("/u", "tok")
        c.write("/u/a", "1")
        c.read("/u/a")  # the events are queued by now
        pending = c.pending_watch_events
        assert pending >= 1
        c._lock.acquire()
        try:
            th = threading.Thread(target=c.unwatch, args=("/u", "tok"), daemon=True)
            th.start()
            th.join(0.3)
            assert c.pending_watch_events == pending, "unwatch changed the queue unlocked"
        finally:
            c._lock.release()
        th.join(TIMEOUT)
        assert not th.is_alive() and c.pending_watch_events == 0


# -- descriptors ------------------------------------------------------------------------------


def test_a_client_never_closed_releases_its_descriptor(tmp_path: Path) -> None:
    seen_eof = threading.Event()

    def script(s: socket.socket) -> None:
        answer(s, recv_request(s), b"v")
        if s.recv(16) == b"":
            seen_eof.set()

    with scripted(tmp_path, script) as path:
        client = BlockingClient(path, timeout=TIMEOUT)
        assert client.read("/k") == b"v"
        del client
        gc.collect()
        assert seen_eof.wait(TIMEOUT), "the dropped client's descriptor is still open"


def test_close_from_another_thread_wakes_the_reader(tmp_path: Path) -> None:
    def script(s: socket.socket) -> None:
        s.recv(16)  # until the client goes

    with scripted(tmp_path, script) as path:
        client = BlockingClient(path)
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                client.read_watch(timeout=None)
            except BaseException as exc:
                errors.append(exc)

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        th.join(0.2)
        client.close()
        th.join(TIMEOUT)
        assert not th.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], XenstoreConnectionError)
        with pytest.raises(XenstoreConnectionError):
            client.read("/k")


# -- bounded work -----------------------------------------------------------------------------


def test_endless_directory_part_walk_is_a_peer_error(tmp_path: Path) -> None:
    """A server that answers DIRECTORY with E2BIG and then DIRECTORY_PART chunks that never
    end: the client gives up with a WireError after a bounded amount of names."""
    name = b"n" * 4000 + b"\0"
    served = [0]

    def script(s: socket.socket) -> None:
        answer(s, recv_request(s), b"E2BIG\0", type=XsType.ERROR)
        while True:
            req = recv_request(s)
            served[0] += 1
            answer(s, req, b"7\0" + name)

    with scripted(tmp_path, script) as path, BlockingClient(path, timeout=TIMEOUT) as c:
        with pytest.raises(WireError):
            c.directory("/d")
        assert not c.connected
    assert served[0] <= 4096


@pytest.mark.parametrize("token", ["t\u00f6k", "a\0b"], ids=["non-ascii", "nul"])
def test_watch_token_the_events_could_not_carry_is_refused_locally(
    tmp_path: Path, token: str
) -> None:
    """A token the server would echo back as a malformed event (non-ASCII, reads as a
    peer error) or would split (a NUL) is the caller's mistake: LocalError, nothing sent,
    the connection stays usable."""
    with running_server(tmp_path) as st, BlockingClient(st.path(0), timeout=TIMEOUT) as c:
        with pytest.raises(LocalError):
            c.watch("/w", token)
        c.write("/w/a", "1")
        assert c.connected and c.read("/w/a") == b"1"
        assert c.pending_watch_events == 0

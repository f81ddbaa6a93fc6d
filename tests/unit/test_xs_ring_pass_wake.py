"""The compiled xenstore ring pass signals a guest that filled ``req`` while it was taken.

The compiled pass (``cython/xsring.pyx``, ``RingPass.serve``) samples ``req_prod``, copies
the requests, publishes ``req_cons``.  A guest that filled the ring in between waits for
room that is already there; the pass must signal it by the rule the Python pass follows
(``XsRingPage.read_wake``): read ``req_prod`` again after publishing, signal when it is a
whole ring past the old ``req_cons``.  "The pass took a whole ring" misses it; the
reply's own signal usually hides that, so here ``rsp`` is full and the reply is kept.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from xenpv.xenstore.page import RING_SIZE, XsRingPage
from xenpv.xenstore.store import Store
from xenpv.xenstore.wire import HEADER, XsType


def _compiled() -> Any:
    # The compiled pass must exist: a missing build is a failure, not a skip.
    from xenpv.xenstore._xsring import RingPass  # type: ignore[import-not-found]

    return RingPass


class Connection(SimpleNamespace):
    """What the pass reads of a ring connection; reading ``batch`` (which the pass does
    after sampling ``req_prod``, before publishing ``req_cons``) lets the guest run."""

    on_batch: Any = None

    @property
    def batch(self) -> int:
        if self.on_batch is not None:
            self.on_batch()
        return 64


def test_a_guest_that_filled_req_during_the_pass_is_signalled() -> None:
    store = Store()
    conn = store.connect(0)
    store.handle(conn, XsType.WRITE, 1, 0, b"/data/a\0hello")
    mem = bytearray(4096)
    guest = XsRingPage(mem, server=False)
    server = XsRingPage(mem, server=True)
    assert server.write(b"r" * RING_SIZE) == RING_SIZE  # rsp full: the guest reads nothing
    signals: list[int] = []
    kept: list[bytes] = []
    rc = Connection(
        closed=False, ignored=False, reading=True, closing=False, out=[], queue=[], held=None,
        write_paused=False, throttled=False, decoder=SimpleNamespace(buffered=0),
        limited_types=frozenset(), limited=False, conn=conn, stats={"events": 0, "notifies": 0},
        port=5, service=SimpleNamespace(events=SimpleNamespace(notify=signals.append)),
        server=SimpleNamespace(store=store, spin=0.0, _after_batch=lambda: None),
        write=kept.append, _keep=kept.append, scheduled=True, loop=None,
        _ignore=None, _service=None)
    request = HEADER.pack(XsType.READ, 7, 0, 8) + b"/data/a\0"
    assert guest.write(request) == len(request)

    def guest_fills_the_ring() -> None:
        rc.on_batch = None
        assert guest.write(b"x" * RING_SIZE) == RING_SIZE - len(request)  # full: it waits

    rc.on_batch = guest_fills_the_ring
    pass_ = _compiled()(rc, mem, 1)
    try:
        assert pass_.serve(rc)
    finally:
        pass_.release()
    assert guest.writable() == len(request)  # the request was taken ...
    assert kept and kept[0].endswith(b"hello")  # ... and answered (the reply kept) ...
    assert signals == [5]  # ... and the waiting guest told that there is room

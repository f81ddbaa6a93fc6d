"""Hostile-inputs scenarios 21-25 over the xenstore ring, against the dom0 xenstoreds of
the loopback daemon: ours (asserted), Xen's C xenstored and oxenstored (recorded, not
asserted).

Each plan runs as a fresh guest (created for it, destroyed after) that writes raw bytes
and indexes into its own xenstore page and signals its port, while guest 2 — well
behaved, over its own ring — must keep being served.  What each server did is one short
text per plan; ours must give :data:`OURS`, C's and oxenstored's are printed (``pytest -s``) and tabled in
docs/xenstore.md ("Hostile guests over the ring: ours and C").  Every wait is bounded:
a server that does not answer is recorded as such, never waited for.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest
from test_xs_ring_hostile import request

from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.client import ClientPlatform, ControlConnection
from xenpv.platforms.loopback.harness import start_daemon, stop_daemon
from xenpv.xenstore.blocking import BlockingClient
from xenpv.xenstore.page import (
    REQ_CONS_OFFSET,
    REQ_PROD_OFFSET,
    RING_SIZE,
    XS_CONNECTED,
    XS_RECONNECT,
    XsRingPage,
)
from xenpv.xenstore.wire import HEADER, XsType

#: Seconds a plan waits for something a server may never do.
PATIENCE = 1.0
WELL_BEHAVED = 2


class Guest:
    """A fresh hostile guest's raw view of its xenstore page and port."""

    def __init__(self, rundir: str, domid: int) -> None:
        self.domid = domid
        self.platform = ClientPlatform.for_domain(rundir, domid)
        self.ring = self.platform.xenstore_ring()
        self.page = XsRingPage(self.ring.mem, server=False)
        self.events = self.platform.events
        self.rx = bytearray()

    def notify(self) -> None:
        self.events.notify(self.ring.port)

    def until(self, cond: Callable[[], bool], patience: float = PATIENCE) -> bool:
        """Wait on the port until ``cond()``, at most ``patience`` seconds; ``cond()``."""
        deadline = time.monotonic() + patience
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            got = self.events.pending(min(left, 0.05))
            if got is not None:
                self.events.unmask(got)
        return True

    def send(self, data: bytes) -> bool:
        """Put ``data`` into ``req`` and signal; False if the server stopped taking it."""
        view = memoryview(data)
        while view:
            n = self.page.write(view)
            view = view[n:]
            self.notify()
            if view and not self.until(lambda: self.page.writable() > 0):
                return False
        return True

    def reply(self, patience: float = PATIENCE) -> tuple[int, int, bytes] | None:
        """The next whole message ``(type, req_id, payload)``, or None if none came."""
        buf = self.rx

        def whole() -> bool:
            got = self.page.read()
            if got:
                buf.extend(got)
                self.notify()  # we made room: the server may have more for us
            return len(buf) >= 16 and len(buf) >= 16 + HEADER.unpack_from(buf)[3]

        if not self.until(whole, patience):
            return None
        type_, req_id, _, length = HEADER.unpack_from(buf)
        msg = (type_, req_id, bytes(buf[16:16 + length]))
        del buf[:16 + length]
        return msg

    def call(self, type_: int, payload: bytes, req_id: int, tx_id: int = 0) -> str:
        """One request; its reply as text (``OK``, an errno name, ``<type>``) or
        ``no reply``."""
        if not self.send(request(type_, payload, req_id, tx_id)):
            return "not taken"
        got = self.reply()
        if got is None:
            return "no reply"
        if got[0] == XsType.ERROR:
            return got[2].rstrip(b"\0").decode()
        return "OK" if got[2] == b"OK\0" else XsType(got[0]).name

    def close(self) -> None:
        self.page.release()
        self.ring.release()
        self.platform.close()


def _served(rundir: str) -> bool:
    """Whether guest 2 gets an answer over its own ring."""
    g = ClientPlatform.for_domain(rundir, WELL_BEHAVED)
    try:
        with g.blocking_xenstore_over_ring(timeout=PATIENCE * 2) as c:
            return c.read("domid") == str(WELL_BEHAVED).encode()
    except Exception:
        return False
    finally:
        g.close()


def _after(h: Guest, rundir: str) -> str:
    """What the error word says, whether others are served, whether a reconnection
    (``connection = XS_RECONNECT``) gives a working ring again."""
    err = h.page.error
    others = "others served" if _served(rundir) else "OTHERS NOT SERVED"
    h.page.connection = XS_RECONNECT
    h.notify()
    if h.until(lambda: h.page.connection == XS_CONNECTED):
        h.page.release()
        h.page = XsRingPage(h.ring.mem, server=False)
        h.rx.clear()
        again = "reconnects" if h.call(XsType.READ, b"domid\0", 99) == "READ" else \
            "reconnected, no service"
    else:
        again = "no reconnection"
    return f"error={err}; {others}; {again}"


# ------------------------------------------------------------------------ the plans

def plan_corrupt_req_indexes(h: Guest, rundir: str) -> str:
    """25: ``req_prod - req_cons > 1024``, then 5000 events."""
    cons = struct.unpack_from("<I", h.ring.mem, REQ_CONS_OFFSET)[0]
    struct.pack_into("<I", h.ring.mem, REQ_PROD_OFFSET, (cons + 2000) & 0xFFFFFFFF)
    h.notify()
    h.until(lambda: h.page.error != 0)
    t0 = time.monotonic()
    for _ in range(5000):
        h.notify()
    flood = time.monotonic() - t0
    return f"{_after(h, rundir)}; 5000 events in {flood:.1f} s"


def _oversized(length: int) -> Callable[[Guest, str], str]:
    def plan(h: Guest, rundir: str) -> str:
        h.send(HEADER.pack(XsType.WRITE, 1, 0, length) + b"data/x\0" + b"y" * 64)
        # a server that flags the ring answers nothing more: no need to wait long then
        flagged = h.until(lambda: h.page.error != 0)
        got = h.reply(0.05 if flagged else PATIENCE)
        first = "no reply" if got is None else XsType(got[0]).name
        return f"{first}; {_after(h, rundir)}"

    plan.__doc__ = f"25: a header with len = {length:#x}."
    return plan


def plan_half_header(h: Guest, rundir: str) -> str:
    """25: half a header then silence; later the rest."""
    whole = request(XsType.READ, b"domid\0", 3)
    h.send(whole[:8])
    others = "others served" if _served(rundir) else "OTHERS NOT SERVED"
    h.send(whole[8:])
    got = h.reply()
    done = "completed: answered" if got and got[0] == XsType.READ else "completed: no answer"
    return f"{others}; {done}"


def plan_bad_types(h: Guest, rundir: str) -> str:
    """25: message types 20 (RESTRICT) and 99, TRANSACTION_START with a tx_id."""
    restrict = h.call(20, b"1\0", 1)
    unknown = h.call(99, b"\0", 2)
    start = h.call(XsType.TRANSACTION_START, b"\0", 3, 5)
    read = h.call(XsType.READ, b"domid\0", 4)
    return (f"type 20: {restrict}; type 99: {unknown}; TRANSACTION_START tx 5: {start}; "
            f"then READ: {read}")


def plan_long_token(h: Guest, rundir: str) -> str:
    """25: a watch token that makes a child's event exceed 4096 bytes."""
    token = b"t" * 4080
    watch = h.call(XsType.WATCH, b"data\0" + token + b"\0", 5)
    initial = h.reply()
    initial_s = "initial event" if initial and initial[0] == XsType.WATCH_EVENT else "no event"
    with _dom0(rundir) as dom0:
        dom0.write(f"/local/domain/{h.domid}/data/a-child-with-a-long-name", "1")
    nxt = h.call(XsType.READ, b"domid\0", 6)
    return f"WATCH {watch}, {initial_s}; next reply {nxt}; error={h.page.error}"


def plan_never_reads(h: Guest, rundir: str) -> str:
    """23: never read ``rsp`` while sending READs of a 2000-byte node."""
    with _dom0(rundir) as dom0:
        home = f"/local/domain/{h.domid}"
        dom0.write(f"{home}/big", b"z" * 2000)
        dom0.set_perms(f"{home}/big", ["n0", f"r{h.domid}"])
    taken = 0
    for _ in range(300):
        h.page.write(request(XsType.READ, b"big\0", 2))
        h.notify()
        if not h.until(lambda: h.page.writable() == RING_SIZE, 0.3):
            break
        taken += 1
    others = "others served" if _served(rundir) else "OTHERS NOT SERVED"
    return f"stopped taking requests after {taken}; {others}"


def plan_quotas_and_owner(h: Guest, rundir: str) -> str:
    """21/24 over the ring: the 11th transaction, a 2049-byte value, an owner change of
    its own node, rm of "/"."""
    results = []
    for i in range(11):
        r = h.call(XsType.TRANSACTION_START, b"\0", 10 + i)
        if r != "TRANSACTION_START":
            results.append(f"transaction {i + 1}: {r}")
            break
    else:
        results.append("11 transactions open")
    big = h.call(XsType.WRITE, b"data/v\0" + b"v" * 2049, 30)
    mine = h.call(XsType.WRITE, b"data/own\0x", 29)
    owner = h.call(XsType.SET_PERMS, b"data/own\0n2\0", 31)
    root = h.call(XsType.RM, b"/\0", 32)
    results += [f"2049-byte value: {big}", f"own node: {mine}", f"owner change: {owner}",
                f"rm /: {root}"]
    return "; ".join(results)


def _dom0(rundir: str) -> BlockingClient:
    return BlockingClient(os.path.join(rundir, "dom0", "xenstore"), timeout=PATIENCE * 5)


PLANS: dict[str, Callable[[Guest, str], str]] = {
    "corrupt req indexes, then an event flood (25)": plan_corrupt_req_indexes,
    "len 4097 (25)": _oversized(4097),
    "len 0x80000000 (25)": _oversized(0x80000000),
    "len 0xffffffff (25)": _oversized(0xFFFFFFFF),
    "half a header, then silence (25)": plan_half_header,
    "types 20 and 99, tx_id in TRANSACTION_START (25)": plan_bad_types,
    "watch token too long for its event (25)": plan_long_token,
    "never reads its responses (23)": plan_never_reads,
    "quotas and owner rules (21, 24)": plan_quotas_and_owner,
}

#: What ours must do (our own ring tests assert the details in process).
OURS = {
    "corrupt req indexes, then an event flood (25)":
        "error=2; others served; reconnects",
    "len 4097 (25)": "no reply; error=3; others served; reconnects",
    "len 0x80000000 (25)": "no reply; error=3; others served; reconnects",
    "len 0xffffffff (25)": "no reply; error=3; others served; reconnects",
    "half a header, then silence (25)": "others served; completed: answered",
    "types 20 and 99, tx_id in TRANSACTION_START (25)":
        "type 20: ENOSYS; type 99: ENOSYS; TRANSACTION_START tx 5: ENOENT; then READ: READ",
    "watch token too long for its event (25)":
        "WATCH OK, initial event; next reply READ; error=0",
    "quotas and owner rules (21, 24)":
        "transaction 11: ENOSPC; 2049-byte value: E2BIG; own node: OK; owner change: EACCES;"
        " rm /: EACCES",
}


def _run_plans(xenstored: str) -> dict[str, str]:
    rundir = tempfile.mkdtemp(prefix="xenpv-xshostile-")
    daemon = start_daemon(rundir, domains=(WELL_BEHAVED,), xenstored=xenstored)
    ctl = ControlConnection(f"{rundir}/dom0/control", timeout=30.0)
    seen: dict[str, str] = {}
    try:
        for i, (name, plan) in enumerate(PLANS.items()):
            domid = 10 + i
            ctl.call(proto.Op.DOMAIN_CREATE, proto.U32.pack(domid))
            h = Guest(rundir, domid)
            try:
                seen[name] = plan(h, rundir)
            finally:
                h.close()
                ctl.call(proto.Op.DOMAIN_DESTROY, proto.U32.pack(domid))
        seen["daemon alive at the end"] = str(daemon.poll() is None)
    finally:
        ctl.close()
        stop_daemon(daemon)
        shutil.rmtree(rundir, ignore_errors=True)
    return seen


@pytest.fixture(scope="module")
def outcomes() -> Iterator[dict[str, dict[str, str]]]:
    yield {name: _run_plans(name) for name in ("ours", "xen-c", "oxenstored")}


def test_hostile_ring_plans_against_ours_and_c(outcomes: dict[str, dict[str, str]]) -> None:
    ours, theirs, ox = outcomes["ours"], outcomes["xen-c"], outcomes["oxenstored"]
    print("\n| plan | ours | C xenstored 4.17 | oxenstored 4.17 |\n|---|---|---|---|")
    for name in ours:
        print(f"| {name} | {ours[name]} | {theirs.get(name, '(not run)')} | "
              f"{ox.get(name, '(not run)')} |")
    for name, expected in OURS.items():
        got = ours[name]
        if name.startswith("corrupt"):
            got = got.rpartition(";")[0]  # (the flood's duration is not asserted)
        assert got == expected, name
    assert ours["never reads its responses (23)"].endswith("others served")
    taken = int(ours["never reads its responses (23)"].split()[4].rstrip(";"))
    assert taken < 100  # backpressure: a bounded number of unread replies
    assert ours["daemon alive at the end"] == "True"

"""hostile-inputs.md netif scenarios against the real net drivers.

Hostile frontends (1-3, 6-8) meet one real backend queue (:class:`~xenpv.backends.net.NetQueue`:
TX and RX handlers under their ring services) through raw rings on the in-process
emulator (:class:`Rig`); 1, 18 and 29 also meet the whole backend driver through
xenstore, next to a healthy sibling vif that must keep working.  Hostile backends (11,
12, 15, 16) meet the real frontend (:class:`~xenpv.frontends.net.NetFrontend`) connected
to our backend whose queue was stopped, so the test writes the answers itself.  Every
test ends with nothing held in the emulator.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from test_net_support import (
    BE,
    GUESTS,
    NOTHING,
    S,
    Vif,
    World,
    eth,
    guest_mac,
    net_world,
    run,
    start_vif,
    tcp_frame,
)

from xenpv.backends.net import NetConfig, NetFeatures, NetQueue, QueueKeys
from xenpv.drivers import FrontChannel, RingClient
from xenpv.errors import PeerError
from xenpv.frontends.net import NetFrontConfig, NetPeerError
from xenpv.platforms.loopback.harness import InProcessMachine
from xenpv.protocols.ethernet import GSO_TCPV4, NetFrame, mac_text
from xenpv.protocols.netif import (
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    XEN_NETIF_EXTRA_TYPE_GSO,
    GsoExtra,
    NETRXF_more_data,
    NETTXF_extra_info,
    NETTXF_more_data,
    TxRequest,
)
from xenpv.xenbus import add_device

FE = GUESTS[0]
WAIT = 10.0
PEER_MAC = guest_mac(9)
MY_MAC = guest_mac(FE)


class Rig:
    """Raw frontend rings (the attacker) and one real backend queue."""

    def __init__(self, *, split: bool = True, config: NetConfig | None = None,
                 features: NetFeatures | None = None) -> None:
        self.m = InProcessMachine(max_grants=1024, max_ports=32)
        self.fe, self.be = self.m.domain(FE), self.m.domain(BE)
        self.split = split
        self.config = config or NetConfig()
        self.features = features or NetFeatures(sg=True, gso_tcpv4=True, gso_tcpv6=True)
        self.frames: list[NetFrame] = []
        self.tx_answers: list[tuple[int, int]] = []
        self.rx_answers: list[bytes] = []
        self.arrived = asyncio.Event()

    async def start(self) -> Rig:
        self.tx = FrontChannel.create(self.fe, BE, slot_size=12)
        self.rx = FrontChannel.create(self.fe, BE, slot_size=8,
                                      shared_port=None if self.split else self.tx.port)
        self.pages = self.fe.grants.grant(BE, 40, writable=True)
        keys = QueueKeys(self.tx.refs[0], self.rx.refs[0], self.tx.port,
                         self.rx.port if self.split else None)
        self.queue = NetQueue(self.be, FE, keys, self.config, self.features,
                              self.frames.append)
        self.queue.start()
        self.tx_client = RingClient(self.tx, self._on_tx)
        self.rx_client = RingClient(self.rx, self._on_rx)
        self.tx_client.start()
        if self.split:
            self.rx_client.start()
        return self

    def _on_tx(self, batch: memoryview, count: int) -> None:
        for j in range(count):
            self.tx_answers.append(struct.unpack_from("<Hh", batch, j * 12))
        self.arrived.set()

    def _on_rx(self, batch: memoryview, count: int) -> None:
        for j in range(count):
            self.rx_answers.append(bytes(batch[j * 8:(j + 1) * 8]))
        self.arrived.set()

    def page(self, k: int, data: bytes = b"", offset: int = 0) -> int:
        """Put ``data`` in pool page ``k``; its grant ref."""
        self.pages.mem[k * 4096 + offset:k * 4096 + offset + len(data)] = data
        return self.pages.refs[k]

    async def send(self, slots: list[bytes]) -> list[tuple[int, int]]:
        """Submit the slots of one chain; wait for one answer per slot."""
        start = len(self.tx_answers)
        assert self.tx_client.submit(slots) == len(slots)
        async with asyncio.timeout(WAIT):
            while len(self.tx_answers) < start + len(slots):
                self.arrived.clear()
                await self.arrived.wait()
        return self.tx_answers[start:]

    async def good_packet(self, tag: int = 1) -> None:
        """A well-formed one-slot packet is answered OKAY and delivered."""
        frame = eth(PEER_MAC, MY_MAC, 0x88B5, bytes([tag]) * 100)
        before = len(self.frames)
        assert await self.send([TxRequest(self.page(0, frame), 0, 0, 77, len(frame)).pack()]) \
            == [(77, NETIF_RSP_OKAY)]
        assert self.frames[before].data == frame

    def set_req_prod(self, value: int) -> None:
        struct.pack_into("<I", self.tx.res.shares[0].mem, 0, value & 0xFFFFFFFF)
        self.fe.events.notify(self.tx.port)

    async def close(self) -> None:
        self.queue.close()
        self.tx_client.stop()
        self.rx_client.stop()
        self.rx.close()
        self.tx.close()
        self.fe.grants.end_access(self.pages)
        out = self.m.outstanding()
        assert {k: out[k] for k in ("grants", "mappings", "ports")} == NOTHING
        self.m.close()


async def rig(**kw: Any) -> Rig:
    return await Rig(**kw).start()


# ------------------------------------------------------------------ hostile frontends


@pytest.mark.parametrize("claim", [257, 1 << 31, 0xFFFFFFFF])
def test_scenario_01_tx_req_prod_beyond_ring_stops_the_queue(claim: int) -> None:
    async def body() -> None:
        r = await rig()
        r.set_req_prod(claim)
        err = await asyncio.wait_for(r.queue.tx_service.wait_stopped(), WAIT)
        assert isinstance(err, PeerError) and r.queue.tx_service.stats["peer_errors"] == 1
        assert r.frames == [] and r.queue.tx.stats["packets"] == 0
        await r.close()

    run(body())


def test_scenario_01_rx_req_prod_beyond_ring_stops_the_queue() -> None:
    async def body() -> None:
        r = await rig()
        struct.pack_into("<I", r.rx.res.shares[0].mem, 0, 1000)
        r.fe.events.notify(r.rx.port)
        err = await asyncio.wait_for(r.queue.rx_service.wait_stopped(), WAIT)
        assert isinstance(err, PeerError)
        assert len(r.queue.rx.posted) == 0
        await r.close()

    run(body())


def test_scenario_02_tx_req_prod_backwards_stops_the_queue() -> None:
    async def body() -> None:
        r = await rig(split=False)
        await r.good_packet()
        r.set_req_prod(0xFFFFFFF0)  # behind req_cons (1): "available" is huge
        assert await asyncio.wait_for(r.queue.tx_service.wait_stopped(), WAIT) is not None
        await r.close()

    run(body())


def test_scenario_03_slots_rewritten_after_take_are_not_seen() -> None:
    """The frontend rewrites every TX slot the moment the backend has taken it (size,
    flags, gref): the backend serves the chain it copied."""
    async def body() -> None:
        r = await rig()
        real = r.queue.tx.handle

        def racing(batch: memoryview, count: int) -> list[bytes]:
            ring = r.tx.res.shares[0].mem
            for k in range(8):
                struct.pack_into("<IHHHH", ring, 64 + k * 12, 0xFFFF, 4000,
                                 NETTXF_more_data, 5, 0xFFFF)
            return real(batch, count)

        r.queue.tx.handle = racing  # type: ignore[method-assign]
        frame = eth(PEER_MAC, MY_MAC, 0x88B5, bytes(range(200)) * 30)  # 6014 bytes
        head, tail = frame[:4096], frame[4096:]
        slots = [TxRequest(r.page(1, head), 0, NETTXF_more_data, 1, len(frame)).pack(),
                 TxRequest(r.page(2, tail), 0, 0, 2, len(tail)).pack()]
        assert await r.send(slots) == [(1, NETIF_RSP_OKAY), (2, NETIF_RSP_OKAY)]
        assert [f.data for f in r.frames] == [frame]
        await r.close()

    run(body())


def _chain(r: Rig, kind: str) -> tuple[list[bytes], bool]:
    """A hostile TX chain of scenario 6; (slots, fatal)."""
    ref = r.page(3, eth(PEER_MAC, MY_MAC, 0x88B5, bytes(4082)))
    req = TxRequest

    def frags(n: int, size: int, total: int, first_flags: int = 0) -> list[bytes]:
        out = [req(ref, 0, first_flags | NETTXF_more_data, 10, total).pack()]
        for k in range(1, n):
            out.append(req(ref, 0, NETTXF_more_data if k < n - 1 else 0, 10 + k, size).pack())
        return out

    if kind == "21-slots":
        return frags(22, 64, 22 * 64), True
    if kind == "19-data-slots":
        return frags(19, 64, 19 * 64), False
    if kind == "zero-length-fragments":
        return frags(6, 0, 100), False
    if kind == "header-split-across-18-slots":
        return frags(18, 3, 18 * 3), False
    if kind == "first-size-smaller-than-fragments":
        return frags(3, 1000, 1500), False
    if kind == "fragments-above-64k":
        return frags(17, 4096, 0xFFFF), False
    if kind == "fragment-crossing-its-page":
        return [req(ref, 4000, 0, 10, 200).pack()], True
    if kind == "zero-length-packet":
        return [req(ref, 0, 0, 10, 0).pack()], False
    if kind == "gso-with-extra-not-offered":
        gso = GsoExtra(XEN_NETIF_EXTRA_TYPE_GSO, 0, 1000, GSO_TCPV4, 0).pack().ljust(12, b"\0")
        return [req(ref, 0, NETTXF_extra_info, 10, 200).pack(), gso], False
    if kind == "bad-grant-ref":
        return [req(0xFFFF, 0, 0, 10, 200).pack()], False
    raise AssertionError(kind)


CHAINS = ["21-slots", "19-data-slots", "zero-length-fragments", "header-split-across-18-slots",
          "first-size-smaller-than-fragments", "fragments-above-64k",
          "fragment-crossing-its-page", "zero-length-packet", "gso-with-extra-not-offered",
          "bad-grant-ref"]


@pytest.mark.parametrize("kind", CHAINS)
def test_scenario_06_hostile_tx_chains(kind: str) -> None:
    """Each bad chain is dropped with NETIF_RSP_ERROR in every data slot (NULL in extra
    slots) and counted, and the queue keeps serving; a chain beyond ``fatal_slots`` or a
    fragment crossing its page marks the frontend misbehaving instead."""
    async def body() -> None:
        r = await rig(config=NetConfig(gso_tcpv4=False))
        slots, fatal = _chain(r, kind)
        if fatal:
            r.tx_client.submit(slots)
            err = await asyncio.wait_for(r.queue.tx_service.wait_stopped(), WAIT)
            assert isinstance(err, PeerError)
            assert r.queue.tx.stats["fatal"] == 1
        else:
            answers = await r.send(slots)
            statuses = [s for _i, s in answers]
            extras = 1 if kind.startswith("gso") else 0
            assert statuses == [NETIF_RSP_ERROR] + [NETIF_RSP_NULL] * extras + \
                [NETIF_RSP_ERROR] * (len(slots) - 1 - extras)
            data_ids = [i for i, s in answers if s == NETIF_RSP_ERROR]
            assert data_ids == [10 + k for k in range(len(slots) - extras)]
            assert r.queue.tx.stats["dropped"] == 1
            await r.good_packet()  # the queue still serves
        assert all(len(f.data) == 114 for f in r.frames)  # only the good packet got through
        await r.close()

    run(body())


def test_scenario_06_chain_split_across_batches_is_served() -> None:
    """A legal chain whose slots arrive in two pushes is kept privately and served when
    complete (not a hostile case, but the other side of keeping partial chains)."""
    async def body() -> None:
        r = await rig()
        frame = eth(PEER_MAC, MY_MAC, 0x88B5, bytes(range(256)) * 20)
        first = TxRequest(r.page(4, frame[:4096]), 0, NETTXF_more_data, 1, len(frame)).pack()
        second = TxRequest(r.page(5, frame[4096:]), 0, 0, 2, len(frame) - 4096).pack()
        r.tx_client.submit([first])
        await asyncio.sleep(0.05)
        assert r.frames == [] and r.tx_answers == []
        assert await r.send([second]) == [(1, NETIF_RSP_OKAY), (2, NETIF_RSP_OKAY)]
        assert [f.data for f in r.frames] == [frame]
        await r.close()

    run(body())


@pytest.mark.parametrize("posted", [0, 1])
def test_scenario_07_frontend_never_posts_rx_pages(posted: int) -> None:
    """Frames for a frontend that posts no RX page (or always exactly one, too few for
    the frames) wait in a bounded backlog; after the stall timeout they are dropped and
    the carrier is off; pages posted later bring delivery back."""
    async def body() -> None:
        config = NetConfig(backlog_frames=16, backlog_bytes=64 << 10, stall_timeout=0.2)
        r = await rig(config=config)
        rx = r.queue.rx
        if posted:
            r.rx_client.submit([struct.pack("<HxxI", 0, r.page(6))])
            async with asyncio.timeout(WAIT):
                while len(rx.posted) < 1:
                    await asyncio.sleep(0.005)
        big = eth(MY_MAC, PEER_MAC, 0x88B5, bytes(6000))  # needs two pages
        for _ in range(100):
            rx.deliver(NetFrame(big))
            assert len(rx.backlog) <= 16 and rx.backlog_bytes <= 64 << 10
        assert rx.stats["backlog_full"] == 100 - 10  # 64 KiB hold 10 of them
        async with asyncio.timeout(WAIT):
            while rx.carrier:
                await asyncio.sleep(0.02)
        assert rx.stats["stalls"] == 1 and len(rx.backlog) == 0 and rx.backlog_bytes == 0
        rx.deliver(NetFrame(big))
        assert rx.stats["carrier_drops"] == 1
        r.rx_client.submit([struct.pack("<HxxI", k, r.page(k)) for k in range(7, 12)])
        async with asyncio.timeout(WAIT):
            while not rx.carrier:
                await asyncio.sleep(0.005)
        rx.deliver(NetFrame(big))
        async with asyncio.timeout(WAIT):
            while len(r.rx_answers) < 2:
                await asyncio.sleep(0.005)
        first = struct.unpack("<HHHh", r.rx_answers[0])
        assert first[2] & NETRXF_more_data and first[3] == 4096
        await r.close()

    run(body())


def test_scenario_08_notification_flood_without_requests() -> None:
    async def body() -> None:
        r = await rig(split=False)
        for i in range(20000):
            r.fe.events.notify(r.tx.port)
            if i % 1000 == 0:
                await asyncio.sleep(0)
        await r.good_packet()
        assert r.queue.tx_service.running and r.queue.tx_service.error is None
        assert r.queue.tx_service.stats["requests"] == 1
        await r.close()

    run(body())


# ------------------------------------------------------------------ whole backend driver


async def _exchange(a: Vif, b: Vif) -> None:
    frame = eth(b.mac, a.mac, 0x88B5, b"sibling".ljust(60, b"."))
    await a.frontend.send(NetFrame(frame))
    for _ in range(8):  # frames flooded to b before its MAC was learnt come first
        if (await b.frontend.recv(WAIT)).data == frame:
            return
    raise AssertionError("the frame did not arrive")


def siblings_outlive(breach: Callable[[Vif], None]) -> bytes:
    """Vif ``a`` (guest 0, one queue) next to sibling vifs ``b`` and ``c`` (guest 1) on one
    backend and switch: once ``a`` has carried a frame, ``breach(a)`` breaks it from the
    guest's side; its device must go Closing or Closed with an error node and its backend
    marked misbehaving, while ``b`` and ``c`` keep exchanging frames both ways; nothing is
    held at the end.  The error node's value."""
    async def body() -> bytes:
        async with net_world() as w:
            a = await start_vif(w, GUESTS[0], front=NetFrontConfig(max_queues=1))
            b = await start_vif(w, GUESTS[1])
            c = await start_vif(w, GUESTS[1], devid=1)
            try:
                await _exchange(a, b)
                breach(a)
                await a.backend.wait_state(S.Closing, S.Closed, timeout=WAIT)
                error = await w.read_error(a.be_path)
                assert error and a.backend.misbehaving
                await _exchange(b, c)
                await _exchange(c, b)
            finally:
                for v in (a, b, c):
                    await v.close()
            assert w.held() == NOTHING
            return error

    return run(body())


def test_scenario_01_at_driver_level_fails_the_device_closed() -> None:
    """A vif whose frontend breaks its TX ring goes Closing with an error node; the
    sibling vifs on the same backend and switch keep exchanging frames."""
    def breach(a: Vif) -> None:
        ring = a.frontend.queues[0].tx_channel.res.shares[0].mem
        struct.pack_into("<I", ring, 0, 1 << 31)
        a.frontend.platform.events.notify(a.frontend.queues[0].tx_channel.port)

    siblings_outlive(breach)


async def hostile_keys(w: World, keys: dict[str, str]) -> tuple[Any, str, list[Any]]:
    """A vif whose 'frontend' writes ``keys`` and goes Connected; our backend serves it."""
    from xenpv.backends.net import NetBackendDriver

    fe_plat = w.machine.domain(FE)
    info = await add_device(w.dom0, "vif", FE, BE, 0, frontend_keys={"mac": mac_text(MY_MAC)},
                            backend_keys={"mac": mac_text(MY_MAC), "type": "vif"})
    be = NetBackendDriver(w.machine.domain(BE), w.clients[BE], info.backend_path,
                          connect_timeout=None, close_timeout=0.3)
    await be.start()
    await be.wait_state(S.InitWait, timeout=WAIT)
    tx = FrontChannel.create(fe_plat, BE, slot_size=12)
    rx = FrontChannel.create(fe_plat, BE, slot_size=8, shared_port=tx.port)
    good = {"tx-ring-ref": str(tx.refs[0]), "rx-ring-ref": str(rx.refs[0]),
            "event-channel": str(tx.port), "request-rx-copy": "1", "feature-rx-notify": "1"}
    merged = {**good, **keys}
    fe = w.clients[FE]
    for k, v in merged.items():
        if v is not None:
            await fe.write(f"{info.frontend_path}/{k}", v)
    await fe.write(f"{info.frontend_path}/state", "4")
    return be, info.backend_path, [rx, tx]


BAD_KEYS: dict[str, dict[str, Any]] = {
    "tx-ring-ref-abc": {"tx-ring-ref": "abc"},
    "rx-ring-ref-minus-1": {"rx-ring-ref": "-1"},
    "tx-ring-ref-2^40": {"tx-ring-ref": str(1 << 40)},
    "rx-ring-ref-not-granted": {"rx-ring-ref": "1000"},
    "event-channel-unbound": {"event-channel": "31"},
    "event-channel-huge": {"event-channel": str(1 << 40)},
    "num-queues-0": {"multi-queue-num-queues": "0"},
    "num-queues-99": {"multi-queue-num-queues": "99"},
    "no-request-rx-copy": {"request-rx-copy": "0"},
    "no-feature-rx-notify": {"feature-rx-notify": None},
    "feature-sg-garbage": {"feature-sg": "yes"},
    "split-half": {"event-channel-tx": "5"},
}


@pytest.mark.parametrize("kind", sorted(BAD_KEYS))
def test_scenario_18_bad_connect_time_keys(kind: str) -> None:
    async def body() -> None:
        async with net_world() as w:
            be, bp, channels = await hostile_keys(w, BAD_KEYS[kind])
            try:
                await be.wait_state(S.Closing, S.Closed, timeout=WAIT)
                assert await w.read_error(bp)
                assert be.misbehaving
                assert w.machine.outstanding()["mappings"] == 0
            finally:
                await be.close()
                for ch in channels:
                    ch.close()
            assert w.held() == NOTHING

    run(body())


def test_scenario_29_guest_dies_while_frames_flow() -> None:
    """A guest's process dies (its grants and ports go) while another guest streams
    frames to it: the backend drops what it cannot deliver, nothing escapes the loop, the
    sender keeps going, and after unplug nothing is held."""
    async def body() -> None:
        escaped: list[object] = []
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: escaped.append(ctx))
        async with net_world() as w:
            a = await start_vif(w, GUESTS[0])
            b = await start_vif(w, GUESTS[1])
            try:
                await _exchange(a, b)
                sent = 0
                for k in range(400):
                    if k == 100:
                        w.machine.kill(b.frontend.platform)
                    frame = tcp_frame(b.mac, a.mac, bytes(1000), seq=k)
                    await a.frontend.send(NetFrame(frame))
                    sent += 1
                    if k % 20 == 0:
                        await asyncio.sleep(0)
                assert sent == 400 and a.frontend.error is None
                await b.frontend.abort()
                await w.dom0.write(f"{b.be_path}/online", "0")
                await w.dom0.write(f"{b.fe_path}/state", "6")
                await b.backend.wait_done(WAIT)
            finally:
                await a.close()
                await b.backend.close()
            assert escaped == []
            assert w.held() == NOTHING

    run(body())


# ------------------------------------------------------------------ hostile backends


async def hostile_backend(w: World) -> tuple[Vif, NetQueue]:
    """Our frontend connected to our backend, whose one queue then stops: the test
    answers in its place (its rings and the pages the frontend posted)."""
    v = await start_vif(w, FE, front=NetFrontConfig(max_queues=1, tx_pages=32, rx_pages=32))
    q = v.backend.queues[0]
    async with asyncio.timeout(WAIT):
        while len(q.rx.posted) < 32:
            await asyncio.sleep(0.005)
    q.stop()
    return v, q


def rx_answer(q: NetQueue, responses: list[bytes], data: list[bytes] | None = None) -> None:
    """Write RX responses (with page data) for the pages posted first, push, notify."""
    posted = list(q.rx.posted)
    mem_plat = q.rx_channel.res
    for k, rsp in enumerate(responses):
        if data is not None and k < len(data) and data[k]:
            _rid, gref = posted[k]
            mem_plat.grants.copy([_copy_to(q, gref, data[k])])
        q.rx_channel.ring.put_response(rsp)
    q.rx_channel.ring.push_responses()
    mem_plat.events.notify(q.rx_channel.port)


def _copy_to(q: NetQueue, gref: int, data: bytes) -> Any:
    from xenpv.platforms.base import GrantCopy, GrantPtr, LocalPtr

    return GrantCopy(LocalPtr(data), GrantPtr(FE, gref, 0), len(data))


RX_BAD = {
    "offset-plus-size-beyond-page": lambda ids: [struct.pack("<HHHh", ids[0], 4000, 0, 200)],
    "unknown-status": lambda ids: [struct.pack("<HHHh", ids[0], 0, 0, -7)],
    "id-of-another-page": lambda ids: [struct.pack("<HHHh", ids[1], 0, 0, 60)],
    "chain-longer-than-allowed": lambda ids: [struct.pack("<HHHh", i, 0, NETRXF_more_data, 60)
                                              for i in ids[:30]],
}


@pytest.mark.parametrize("kind", sorted(RX_BAD))
def test_scenario_15_bad_rx_responses_fail_the_frontend_closed(kind: str) -> None:
    async def body() -> None:
        async with net_world() as w:
            v, q = await hostile_backend(w)
            try:
                ids = [i for i, _g in q.rx.posted]
                rx_answer(q, RX_BAD[kind](ids))
                await v.frontend.wait_state(S.Closing, S.Closed, timeout=WAIT)
                assert isinstance(v.frontend.error, NetPeerError)
                assert await w.read_error(v.fe_path)
                with pytest.raises(NetPeerError):
                    await v.frontend.recv(1.0)
            finally:
                await v.close()
            assert w.held() == NOTHING

    run(body())


def test_rx_chain_split_across_ring_passes_arrives_whole() -> None:
    """A chain whose first slot comes in one ring pass and its end in the next is held
    (its page still taken) and delivered whole; the pages go back to the ring once."""
    async def body() -> None:
        async with net_world() as w:
            v, q = await hostile_backend(w)
            fq = v.frontend.queues[0]
            try:
                posted = list(q.rx.posted)
                frame = eth(v.mac, PEER_MAC, 0x88B5, bytes(range(256)) * 20)  # 5134 bytes
                ring = q.rx_channel.ring
                for k, (rsp, piece) in enumerate((
                        (struct.pack("<HHHh", posted[0][0], 0, NETRXF_more_data, 4096),
                         frame[:4096]),
                        (struct.pack("<HHHh", posted[1][0], 0, 0, len(frame) - 4096),
                         frame[4096:]))):
                    q.rx_channel.res.grants.copy([_copy_to(q, posted[k][1], piece)])
                    ring.put_response(rsp)
                    ring.push_responses()
                    q.rx_channel.res.events.notify(q.rx_channel.port)
                    if k == 0:
                        async with asyncio.timeout(WAIT):
                            while not fq.rx_pending:
                                await asyncio.sleep(0.002)
                        assert len(fq.rx_posted) == 32 and v.frontend.pending_frames() == 0
                got = await v.frontend.recv(WAIT)
                assert got.data == frame and not fq.rx_pending
                assert len(fq.rx_posted) == 32 and v.frontend.error is None
            finally:
                await v.close()
            assert w.held() == NOTHING

    run(body())


def test_scenario_15_negative_status_drops_only_that_packet() -> None:
    async def body() -> None:
        async with net_world() as w:
            v, q = await hostile_backend(w)
            try:
                ids = [i for i, _g in q.rx.posted]
                good = eth(v.mac, PEER_MAC, 0x88B5, b"after".ljust(50, b"!"))
                rx_answer(q, [struct.pack("<HHHh", ids[0], 0, NETRXF_more_data, 100),
                              struct.pack("<HHHh", ids[1], 0, 0, NETIF_RSP_ERROR),
                              struct.pack("<HHHh", ids[2], 0, 0, len(good))],
                          [b"", b"", good])
                assert (await v.frontend.recv(WAIT)).data == good
                assert v.frontend.net_stats["rx_errors"] == 1
                assert v.frontend.error is None
            finally:
                await v.close()
            assert w.held() == NOTHING

    run(body())


TX_BAD = {
    "id-not-outstanding": lambda rid: [struct.pack("<Hh", rid + 200, 0)],
    "duplicate": lambda rid: [struct.pack("<Hh", rid, 0), struct.pack("<Hh", rid, 0),
                              struct.pack("<Hh", rid, 0)],
    "unknown-status": lambda rid: [struct.pack("<Hh", rid, 5)],
}


@pytest.mark.parametrize("kind", sorted(TX_BAD))
def test_scenario_11_bad_tx_responses_fail_the_frontend_closed(kind: str) -> None:
    async def body() -> None:
        async with net_world() as w:
            v, q = await hostile_backend(w)
            try:
                for _ in range(3):
                    await v.frontend.send(NetFrame(eth(PEER_MAC, v.mac, 0x88B5, bytes(50))))
                buf = bytearray(12 * 256)
                n = 0
                async with asyncio.timeout(WAIT):
                    while n < 3:
                        n += q.tx_channel.ring.take_requests_into(memoryview(buf)[n * 12:])
                        await asyncio.sleep(0.005)
                rid = struct.unpack_from("<H", buf, 8)[0]
                for rsp in TX_BAD[kind](rid):
                    q.tx_channel.ring.put_response(rsp)
                q.tx_channel.ring.push_responses()
                q.tx_channel.res.events.notify(q.tx_channel.port)
                await v.frontend.wait_state(S.Closing, S.Closed, timeout=WAIT)
                assert await w.read_error(v.fe_path)
                with pytest.raises(NetPeerError):
                    await v.frontend.send(NetFrame(eth(PEER_MAC, v.mac, 0x88B5, bytes(50))))
            finally:
                await v.close()
            assert w.held() == NOTHING

    run(body())


@pytest.mark.parametrize("ring", ["tx", "rx"])
def test_scenario_10_rsp_prod_beyond_ring_fails_the_frontend_closed(ring: str) -> None:
    """With one port for both rings, a broken RX (or TX) ring still fails the device:
    the frontend does not keep waiting on a ring nobody wakes."""
    async def body() -> None:
        async with net_world() as w:
            v = await start_vif(w, FE, front=NetFrontConfig(max_queues=1, split_events=False,
                                                            tx_pages=32, rx_pages=32))
            try:
                q = v.backend.queues[0]
                ch = q.tx_channel if ring == "tx" else q.rx_channel
                q.stop()
                struct.pack_into("<I", ch.res.mappings[0].mem, 8, 1 << 31)
                ch.res.events.notify(ch.port)
                await v.frontend.wait_state(S.Closing, S.Closed, timeout=WAIT)
                assert isinstance(v.frontend.error, NetPeerError)
                assert await w.read_error(v.fe_path)
            finally:
                await v.close()
            assert w.held() == NOTHING

    run(body())


def test_scenario_12_rx_response_rewritten_after_it_was_read() -> None:
    """The backend rewrites the response slot and the page right after the frontend
    took them: the frame received is the one answered first."""
    async def body() -> None:
        async with net_world() as w:
            v, q = await hostile_backend(w)
            fe = v.frontend
            real = fe._on_rx
            fq = fe.queues[0]
            ring = fq.rx_channel.res.shares[0].mem

            def racing(queue: Any, batch: memoryview, count: int) -> None:
                for k in range(count):  # every answered slot: a huge size, a new offset
                    struct.pack_into("<HHHh", ring, 64 + k * 8, 0, 3000, 0, 4000)
                real(queue, batch, count)
                fq.rx_pages.mem[:] = b"\xee" * len(fq.rx_pages.mem)  # and the data

            fq.rx_client.on_responses = lambda b, c: racing(fq, b, c)  # type: ignore[union-attr]
            try:
                ids = [i for i, _g in q.rx.posted]
                good = eth(v.mac, PEER_MAC, 0x88B5, b"original".ljust(50, b"."))
                rx_answer(q, [struct.pack("<HHHh", ids[0], 0, 0, len(good))], [good])
                got = await fe.recv(WAIT)
                assert got.data == good and fe.error is None
            finally:
                await v.close()
            assert w.held() == NOTHING

    run(body())


def test_scenario_16_backend_floods_the_frontend_event_channel() -> None:
    async def body() -> None:
        async with net_world() as w:
            a = await start_vif(w, GUESTS[0], front=NetFrontConfig(split_events=False))
            b = await start_vif(w, GUESTS[1])
            try:
                q = a.backend.queues[0]
                for i in range(20000):
                    q.tx_channel.res.events.notify(q.tx_channel.port)
                    if i % 1000 == 0:
                        await asyncio.sleep(0)
                await _exchange(a, b)
                await _exchange(b, a)
                rings = a.frontend.info()["rings"][0]
                assert rings["tx"]["spurious_wakeups"] > 0
                assert a.frontend.error is None
            finally:
                await a.close()
                await b.close()
            assert w.held() == NOTHING

    run(body())


def test_scenario_06_chain_beyond_fatal_slots_fails_the_device_closed() -> None:
    """A chain of 22 slots pushed on a connected vif's TX ring marks the frontend
    misbehaving at driver level: error node, Closing; the sibling vifs keep talking."""
    def breach(a: Vif) -> None:
        q = a.frontend.queues[0]
        ref = q.tx_pages.refs[0]
        chain = [TxRequest(ref, 0, NETTXF_more_data, 1, 22 * 64).pack()]
        chain += [TxRequest(ref, 0, NETTXF_more_data if k < 21 else 0, 1 + k,
                            64).pack() for k in range(1, 22)]
        assert q.tx_client is not None and q.tx_client.submit(chain) == 22

    assert b"slots" in siblings_outlive(breach)

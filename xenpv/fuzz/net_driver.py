"""The ``netback:driver`` and ``netfront:driver`` fuzz targets: hostile peers against the
real net drivers.

``netback:driver`` (:class:`NetbackTarget`): each input builds a fresh world — an
in-process emulator with the guest and the backend domain, one queue (split or shared
event channel, the offered and negotiated features chosen by the input) served by the
real :class:`~xenpv.backends.net.NetQueue` (TX and RX handlers under their ring
services), and a pool of pages the guest granted (writable and read-only).  The rest of
the input is a list of hostile steps: TX chains with fuzzed grefs, offsets, flags, ids,
sizes and extra-info slots, raw slot bytes, arbitrary ``req_prod`` values on either
ring, RX pages posted with fuzzed ids and grefs, frames (GSO, blank checksums, any
size, any bytes) sent towards the guest, control-ring requests (hash algorithm, flags,
key and mapping pages with fuzzed grefs and values), revoked grants, notification floods,
pauses.

Invariants (a breach is an :class:`~xenpv.fuzz.hostile.InvariantViolation`): nothing
escapes the event loop; the services either keep serving or stopped with a
:class:`~xenpv.errors.PeerError`; TX answers carry OKAY, ERROR or NULL; no answer is written for a slot not taken and a data answer
never runs past its page; the RX backlog stays within its bounds; every frame handed to
the port is 14..65535 bytes; work is bounded in time; after teardown nothing is mapped
and every guest share can be ended.

``netfront:driver`` (:class:`NetfrontTarget`) is the mirror image: a hostile backend
domain writes fuzzed features, maps the frontend's rings and answers its TX slots and RX
pages with fuzzed ids, offsets, flags, statuses and extra-info records, moves
``rsp_prod`` anywhere and floods the port, while the real
:class:`~xenpv.frontends.net.NetFrontend` sends and receives.  Every API call must end
(bounded) with a result or one of the net/peer/local errors, nothing may escape the
loop, and after teardown every share of the frontend is ended or in its quarantine.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import Any

from xenpv.backends.net import NetConfig, NetCtrl, NetFeatures, NetQueue, QueueKeys
from xenpv.drivers.ringchannel import BackChannel, FrontChannel, RingPlacement
from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.fuzz.hostile import InvariantViolation
from xenpv.fuzz.source import ByteSource
from xenpv.fuzz.xenbus_driver import (
    QUOTAS,
    GuestPages,
    World,
    backend_let_go,
    calls_end,
    frontend_let_go,
    hostile_backend,
    hostile_keys,
    no_escapes,
    play_input,
    settled,
    xenstore_world,
)
from xenpv.platforms.base import GrantCopy, GrantPtr, LocalPtr
from xenpv.platforms.loopback.harness import InProcessMachine
from xenpv.protocols.ethernet import NetFrame
from xenpv.protocols.netif import (
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    GsoExtra,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_extra_info,
    NETTXF_more_data,
    TxRequest,
)

__all__ = ["MAX_STEPS", "NetbackTarget", "NetfrontTarget"]

FE, BE = 3, 2
MAX_STEPS = 32
POOL = 16
SETTLE_S = 3.0
_TX_OK = (NETIF_RSP_OKAY, NETIF_RSP_ERROR, NETIF_RSP_NULL)


def _tcp_like(src: ByteSource) -> bytes:
    """An Ethernet + IPv4/IPv6 + TCP header with fuzzed fields and some payload."""
    v6 = src.boolean()
    head = bytes(12) + (b"\x86\xdd" if v6 else b"\x08\x00")
    if v6:
        ip = bytes([0x60, 0, 0, 0]) + struct.pack("!HBB", src.u16(), src.choice([6, 17,
                                                                                   src.u8()]), 64)
        ip += src.take(32).ljust(32, b"\0")
    else:
        ip = bytes([src.choice([0x45, 0x46, src.u8()]), 0]) + struct.pack("!H", src.u16()) + \
            src.take(16).ljust(16, b"\0")
        ip = ip[:9] + bytes([src.choice([6, 17, src.u8()])]) + ip[10:]
    tcp = src.take(20).ljust(20, b"\0")
    return head + ip + tcp + bytes(src.choice([0, 100, 1448, 5000, 30000, src.u16()]))


class NetbackTarget:
    """One fresh world per input (callable); see the module docstring."""

    def __call__(self, data: bytes) -> None:
        """Play one input; raises InvariantViolation on a breach."""
        play_input("netback:driver", "net backend", lambda: self._run(data),
                   ("xenpv.drivers", "xenpv.backends"))

    async def _run(self, data: bytes) -> None:
        src = ByteSource(data)
        with no_escapes():
            config = NetConfig(sg=src.boolean(), gso_tcpv4=src.boolean(),
                               gso_tcpv6=src.boolean(), backlog_frames=8,
                               backlog_bytes=128 << 10,
                               stall_timeout=src.choice([0.01, 0.05, 5.0]))
            features = NetFeatures(sg=src.boolean(), gso_tcpv4=src.boolean(),
                                   gso_tcpv6=src.boolean(), csum=src.boolean(),
                                   ipv6_csum=src.boolean())
            rate = src.choice([None, None, (3000, 20000), (2000, 5000)])
            machine = InProcessMachine(max_grants=512, max_ports=16)
            world = _BackWorld(machine, config, features, split=src.boolean(), rate=rate)
            try:
                world.start()
                for _ in range(MAX_STEPS):
                    if src.remaining <= 0 or not world.serving():
                        break
                    await world.step(src)
                    world.check()
                await world.settle()
                world.check()
            finally:
                world.close()
                machine.close()


class _BackWorld:
    def __init__(self, machine: InProcessMachine, config: NetConfig, features: NetFeatures,
                 *, split: bool, rate: tuple[int, int] | None) -> None:
        self.machine = machine
        self.rate = rate
        self.fe, self.be = machine.domain(FE), machine.domain(BE)
        self.config = config
        self.features = features
        self.split = split
        self.frames: list[NetFrame] = []
        self.prod = {"tx": 0, "rx": 0}
        self.cons = {"tx": 0, "rx": 0}

    def start(self) -> None:
        self.tx = FrontChannel.create(self.fe, BE, slot_size=12)
        self.rx = FrontChannel.create(self.fe, BE, slot_size=8,
                                      shared_port=None if self.split else self.tx.port)
        self.queue = NetQueue(self.be, FE, QueueKeys(self.tx.refs[0], self.rx.refs[0],
                                                     self.tx.port,
                                                     self.rx.port if self.split else None),
                              self.config, self.features, self._port, self.rate)
        self.queue.start()
        self.pages = GuestPages(self.fe, BE, POOL)
        self.ctrl = NetCtrl(self.be, FE, 4)

    def _ctrl(self, src: ByteSource) -> None:
        """Control requests with fuzzed types and data (grefs from the pool often)."""
        n = 1 + src.below(8)
        raw = bytearray(src.take(16 * n).ljust(16 * n, b"\0"))
        for j in range(n):
            if src.boolean():
                struct.pack_into("<HI", raw, j * 16 + 2, src.below(12), self.pages.ref(src))
        answers = self.ctrl.handle(memoryview(bytes(raw)), n)
        if len(answers) != n:
            raise InvariantViolation(f"{len(answers)} control answers for {n} requests")
        for a in answers:
            if struct.unpack_from("<I", a, 4)[0] not in (0, 1, 2, 3):
                raise InvariantViolation(f"control answer with status {a[4:8].hex()}")
        if any(e >= 4 for e in self.ctrl.mapping) or len(self.ctrl.key) != 40:
            raise InvariantViolation("control state out of its bounds")
        self.ctrl.select(_tcp_like(src))

    def _port(self, frame: NetFrame) -> None:
        if not 14 <= len(frame.data) <= 0xFFFF:
            raise InvariantViolation(f"a {len(frame.data)}-byte frame reached the port")
        self.frames.append(frame)

    def serving(self) -> bool:
        return self.queue.tx_service.running or self.queue.rx_service.running

    def _ring(self, which: str) -> Any:
        return (self.tx if which == "tx" else self.rx).res.shares[0].mem

    def _submit(self, which: str, slots: list[bytes]) -> None:
        ring, size = self._ring(which), (12 if which == "tx" else 8)
        n = 256
        for data in slots:
            off = 64 + (self.prod[which] % n) * size
            ring[off:off + size] = data.ljust(size, b"\0")[:size]
            self.prod[which] = (self.prod[which] + 1) & 0xFFFFFFFF
        struct.pack_into("<I", ring, 0, self.prod[which])
        ch = self.tx if which == "tx" else self.rx
        self.fe.events.notify(ch.port)

    def _chain(self, src: ByteSource) -> list[bytes]:
        n = 1 + src.below(24) if src.below(3) == 0 else 1 + src.below(4)
        out = []
        total = src.choice([1, 13, 14, 60, 1514, 4096, 9000, 0xFFFF, src.u16()])
        extra = src.below(4) == 0
        for k in range(n):
            flags = NETTXF_more_data if k < n - 1 else 0
            if k == 0:
                flags |= src.below(4) | (NETTXF_extra_info if extra else 0)
                out.append(TxRequest(self.pages.ref(src), src.choice([0, 0, src.below(4097)]),
                                     flags if src.below(8) else src.u16(), src.u16(),
                                     total).pack())
                if extra:
                    out.append(GsoExtra(src.choice([1, 1, 2, 4, src.u8()]),
                                        src.choice([0, 0, 1]), src.choice([1448, 0, src.u16()]),
                                        src.choice([1, 2, 0, src.u8()]), 0).pack())
            else:
                out.append(TxRequest(self.pages.ref(src), src.choice([0, src.below(4097)]), flags,
                                     src.u16(), src.choice([1, 100, 4096, src.u16()])).pack())
        return out

    async def step(self, src: ByteSource) -> None:
        action = src.below(11)
        if action <= 2:
            self._submit("tx", self._chain(src))
        elif action == 10:
            self._ctrl(src)
        elif action == 3:
            self._submit("tx", [src.take(12)])
        elif action == 4:
            which = src.choice(["tx", "rx"])
            self.prod[which] = src.u32() if src.below(2) else self.prod[which] + src.below(300)
            struct.pack_into("<I", self._ring(which), 0, self.prod[which] & 0xFFFFFFFF)
            self.fe.events.notify(self.tx.port)
        elif action == 5:
            self._submit("rx", [struct.pack("<HxxI", src.u16(), self.pages.ref(src))
                                for _ in range(1 + src.below(20))])
        elif action == 6:
            data = _tcp_like(src) if src.boolean() else src.take(src.below(200)) + \
                bytes(src.choice([0, 5000, 70000]))
            self.queue.rx.deliver(NetFrame(data, csum_blank=src.boolean(),
                                           data_validated=src.boolean(),
                                           gso_type=src.choice([0, 1, 2, src.u8()]),
                                           gso_size=src.choice([0, 1, 536, 1448, src.u16()])))
        elif action == 7 and self.pages.shares:
            self.pages.revoke(src)
        elif action == 8:
            for _ in range(src.below(2000)):
                self.fe.events.notify(self.tx.port)
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(src.below(5) / 1000)

    def _collect(self, which: str) -> list[bytes]:
        ring, size = self._ring(which), (12 if which == "tx" else 8)
        prod = struct.unpack_from("<I", ring, 8)[0]
        avail = (prod - self.cons[which]) & 0xFFFFFFFF
        if avail > 256:
            raise InvariantViolation(f"backend {which} rsp_prod {prod} is {avail} past rsp_cons")
        out = []
        for _ in range(avail):
            off = 64 + (self.cons[which] % 256) * size
            out.append(bytes(ring[off:off + size]))
            self.cons[which] = (self.cons[which] + 1) & 0xFFFFFFFF
        return out

    def check(self) -> None:
        for rsp in self._collect("tx"):
            status = struct.unpack_from("<h", rsp, 2)[0]
            if status not in _TX_OK:
                raise InvariantViolation(f"TX answer with status {status}")
        for rsp in self._collect("rx"):
            _id, offset, _flags, status = struct.unpack("<HHHh", rsp)
            if status > 0 and offset + status > 4096:
                raise InvariantViolation(f"RX answer of {status} bytes at {offset}")
        for which, ch in (("tx", self.queue.tx_channel), ("rx", self.queue.rx_channel)):
            rsp_prod = struct.unpack_from("<I", self._ring(which), 8)[0]
            ahead = (int(ch.ring.req_cons) - rsp_prod) & 0xFFFFFFFF
            if ahead > 256:  # answers for slots never taken
                raise InvariantViolation(f"{which} rsp_prod {rsp_prod} passed the slots "
                                         f"taken ({int(ch.ring.req_cons)})")
        rx = self.queue.rx
        if len(rx.backlog) > self.config.backlog_frames or \
                rx.backlog_bytes > self.config.backlog_bytes:
            raise InvariantViolation("the RX backlog grew past its bounds")
        for s in (self.queue.tx_service, self.queue.rx_service):
            if s.error is not None and not isinstance(s.error, PeerError):
                raise InvariantViolation(f"service stopped with {s.error!r}")

    async def settle(self) -> None:
        ring = self._ring("tx")

        def busy() -> bool:
            produced = struct.unpack_from("<I", ring, 0)[0]
            s = self.queue.tx_service
            return s.running and (int(self.queue.tx_channel.ring.req_cons) != produced
                                  or (self.rate is not None and self.queue.tx.held > 0))

        await settled(busy, lambda: f"TX slots not taken in {SETTLE_S} s", SETTLE_S)

    def close(self) -> None:
        self.queue.close()
        self.rx.close()
        self.tx.close()
        backend_let_go(self.machine, self.pages)


# --------------------------------------------------------------------------- netfront


def _allowed() -> tuple[type[BaseException], ...]:
    return (PeerError, LocalError, PlatformError, TimeoutError)


class NetfrontTarget:
    """The ``netfront:driver`` target: a hostile backend domain (xenstore features,
    TX/RX answers, indexes, floods, silence) against the real net frontend driver."""

    def __call__(self, data: bytes) -> None:
        """Play one input; raises InvariantViolation on a breach."""
        play_input("netfront:driver", "net frontend", lambda: self._run(data),
                   ("xenpv.drivers", "xenpv.frontends", "xenpv.xenbus"))

    async def _run(self, data: bytes) -> None:
        src = ByteSource(data)
        async with xenstore_world("vif", QUOTAS) as w:
            with no_escapes():
                fp, bp = await w.add(0, frontend_keys={"mac": "02:00:00:00:00:03"})
                fe = await self._attack(w, fp, bp, src)
            frontend_let_go(w.machine, fe)

    async def _attack(self, w: World, fp: str, bp: str, src: ByteSource) -> Any:
        """The hostile backend's keys, rings and answers against a new frontend of device
        ``fp``/``bp``; the frontend, closed."""
        from xenpv.backends.net import read_queue_keys
        from xenpv.frontends.net import NetFrontConfig, NetFrontend
        from xenpv.xenbus import PeerKeys

        be_plat = w.machine.domain(BE)
        fe = NetFrontend(w.machine.domain(FE), w.fe, fp, config=NetFrontConfig(
            max_queues=1 + src.below(2), sg=src.boolean(), csum=src.boolean(),
            tx_pages=32, rx_pages=32, rx_queue_frames=16, send_timeout=0.3),
            connect_timeout=2.0, close_timeout=0.15, op_timeout=2.0, hook_timeout=2.0)
        await hostile_keys(w.be, bp, {
            "feature-rx-copy": (["1"], ["0", "x"]),
            "feature-sg": (["1", "0"], ["yes"]),
            "feature-gso-tcpv4": (["1", "0"], ["2"]),
            "feature-gso-tcpv6": (["1", "0"], [""]),
            "feature-ipv6-csum-offload": (["1", "0"], ["-1"]),
            "feature-split-event-channels": (["1", "0"], ["on"]),
            "multi-queue-max-queues": (["1", "2"], ["0", "99999", "x"]),
        }, src)
        world = _FrontPeer(be_plat)

        async def attach() -> None:
            for qk in await read_queue_keys(PeerKeys(w.be, fp), max_queues=4, split=True):
                world.attach(qk)

        await hostile_backend(w, fe, fp, bp, (b"3", b"4"), attach,
                              lambda: self._io(fe, world, src), world.close)
        return fe

    async def _io(self, fe: Any, world: _FrontPeer, src: ByteSource) -> None:
        allowed = _allowed()
        with contextlib.suppress(*allowed):
            await fe.ready(0.5)
        jobs: list[asyncio.Future[Any]] = []
        for _ in range(MAX_STEPS):
            if src.remaining <= 0:
                break
            action = src.below(7)
            if action <= 1:
                data = _tcp_like(src) if src.boolean() else bytes(src.choice([14, 60, 1514,
                                                                              5000, 70000]))
                jobs.append(asyncio.ensure_future(fe.send(NetFrame(
                    data, csum_blank=src.boolean(), gso_type=src.choice([0, 1, 2]),
                    gso_size=src.choice([1448, 0, 1])))))
            elif action == 2:
                jobs.append(asyncio.ensure_future(fe.recv(0.05)))
            elif action == 3 and world.queues:
                world.answer_tx(src)
            elif action == 4 and world.queues:
                world.answer_rx(src)
            elif action == 5 and world.queues:
                tx, rx = world.queues[src.below(len(world.queues))]
                ch = src.choice([tx, rx])
                if src.boolean():
                    struct.pack_into("<I", ch.res.mappings[0].mem, 8, src.u32())
                for _ in range(src.below(500)):
                    ch.res.events.notify(ch.port)
            await asyncio.sleep(src.below(3) / 1000)
        await calls_end(jobs, allowed)


class _FrontPeer:
    """The hostile backend's rings."""

    def __init__(self, platform: Any) -> None:
        self.platform = platform
        self.queues: list[tuple[BackChannel, BackChannel]] = []
        self.rx_posted: list[tuple[int, int]] = []

    def attach(self, keys: QueueKeys) -> None:
        tx = BackChannel.attach(self.platform, FE, RingPlacement((keys.tx_ref,), keys.tx_port),
                                slot_size=12)
        try:
            rx = BackChannel.attach(
                self.platform, FE, RingPlacement((keys.rx_ref,), keys.rx_port or keys.tx_port),
                slot_size=8, shared_port=None if keys.rx_port is not None else tx.port)
        except BaseException:
            tx.close()
            raise
        self.queues.append((tx, rx))

    def _push(self, ch: BackChannel, rsps: list[bytes], src: ByteSource) -> None:
        with contextlib.suppress(PeerError, LocalError):
            for r in rsps:
                ch.ring.put_response(r)
            if ch.ring.push_responses_and_check_notify() or src.boolean():
                ch.res.events.notify(ch.port)

    def answer_tx(self, src: ByteSource) -> None:
        tx, _rx = self.queues[src.below(len(self.queues))]
        buf = bytearray(12 * 256)
        try:
            n = int(tx.ring.take_requests_into(buf))
        except PeerError:
            return
        out = []
        for j in range(n):
            rid = struct.unpack_from("<H", buf, j * 12 + 8)[0]
            if src.below(4) == 0:
                rid = src.u16()
            out.append(struct.pack("<Hh", rid, src.choice([0, 0, -1, 1, -2, src.u16() - 32768])))
        if out and src.below(8):
            self._push(tx, out[: src.below(len(out) + 1) or len(out)], src)

    def answer_rx(self, src: ByteSource) -> None:
        _tx, rx = self.queues[src.below(len(self.queues))]
        buf = bytearray(8 * 256)
        with contextlib.suppress(PeerError):
            n = int(rx.ring.take_requests_into(buf))
            for j in range(n):
                self.rx_posted.append(struct.unpack_from("<HxxI", buf, j * 8))
        out = []
        for _ in range(min(len(self.rx_posted), src.below(24))):
            rid, gref = self.rx_posted.pop(0)
            size = src.choice([60, 1514, 4096, 0, src.u16()])
            offset = src.choice([0, 0, src.below(4097)])
            if src.below(4):
                with contextlib.suppress(PlatformError, LocalError):
                    n = max(0, min(size, 4096 - offset))
                    self.platform.grants.copy([GrantCopy(LocalPtr(bytes(n)),
                                                         GrantPtr(FE, gref, offset), n)])
            if src.below(6) == 0:
                out.append(GsoExtra(src.choice([1, 1, 0, 5]), src.below(2), 1448,
                                    src.choice([1, 2, 3]), 0).pack())
                continue
            flags = src.choice([0, 0, NETRXF_more_data, NETRXF_extra_info, src.u16()])
            status = size if src.below(6) else src.choice([-1, -2, -3, src.u16() - 32768])
            out.append(struct.pack("<HHHh", rid if src.below(8) else src.u16(), offset,
                                   flags, status if status < 0x8000 else 0x7FFF))
        if out:
            self._push(rx, out, src)

    def close(self) -> None:
        for tx, rx in self.queues:
            rx.close()
            tx.close()
        self.queues = []

"""The fuzz targets: one function of one ``bytes`` input each, and the registry of them.

A target raises :class:`~xenpv.fuzz.hostile.InvariantViolation` (or lets any other
non-PeerError exception escape) when hostile input broke the invariant; returning
normally, or after handling a PeerError the way the protocol wants, is a pass.

Targets that attack a driver take the victim as a parameter: :func:`get_target` accepts
a victim factory (``"module:callable"`` or ``"path/to/file.py:callable"``) and builds the
target around it, so the same hostile peer can attack xenpv's own sans-IO drivers, the
deliberately vulnerable example of the test suite, or any other driver with the
:class:`~xenpv.fuzz.victims.Victim` interface.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from xenpv.errors import LocalError, PeerError
from xenpv.fuzz import oracles
from xenpv.fuzz.byterings import BYTE_RING_SPECS, ByteRingVictim, HostileProducer
from xenpv.fuzz.external import XenstoredProcess, hostile_xs_chunks
from xenpv.fuzz.hostile import HostileBackend, HostileFrontend, InvariantViolation, violation
from xenpv.fuzz.ringspecs import RING_SPECS
from xenpv.fuzz.source import ByteSource
from xenpv.fuzz.victims import RingBackend, RingFrontend
from xenpv.fuzz.xenbus import drive_machine, parse_keys
from xenpv.protocols import blkif, kbdif, netif, usbif, vchan
from xenpv.vchan import ring as vring
from xenpv.xenstore import wire
from xenpv.xenstore.store import Quotas, Store

__all__ = ["TARGETS", "Target", "get_target", "load_victim"]


@dataclass(frozen=True)
class Target:
    """A named fuzz target.

    ``build(victim)`` returns the function of one input; ``victim`` is a factory or None
    for the default.  ``kind`` says which victim interface a replacement must offer
    (``"ring-backend"``, ``"ring-frontend"``, ``"byte-ring"``, ``"xenbus-backend"``
    (``factory(client, path, platform, **timeouts)`` returning a ``BackendDriver``), or ``"command"``: a command
    line run as a separate process) or is ``""`` when the target takes no victim.  A
    function with a ``close()`` method holds resources (a victim process) until closed.
    """

    name: str
    description: str
    build: Callable[[Any], Callable[[bytes], None]]
    kind: str = ""


def load_victim(spec: str) -> Any:
    """Resolve ``"module:callable"`` or ``"path/file.py:callable"`` to the callable."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise LocalError(f"victim must be MODULE:CALLABLE or FILE.py:CALLABLE, not {spec!r}")
    if where.endswith(".py"):
        path = Path(where)
        mod_spec = importlib.util.spec_from_file_location(f"xenpv_victim_{path.stem}", path)
        if mod_spec is None or mod_spec.loader is None:
            raise LocalError(f"cannot load {where}")
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise LocalError(f"{where} has no {attr!r}") from None


def _guard(fn: Callable[[], object]) -> None:
    """Run ``fn``: a PeerError is the allowed outcome, anything else a violation."""
    try:
        fn()
    except PeerError:
        pass
    except InvariantViolation:
        raise
    except Exception as e:
        raise violation("hostile input produced something other than a PeerError", e) from None


def _accepted(fn: Callable[[], Any], oracle: Callable[[Any], None]) -> None:
    """Run validator ``fn``: a PeerError is a refusal; when it accepts, ``oracle`` checks
    its result against the spec (:mod:`xenpv.fuzz.oracles`); anything else is a violation."""
    try:
        result = fn()
    except PeerError:
        return
    except Exception as e:
        raise violation("hostile input produced something other than a PeerError", e) from None
    oracle(result)


# -- ring peers ------------------------------------------------------------------------------


def _ring_backend(name: str) -> Callable[[Any], Callable[[bytes], None]]:
    def build(victim: Any) -> Callable[[bytes], None]:
        factory = victim or RingBackend
        return lambda data: HostileFrontend(RING_SPECS[name], factory, ByteSource(data)).run()

    return build


def _ring_frontend(name: str) -> Callable[[Any], Callable[[bytes], None]]:
    def build(victim: Any) -> Callable[[bytes], None]:
        factory = victim or RingFrontend
        return lambda data: HostileBackend(RING_SPECS[name], factory, ByteSource(data)).run()

    return build


def _byte_ring(name: str) -> Callable[[Any], Callable[[bytes], None]]:
    def build(victim: Any) -> Callable[[bytes], None]:
        factory = victim or ByteRingVictim
        return lambda data: HostileProducer(BYTE_RING_SPECS[name], factory, ByteSource(data)).run()

    return build


# -- differential: both ring implementations on the same bytes --------------------------------


def _impls() -> list[Any]:
    from xenpv.rings import implementation

    try:
        return [implementation("reference"), implementation("cython")]
    except ImportError:  # the compiled core is not built: compare the reference with itself
        return [implementation("reference")] * 2


def _compare(impls: list[Any], play: Callable[[Any, bytearray, list[Any]], None], page: bytes,
             what: str) -> None:
    """Play the same steps on a copy of ``page`` with each implementation; all must agree."""
    outcomes = []
    for impl in impls:
        buf = bytearray(page)
        trace: list[Any] = []
        try:
            play(impl, buf, trace)
        except PeerError as e:
            trace.append(("peer", type(e).__name__))
        except LocalError as e:
            trace.append(("local", type(e).__name__))
        except Exception as e:
            raise violation(f"the {impl.name} ring raised", e) from None
        outcomes.append((trace, bytes(buf)))
    if outcomes[0] != outcomes[1]:
        raise violation(f"the cython and reference rings disagree on the same input ({what})")


def _step(trace: list[Any], fn: Callable[[], Any]) -> None:
    """Record one call's result or the kind of error it raised."""
    try:
        trace.append(fn())
    except PeerError as e:
        trace.append(("peer", type(e).__name__))
    except LocalError as e:
        trace.append(("local", type(e).__name__))


def _ring_diff(victim: Any) -> Callable[[bytes], None]:
    impls = _impls()

    def run(data: bytes) -> None:
        src = ByteSource(data)
        slot = src.choice((4, 8, 12, 16, 112, 148))
        page = src.take(64) + bytes(4096 - 64)  # the header from the input, slots zero
        start = src.u32()
        ops = [(src.below(7), src.choice((0, 8)), src.u32()) for _ in range(min(32, src.remaining))]

        def play(impl: Any, buf: bytearray, trace: list[Any]) -> None:
            back = impl.BackRing(buf, slot, start)
            front = impl.FrontRing(buf, slot, start, init=False)
            for op, off, value in ops:
                if op == 0:
                    _step(trace, lambda: back.take_requests(8))
                elif op == 1:
                    _step(trace, back.final_check_for_requests)
                elif op == 2:
                    _step(trace, lambda: front.take_responses(8))
                elif op == 3:
                    _step(trace, front.final_check_for_responses)
                elif op == 4:
                    _step(trace, lambda: back.submit_responses(bytes(back.pending_responses() * slot)))
                elif op == 5:
                    k = min(front.free_requests(), 3) if not front.broken else 0
                    _step(trace, partial(front.submit_requests, bytes([7]) * (k * slot)))
                else:  # the hostile peer stores a producer index between two calls
                    buf[off : off + 4] = value.to_bytes(4, "little")

        _compare(impls, play, page, f"slot {slot}, start {start}, ops {ops}")

    return run


def _bytering_diff(victim: Any) -> Callable[[bytes], None]:
    impls = _impls()
    specs = list(BYTE_RING_SPECS.values())

    def run(data: bytes) -> None:
        src = ByteSource(data)
        spec = src.choice(specs)
        on_insane = src.choice(("error", "zero"))
        page = bytearray(spec.page_size)
        for off in (spec.prod_offset, spec.cons_offset):
            page[off : off + 4] = src.take(4)
        ops = [(src.below(6), src.take(src.below(64)), src.u32()) for _ in range(min(32, src.remaining))]

        def play(impl: Any, buf: bytearray, trace: list[Any]) -> None:
            ring = impl.ByteRing(buf, data_offset=spec.data_offset, size=spec.size,
                                 prod_offset=spec.prod_offset, cons_offset=spec.cons_offset,
                                 slot=spec.slot, on_insane=on_insane)
            for op, chunk, value in ops:
                if op == 0:
                    _step(trace, partial(ring.write, chunk))
                elif op == 1:
                    _step(trace, partial(ring.read, value % 300))
                elif op == 2:
                    _step(trace, ring.available)
                elif op == 3:
                    _step(trace, ring.free)
                else:  # the hostile peer stores one of the two indexes
                    off = spec.prod_offset if op == 4 else spec.cons_offset
                    buf[off : off + 4] = value.to_bytes(4, "little")
            trace.append(("insane", ring.insane_count, ring.broken))

        _compare(impls, play, bytes(page), f"{spec.name} ring, on_insane={on_insane}, ops {ops}")

    return run


def _vchan_rings(victim: Any) -> Callable[[bytes], None]:
    """A hostile vchan client against the server side of ``xenpv.vchan.ring``, both cores."""
    classes = [vring.implementation("reference")]
    try:
        classes.append(vring.implementation("cython"))
    except ImportError:
        classes.append(classes[0])
    left, right = vchan.ring_placement(10, 11)  # in-page rings: server reads left, writes right
    assert left.offset is not None and right.offset is not None
    lo, ro = left.offset, right.offset
    index_offsets = (vchan.VCHAN_LEFT_CONS_OFFSET, vchan.VCHAN_LEFT_PROD_OFFSET,
                     vchan.VCHAN_RIGHT_CONS_OFFSET, vchan.VCHAN_RIGHT_PROD_OFFSET)

    def run(data: bytes) -> None:
        src = ByteSource(data)
        page = bytearray(4096)
        for off in index_offsets:
            page[off : off + 4] = src.take(4)
        page[vchan.VCHAN_CLI_LIVE_OFFSET : vchan.VCHAN_SRV_NOTIFY_OFFSET + 1] = src.take(4)
        ops = [(src.below(8), src.choice(index_offsets), src.u32(), src.take(src.below(48)))
               for _ in range(min(24, src.remaining))]

        def play(cls: Any, buf: bytearray, trace: list[Any]) -> None:
            mv = memoryview(buf)
            rings = cls(mv, mv[lo:], left.size, mv[ro:], right.size, is_server=True)
            out = bytearray(2048)
            for op, off, value, chunk in ops:
                if op == 0:
                    n = rings.recv_into(out, value % 3000)
                    if not 0 <= n <= left.size:
                        raise InvariantViolation(f"vchan recv_into returned {n} from a {left.size}-byte ring")
                    trace.append(bytes(out[:n]))
                elif op == 1:
                    n = rings.send(chunk)
                    if not 0 <= n <= min(len(chunk), right.size):
                        raise InvariantViolation(f"vchan send returned {n} for {len(chunk)} bytes")
                    trace.append(n)
                elif op == 2:
                    trace.append((rings.data_ready(), rings.buffer_space()))
                elif op == 3:
                    trace.append(rings.discard())
                elif op == 4:
                    trace.append(rings.peer_live())
                elif op == 5:  # the client writes into the ring the server reads
                    buf[lo + value % left.size] = value & 0xFF
                else:  # the client stores any index, the server's own included
                    buf[off : off + 4] = value.to_bytes(4, "little")
            trace.append((rings.broken is not None, rings.insane_count, rings.kick))
            rings.release()
            rings.release()

        impls = [SimpleNamespace(name=c.__module__, cls=c) for c in classes]
        _compare(impls, lambda impl, buf, trace: play(impl.cls, buf, trace), bytes(page),
                 f"vchan ops {ops}")

    return run


# -- request parsing ---------------------------------------------------------------------------


def _parse_blkif(victim: Any) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        src = ByteSource(data)
        abi = src.choice(list(blkif.ABI))
        slot = src.take(blkif.layouts(abi).ring.slot_size)

        def go() -> None:
            req = blkif.parse_request(slot, 0, abi)
            max_indirect, disk = src.below(4097), src.u32() or None
            try:
                blkif.validate_request(req, max_indirect_segments=max_indirect, disk_sectors=disk)
            except blkif.BlkifRequestError:
                return
            oracles.blkif_request(slot, abi, req, max_indirect_segments=max_indirect, disk_sectors=disk)
            if isinstance(req, blkif.BlkifRequestIndirect):
                pages: list[Any] = [src.take(4096) for _ in range(blkif.indirect_pages(req.nr_segments))]
                segs = blkif.parse_indirect_segments(pages, req.nr_segments)
                blkif.validate_segments(req, segs, 1 << 20)
                oracles.blkif_indirect_segments(pages, req.nr_segments, segs, req.sector_number, 1 << 20)

        _guard(go)
        rsp = src.take(blkif.layouts(abi).response.size)
        expected = src.below(8)
        _accepted(lambda: blkif.validate_response(blkif.BlkifResponse.parse(rsp, 0, abi), expected),
                  lambda _: oracles.blkif_response(rsp, expected))

    return run


def _parse_netif(victim: Any) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        src = ByteSource(data)
        count = 1 + src.below(40)
        slots = src.take(count * netif.TX_RING.slot_size)
        max_slots = 1 + src.below(30)
        _accepted(lambda: netif.parse_tx_packet(slots, count, max_slots=max_slots),
                  lambda pkt: oracles.netif_tx_packet(slots, count, pkt, max_slots=max_slots,
                                                      fatal_slots=netif.FATAL_SKB_SLOTS_DEFAULT))
        rx = src.take(8)
        _accepted(lambda: netif.validate_rx_response(netif.RxResponse.parse(rx)),
                  lambda n: oracles.netif_rx_response(rx, n))
        extra = src.take(8)
        _accepted(lambda: netif.validate_extra(netif.parse_extra(extra)),
                  lambda _: oracles.netif_extra(extra))

    return run


def _parse_kbdif(victim: Any) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        src = ByteSource(data)
        ev = src.take(kbdif.XENKBD_IN_EVENT_SIZE)
        width, height, contacts = src.u16(), src.u16(), src.u8()
        _accepted(lambda: kbdif.validate_in_event(kbdif.parse_in_event(ev), width=width,
                                                  height=height, num_contacts=contacts),
                  lambda _: oracles.kbdif_event(ev, width=width, height=height, num_contacts=contacts))

    return run


def _parse_usbif(victim: Any) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        src = ByteSource(data)
        req = src.take(usbif.URB_RING.slot_size)
        ports = src.below(40)
        _accepted(lambda: usbif.validate_urb_request(usbif.UrbRequest.parse(req), ports),
                  lambda _: oracles.usbif_urb_request(req, ports))
        conn = src.take(4)
        _accepted(lambda: usbif.validate_conn_response(usbif.ConnResponse.parse(conn)),
                  lambda _: oracles.usbif_conn_response(conn, usbif.USBIF_MAX_PORTNR))

    return run


def _parse_vchan(victim: Any) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        page = ByteSource(data).take(4096)

        def go() -> None:
            hdr = vchan.VchanInterface.parse(page)
            left, right = vchan.parse_grants(page, hdr.left_order, hdr.right_order)
            oracles.vchan_grants(page, left, right)
            placement = vchan.ring_placement(hdr.left_order, hdr.right_order)
            if len(left) != placement[0].pages or len(right) != placement[1].pages:
                raise InvariantViolation("vchan grant list does not match the ring placement")
            for prod, cons, ring in ((hdr.left_prod, hdr.left_cons, placement[0]),
                                     (hdr.right_prod, hdr.right_cons, placement[1])):
                if not 0 <= vchan.ring_avail(prod, cons, ring.size) <= ring.size:
                    raise InvariantViolation("vchan ring_avail out of range")
                if not 0 <= vchan.ring_space(prod, cons, ring.size) <= ring.size:
                    raise InvariantViolation("vchan ring_space out of range")

        _guard(go)

    return run


def _parse_xs_values(victim: Any) -> Callable[[bytes], None]:
    """Peer-written xenstore numbers and names read by the protocol modules (not xenbus keys)."""
    from xenpv.protocols import ProtocolError
    from xenpv.xenstore import values

    def grant_ref(raw: bytes) -> int:  # looked up on every call, so tests can patch it
        return values.parse_xs_number(raw, "grant-ref", lo=0, hi=0xFFFFFFFF, error=ProtocolError)

    def port(raw: bytes) -> int:
        return values.parse_xs_number(raw, "event-channel", lo=1, hi=(1 << 17) - 1,
                                      error=ProtocolError)

    checks: list[tuple[Callable[[bytes], Any], Callable[[bytes, Any], None]]] = [
        (grant_ref, lambda raw, v: oracles.xs_decimal(raw, v, 0, 0xFFFFFFFF, what="grant ref")),
        (port, lambda raw, v: oracles.xs_decimal(raw, v, 1, (1 << 17) - 1, what="event-channel")),
        (blkif.parse_virtual_device, oracles.xs_virtual_device),
        (blkif.abi_from_protocol, lambda raw, v: oracles.xs_protocol(raw, v, blkif.NATIVE_ABI)),
    ]

    def run(data: bytes) -> None:
        src = ByteSource(data)
        for _ in range(8):
            if src.remaining <= 0:
                break
            raw = src.take(src.below(24))
            parse, oracle = src.choice(checks)
            _accepted(partial(parse, raw), partial(oracle, raw))

    return run


def _parse_byte_indexes(victim: Any) -> Callable[[bytes], None]:
    """Peer-written index pairs of the byte rings: console, xenstore and vchan readers."""
    from xenpv.protocols import console, xsring

    orders = range(vchan.VCHAN_MIN_ORDER, vchan.VCHAN_MAX_ORDER + 1)

    def run(data: bytes) -> None:
        src = ByteSource(data)
        for _ in range(8):
            if src.remaining <= 0:
                break
            idx = console.ConsoleIndexes.parse(src.take(16))
            oracles.byte_ring_readable(idx.out_prod, idx.out_cons, console.XENCONS_OUT_SIZE,
                                       idx.out_pending())
            oracles.byte_ring_free(idx.in_prod, idx.in_cons, console.XENCONS_IN_SIZE, idx.in_space())
            prod, cons, size = src.u32(), src.u32(), 1 << src.choice(orders)
            oracles.byte_ring_readable(prod, cons, size, vchan.ring_avail(prod, cons, size))
            oracles.byte_ring_free(prod, cons, size, vchan.ring_space(prod, cons, size))
            _accepted(partial(xsring.ring_used, prod, cons),
                      partial(oracles.xenstore_ring_used, prod, cons))

    return run


# -- xenstore ----------------------------------------------------------------------------------

def _xenstore_wire(victim: Any) -> Callable[[bytes], None]:
    """Raw wire bytes from an unprivileged guest (and dom0) into the decoder and the store."""

    def run(data: bytes) -> None:
        src = ByteSource(data)
        store = Store(Quotas(nodes=20, watches=8, transactions=3, outstanding=4))
        store.introduce_domain(5)
        conns = [store.connect(5), store.connect(0)]
        decoders = [wire.Decoder(), wire.Decoder()]
        broken = [False, False]
        for who, raw in hostile_xs_chunks(src):
            if broken[who]:
                continue
            try:
                decoders[who].feed(raw)
                for msg in decoders[who]:
                    reply = store.handle(conns[who], msg.type, msg.req_id, msg.tx_id, msg.payload)
                    _rtype, rid, rtx, length = wire.HEADER.unpack_from(reply)
                    if length != len(reply) - 16 or length > wire.PAYLOAD_MAX:
                        raise InvariantViolation(f"malformed reply {reply[:32]!r}")
                    if (rid, rtx) != (msg.req_id, msg.tx_id):
                        raise InvariantViolation("reply does not echo req_id/tx_id")
            except wire.WireError:
                broken[who] = True  # the connection is dropped; the store must stay sound
            except InvariantViolation:
                raise
            except Exception as e:
                raise violation("the xenstore server raised", e) from None
            for c in conns:
                c.events.clear()
            problems = store.check()
            if problems:
                raise InvariantViolation(f"store accounting broken: {problems[:3]}")
        for c in conns:
            store.disconnect(c)

    return run


def _xenstore_model(victim: Any) -> Callable[[bytes], None]:
    """An operation list against the store and the reference model, compared after each."""
    from xenpv.fuzz.xsmodel import CONNS, PATHS, PERM_SETS, WATCH_PATHS, XsHarness

    conns = sorted(CONNS)
    ops = ["read", "dir", "getperms", "mkdir", "rm"]

    def run(data: bytes) -> None:
        src = ByteSource(data)
        h = XsHarness()
        h.homes()
        for _ in range(48):
            if src.remaining <= 0:
                break
            conn, kind = src.choice(conns), src.below(9)
            if kind == 0:
                h.op(conn, src.boolean(), "write", src.choice(PATHS), src.take(src.below(7)))
            elif kind == 1:
                h.op(conn, src.boolean(), src.choice(ops), src.choice(PATHS))
            elif kind == 2:
                h.op(conn, src.boolean(), "setperms", src.choice(PATHS), src.choice(PERM_SETS))
            elif kind == 3:
                h.watch(conn, src.choice(WATCH_PATHS), src.choice(("t1", "t2")))
            elif kind == 4:
                h.unwatch(conn, src.choice(WATCH_PATHS), src.choice(("t1", "t2")))
            elif kind == 5:
                h.start(conn)
            elif kind == 6 and h.txs:
                h.end(src.choice(sorted(h.txs)), src.boolean())
            elif kind == 7 and any(h.touched(c) for c in h.txs):
                # From outside, on a node an open transaction touched (write, rm, chmod).
                owner = src.choice([c for c in sorted(h.txs) if h.touched(c)])
                path, act = src.choice(h.touched(owner)), src.below(3)
                if path == "/" or act == 0:
                    h.op(conn, False, "write", path if path != "/" else "/a", src.take(2))
                elif act == 1:
                    h.op(conn, False, "rm", path)
                else:
                    h.op(conn, False, "setperms", path, src.choice(PERM_SETS))
            else:
                h.round_trip()
            h.same_tree_and_counts()

    return run


def _blocking_client(victim: Any) -> Callable[[bytes], None]:
    from xenpv.fuzz.xsclient import blocking_client

    return blocking_client()


def _async_client(victim: Any) -> Callable[[bytes], None]:
    from xenpv.fuzz.xsclient import async_client

    return async_client()


def _xenbus_driver(victim: Any) -> Callable[[bytes], None]:
    from xenpv.fuzz.xenbus_driver import DriverTarget

    return DriverTarget(victim)


def _kbd_driver(side: str) -> Callable[[Any], Callable[[bytes], None]]:
    def build(victim: Any) -> Callable[[bytes], None]:
        from xenpv.fuzz.kbd_driver import KbdDriverTarget

        return KbdDriverTarget(side)

    return build


def _vchan_process(victim: Any) -> Callable[[bytes], None]:
    from xenpv.fuzz.vchan_process import VchanProcess

    return VchanProcess(victim)


def _loopback_exhaustion(victim: Any) -> Callable[[bytes], None]:
    from xenpv.fuzz.exhaustion import DaemonExhaustion

    return DaemonExhaustion()


def _blkback_driver(victim: Any) -> Callable[[bytes], None]:
    from xenpv.fuzz.block_driver import BlkbackTarget

    return BlkbackTarget()


def _blkfront_driver(victim: Any) -> Callable[[bytes], None]:
    from xenpv.fuzz.block_driver import BlkfrontTarget

    return BlkfrontTarget()


def _netback_driver(victim: Any) -> Callable[[bytes], None]:
    from xenpv.fuzz.net_driver import NetbackTarget

    return NetbackTarget()


def _netfront_driver(victim: Any) -> Callable[[bytes], None]:
    from xenpv.fuzz.net_driver import NetfrontTarget

    return NetfrontTarget()


def _make_targets() -> dict[str, Target]:
    out: list[Target] = []
    for name, spec in RING_SPECS.items():
        out.append(Target(f"ring-backend:{name}", f"hostile frontend vs a backend: {spec.description}",
                          _ring_backend(name), "ring-backend"))
        out.append(Target(f"ring-frontend:{name}", f"hostile backend vs a frontend: {spec.description}",
                          _ring_frontend(name), "ring-frontend"))
    for name, bspec in BYTE_RING_SPECS.items():
        out.append(Target(f"bytering:{name}", f"hostile producer vs the consumer: {bspec.description}",
                          _byte_ring(name), "byte-ring"))
    out += [
        Target("ring-diff", "bytes -> ring page -> both ring implementations, compared", _ring_diff),
        Target("bytering-diff", "bytes -> byte-ring page -> both byte-ring implementations, compared",
               _bytering_diff),
        Target("vchan:rings", "hostile vchan client vs the server's ring code (both cores, compared)",
               _vchan_rings),
        Target("parse:blkif", "blkif request slots (3 ABIs) and indirect pages: parse + validate",
               _parse_blkif),
        Target("parse:netif", "netif TX slot chains, RX responses, extra-info: parse + validate",
               _parse_netif),
        Target("parse:kbdif", "kbdif in-ring events: parse + validate", _parse_kbdif),
        Target("parse:usbif", "usbif urb requests and conn responses: parse + validate", _parse_usbif),
        Target("parse:vchan", "vchan control page: header, orders, grant list, ring indexes",
               _parse_vchan),
        Target("parse:xs-values", "peer-written xenstore numbers and names: grant refs, ports, "
               "virtual-device, protocol", _parse_xs_values),
        Target("parse:byte-indexes", "byte-ring index pairs: console, xenstore and vchan readers",
               _parse_byte_indexes),
        Target("xenstore:wire", "raw xenstore wire bytes -> decoder -> embedded server dispatch",
               _xenstore_wire),
        Target("xenstore:process", "hostile guest connection vs a xenstore server process "
               "(victim: a command with {dom0} and {guest} socket placeholders)",
               lambda victim: XenstoredProcess(victim), "command"),
        Target("vchan:process", "hostile vchan client via the emulator vs a vchan server process "
               "(victim: a command with {domid} {path} {socket}; default xenpv vchan-proxy)",
               _vchan_process, "command"),
        Target("xenstore:model", "operation lists against the store and a naive reference model",
               _xenstore_model),
        Target("xenstore:blocking-client", "hostile xenstore server vs the blocking client "
               "(replies, errors, watch events, floods, garbage, hang-ups)", _blocking_client),
        Target("xenstore:async-client", "hostile xenstore server vs the asyncio client "
               "(the same plans as xenstore:blocking-client)", _async_client),
        Target("xenbus:machine", "hostile xenbus peer: state sequences and garbage vs both machines",
               lambda victim: drive_machine),
        Target("xenbus:keys", "hostile connect-time keys (ring-ref, event-channel, orders, queues)",
               lambda victim: parse_keys),
        Target("loopback:exhaustion", "hostile guest vs the loopback daemon's resources: many "
               "connections, huge lengths, share/frame/port floods, xenstore connections and "
               "cache-busting reads; dom0 still answered, descriptors and memory bounded",
               _loopback_exhaustion),
        Target("xenbus:driver", "hostile frontend domain via xenstore vs an asyncio backend driver "
               "(embedded xenstored + emulator; victim: a BackendDriver factory)",
               _xenbus_driver, "xenbus-backend"),
        Target("kbdfront:driver", "hostile backend (ring events, in_prod, floods, keys) vs "
               "our keyboard frontend, in a connected pair", _kbd_driver("frontend")),
        Target("kbdback:driver", "hostile frontend (in_cons, floods, garbage keys, state "
               "cycles) vs our keyboard backend while it sends input", _kbd_driver("backend")),
        Target("blkback:driver", "hostile frontend vs the real block backend (request handler "
               "and ring service over an image): fuzzed requests, indexes, revoked grants, "
               "floods", _blkback_driver),
        Target("blkfront:driver", "hostile backend domain vs the real block frontend (fuzzed "
               "features, answers, ids, statuses, indexes, floods, silence)", _blkfront_driver),
        Target("netback:driver", "hostile frontend vs a real net backend queue (TX and RX "
               "handlers and ring services): fuzzed chains, extras, indexes, RX pages, "
               "frames to the guest, revoked grants, floods", _netback_driver),
        Target("netfront:driver", "hostile backend domain vs the real net frontend (fuzzed "
               "features, TX/RX answers, ids, offsets, extras, indexes, floods, silence)",
               _netfront_driver),
    ]
    return {t.name: t for t in out}


TARGETS: dict[str, Target] = _make_targets()


def get_target(name: str, victim: str | Any | None = None) -> Callable[[bytes], None]:
    """The input function of target ``name``, attacking ``victim`` (a factory or its spec)."""
    try:
        target = TARGETS[name]
    except KeyError:
        raise LocalError(f"unknown fuzz target {name!r} (see 'xenpv fuzz --list')") from None
    if isinstance(victim, str) and target.kind != "command":
        victim = load_victim(victim)
    if victim is not None and not target.kind:
        raise LocalError(f"target {name} takes no victim")
    return target.build(victim)


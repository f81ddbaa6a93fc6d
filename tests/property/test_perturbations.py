"""Valid inputs perturbed one field at a time, at both edges, for every field and element.

Each spec draws a *valid* input (blkif read/write requests in every ABI, kbdif positions
and multi-touch events, netif TX chains, usbif urbs, vchan orders, xenbus keys), then
:func:`~xenpv.fuzz.strategies.edge_cases` sets one field — every segment's sectors, every
fragment's offset and size, every coordinate, not only the first — to ``min - 1``,
``min``, ``max`` and ``max + 1`` of its valid range with the others as they are.  Inside
the range the validator must accept and the acceptance oracle must hold; outside it the
validator must refuse with the peer error (and the status or errno it carries).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.fuzz import oracles
from xenpv.fuzz.strategies import Edge, EdgeSpec, Fields, edge_cases
from xenpv.protocols import ProtocolError, blkif, kbdif, netif, usbif, vchan
from xenpv.xenbus import keys
from xenpv.xenbus.states import BadKeyError

U8, U16, I16, I32, U64 = (0, 0xFF), (0, 0xFFFF), (-0x8000, 0x7FFF), (-(1 << 31), (1 << 31) - 1), (0, (1 << 64) - 1)
DISK = 4096


def _run(spec: EdgeSpec, check: Callable[[Edge], None]) -> Callable[[Fields], None]:
    """A test body: every edge case of one drawn valid input, each checked; all fields seen."""

    def body(fields: Fields) -> None:
        cases = list(edge_cases(spec, fields))
        assert {c.field for c in cases} == set(spec.bounds(fields))
        for case in cases:
            check(case)

    return body


# -- blkif read/write: nr_segments, every segment's first/last sector, the disk range ------------


@st.composite
def _blk_valid(draw: st.DrawFn) -> Fields:
    nr = draw(st.integers(1, blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST))
    f = {"op": draw(st.sampled_from([blkif.BLKIF_OP_READ, blkif.BLKIF_OP_WRITE])), "nr": nr}
    for k in range(blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST):  # unused slots valid too: nr may grow
        last = draw(st.integers(0, 7))
        f[f"seg{k}.first"], f[f"seg{k}.last"] = draw(st.integers(0, last)), last
    f["sector"] = draw(st.integers(0, DISK - 8 * blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST))
    return f


def _blk_total(f: Fields) -> int:
    return sum(f[f"seg{k}.last"] - f[f"seg{k}.first"] + 1 for k in range(f["nr"]))


def _blk_bounds(f: Fields) -> dict[str, tuple[int, int]]:
    b = {"nr": (1, blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST), "sector": (0, DISK - _blk_total(f))}
    for k in range(f["nr"]):
        b[f"seg{k}.first"] = (0, f[f"seg{k}.last"])
        b[f"seg{k}.last"] = (f[f"seg{k}.first"], blkif.SECTORS_PER_PAGE - 1)
    return b


BLK = EdgeSpec("blkif rw", _blk_valid(), _blk_bounds,
               lambda name: U64 if name == "sector" else U8)


@pytest.mark.parametrize("abi", list(blkif.ABI), ids=lambda a: a.value)
@settings(max_examples=40, deadline=None)
@given(fields=BLK.valid)
def test_blkif_segments_at_both_edges(abi: blkif.ABI, fields: Fields) -> None:
    def check(e: Edge) -> None:
        f = e.fields
        segs = tuple((100 + k, f[f"seg{k}.first"], f[f"seg{k}.last"])
                     for k in range(blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST))
        raw = blkif.layouts(abi).request.pack((f["op"], f["nr"], 0, 77, f["sector"], segs))
        req = blkif.parse_request(raw, 0, abi)
        if e.inside:
            blkif.validate_request(req, disk_sectors=DISK)
            oracles.blkif_request(raw, abi, req, disk_sectors=DISK)
        else:
            with pytest.raises(blkif.BlkifRequestError) as exc:
                blkif.validate_request(req, disk_sectors=DISK)
            assert (exc.value.id, exc.value.status) == (77, blkif.BLKIF_RSP_ERROR), e

    _run(BLK, check)(fields)


# -- kbdif: both coordinates of POS and multi-touch, contact ids, orientation -------------------

W, H, CONTACTS = 800, 600, 10
KINDS = ["pos", "down", "motion", "orient"]


@st.composite
def _kbd_valid(draw: st.DrawFn) -> Fields:
    return {"kind": draw(st.sampled_from(KINDS)),
            "x": draw(st.integers(0, W)), "y": draw(st.integers(0, H)),
            "contact": draw(st.integers(0, CONTACTS - 1)), "orientation": draw(st.integers(-180, 180))}


def _kbd_bounds(f: Fields) -> dict[str, tuple[int, int]]:
    if f["kind"] == "pos":
        return {"x": (0, W), "y": (0, H)}
    if f["kind"] == "orient":
        return {"contact": (0, CONTACTS - 1), "orientation": (-180, 180)}
    return {"x": (0, W), "y": (0, H), "contact": (0, CONTACTS - 1)}


KBD = EdgeSpec("kbdif", _kbd_valid(), _kbd_bounds,
               lambda name: {"contact": U8, "orientation": I16}.get(name, I32))


def _kbd_event(f: Fields) -> bytes:
    kind = f["kind"]
    if kind == "pos":
        return kbdif.Position(kbdif.XENKBD_TYPE_POS, f["x"], f["y"]).pack()
    if kind == "orient":
        return kbdif.MTouchOrient(kbdif.XENKBD_TYPE_MTOUCH, kbdif.XENKBD_MT_EV_ORIENT, f["contact"],
                                  f["orientation"]).pack()
    sub = kbdif.XENKBD_MT_EV_DOWN if kind == "down" else kbdif.XENKBD_MT_EV_MOTION
    return kbdif.MTouchPos(kbdif.XENKBD_TYPE_MTOUCH, sub, f["contact"], f["x"], f["y"]).pack()


@settings(max_examples=150, deadline=None)
@given(fields=KBD.valid)
def test_kbdif_events_at_both_edges(fields: Fields) -> None:
    def check(e: Edge) -> None:
        raw = _kbd_event(e.fields)
        ev = kbdif.parse_in_event(raw)
        if e.inside:
            kbdif.validate_in_event(ev, width=W, height=H, num_contacts=CONTACTS)
            oracles.kbdif_event(raw, width=W, height=H, num_contacts=CONTACTS)
        else:
            with pytest.raises(ProtocolError):
                kbdif.validate_in_event(ev, width=W, height=H, num_contacts=CONTACTS)

    _run(KBD, check)(fields)


# -- netif TX chains: the total and every fragment's offset and size -----------------------------

PAGE = 4096


@st.composite
def _net_valid(draw: st.DrawFn) -> Fields:
    n = draw(st.integers(1, 6))
    first = draw(st.integers(1, PAGE))
    f = {"n": n, "off0": draw(st.integers(0, PAGE - first))}
    for k in range(1, n):
        size = draw(st.integers(0, PAGE))
        f[f"size{k}"], f[f"off{k}"] = size, draw(st.integers(0, PAGE - size))
    f["total"] = first + sum(f[f"size{k}"] for k in range(1, n))
    return f


def _net_bounds(f: Fields) -> dict[str, tuple[int, int]]:
    n, total, off0 = f["n"], f["total"], f["off0"]
    rest = sum(f[f"size{k}"] for k in range(1, n))
    b = {"total": (max(1, rest), min(0xFFFF, rest + PAGE - off0)), "off0": (0, PAGE - (total - rest))}
    for k in range(1, n):
        others = rest - f[f"size{k}"]
        # the first fragment is total - rest: it must stay >= 0 and inside its page
        b[f"size{k}"] = (max(0, off0 + total - PAGE - others), min(PAGE - f[f"off{k}"], total - others))
        b[f"off{k}"] = (0, PAGE - f[f"size{k}"])
    return b


NET = EdgeSpec("netif tx", _net_valid(), _net_bounds, lambda name: U16)


@settings(max_examples=80, deadline=None)
@given(fields=NET.valid)
def test_netif_fragments_at_both_edges(fields: Fields) -> None:
    def check(e: Edge) -> None:
        f, n = e.fields, e.fields["n"]
        reqs = [netif.TxRequest(8 + k, f[f"off{k}"], netif.NETTXF_more_data if k < n - 1 else 0, k,
                                f["total"] if k == 0 else f[f"size{k}"]) for k in range(n)]
        blob = b"".join(r.pack().ljust(netif.TX_RING.slot_size, b"\0") for r in reqs)
        if e.inside:
            pkt = netif.parse_tx_packet(blob, n)
            oracles.netif_tx_packet(blob, n, pkt, max_slots=netif.XEN_NETIF_NR_SLOTS_MIN,
                                    fatal_slots=netif.FATAL_SKB_SLOTS_DEFAULT)
            assert pkt is not None and pkt.slots == n
        else:
            with pytest.raises((netif.NetifPacketError, netif.NetifFatalError)) as exc:
                netif.parse_tx_packet(blob, n)
            if isinstance(exc.value, netif.NetifPacketError):  # answered slot by slot
                assert (exc.value.slots, exc.value.ids) == (n, tuple(range(n))), e

    _run(NET, check)(fields)


# -- usbif urbs: the port, every segment's offset and length, the buffer length ----------------

PORTS = 8


@st.composite
def _usb_valid(draw: st.DrawFn) -> Fields:
    n = draw(st.integers(1, usbif.USBIF_MAX_SEGMENTS_PER_REQUEST))
    f = {"n": n, "port": draw(st.integers(1, PORTS))}
    for k in range(n):
        length = draw(st.integers(0, 4000))
        f[f"seg{k}.len"], f[f"seg{k}.off"] = length, draw(st.integers(0, PAGE - length))
    held = sum(f[f"seg{k}.len"] for k in range(n))
    f["buffer_length"] = draw(st.integers(held, 0xFFFF))
    return f


def _usb_bounds(f: Fields) -> dict[str, tuple[int, int]]:
    held = sum(f[f"seg{k}.len"] for k in range(f["n"]))
    b = {"port": (1, PORTS), "buffer_length": (held, 0xFFFF)}
    for k in range(f["n"]):
        b[f"seg{k}.off"] = (0, PAGE - f[f"seg{k}.len"])
        b[f"seg{k}.len"] = (0, min(PAGE - f[f"seg{k}.off"], f["buffer_length"] - (held - f[f"seg{k}.len"])))
    return b


USB = EdgeSpec("usbif urb", _usb_valid(), _usb_bounds, lambda name: (0, 31) if name == "port" else U16)


@settings(max_examples=60, deadline=None)
@given(fields=USB.valid)
def test_usbif_segments_at_both_edges(fields: Fields) -> None:
    def check(e: Edge) -> None:
        f = e.fields
        pipe = usbif.Pipe(f["port"], False, True, 2, 1, usbif.USBIF_PIPE_TYPE_BULK).encode()
        segs = tuple(usbif.UsbSegment(8 + k, f[f"seg{k}.off"], f[f"seg{k}.len"]) for k in range(f["n"]))
        raw = usbif.UrbRequest(1, f["n"], pipe, 0, f["buffer_length"], bytes(8), segs).pack()
        req = usbif.UrbRequest.parse(raw)
        if e.inside:
            usbif.validate_urb_request(req, PORTS)
            oracles.usbif_urb_request(raw, PORTS)
        else:
            with pytest.raises(ProtocolError):
                usbif.validate_urb_request(req, PORTS)

    _run(USB, check)(fields)


# -- vchan ring orders, each side -----------------------------------------------------------------


VCHAN = EdgeSpec(
    "vchan orders",
    st.fixed_dictionaries({"left": st.integers(12, 18), "right": st.integers(12, 18)}),
    lambda f: {"left": (vchan.VCHAN_MIN_ORDER, vchan.VCHAN_MAX_ORDER),
               "right": (vchan.VCHAN_MIN_ORDER, vchan.VCHAN_MAX_ORDER)},
    lambda name: U16,
)


@settings(max_examples=30, deadline=None)
@given(fields=VCHAN.valid)
def test_vchan_orders_at_both_edges(fields: Fields) -> None:
    def check(e: Edge) -> None:
        page = bytearray(PAGE)
        struct.pack_into("<HH", page, 16, e.fields["left"], e.fields["right"])
        struct.pack_into("<512I", page, 24, *range(1000, 1512))
        if e.inside:
            left, right = vchan.parse_grants(page, e.fields["left"], e.fields["right"])
            oracles.vchan_grants(bytes(page), left, right)
        else:
            with pytest.raises(ProtocolError):
                vchan.parse_grants(page, e.fields["left"], e.fields["right"])

    _run(VCHAN, check)(fields)


# -- xenbus connect-time keys: both bounds of every numeric key -----------------------------------

MAX_ORDER, MAX_QUEUES = 4, 8
KEY_PARSERS: list[tuple[str, Callable[[bytes], int], int, int]] = [
    ("ring-ref", keys.parse_grant_ref, keys.GRANT_REF_MIN, keys.GRANT_REF_MAX),
    ("event-channel", keys.parse_port, 1, keys.EVTCHN_PORT_MAX),
    ("ring-page-order", lambda raw: keys.parse_ring_page_order(raw, MAX_ORDER), 0, MAX_ORDER),
    ("multi-queue-num-queues", lambda raw: keys.parse_num_queues(raw, MAX_QUEUES), 1, MAX_QUEUES),
]


@pytest.mark.parametrize("key,parse,lo,hi", KEY_PARSERS, ids=[k[0] for k in KEY_PARSERS])
def test_xenbus_keys_at_both_edges(key: str, parse: Callable[[bytes], int], lo: int, hi: int) -> None:
    spec = EdgeSpec(key, st.nothing(), lambda f: {"value": (lo, hi)}, lambda name: (0, 1 << 40))
    for e in edge_cases(spec, {"value": lo}):
        raw = str(e.value).encode()
        if e.inside:
            oracles.xs_canonical_uint(raw, parse(raw), lo, hi, what=key)
        else:
            with pytest.raises(BadKeyError) as exc:
                parse(raw)
            assert exc.value.errno == errno.ERANGE, (key, raw)

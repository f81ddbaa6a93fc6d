"""netif TX packet assembly and slot checks, RX response checks, extra-info validation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.errors import LocalError, PeerError
from xenpv.protocols import ProtocolError, netif
from xenpv.protocols.netif import (
    NetifFatalError,
    NetifPacketError,
    NETTXF_extra_info,
    NETTXF_more_data,
    TxRequest,
)

SLOT = netif.TX_RING.slot_size


def slots(*items: netif.TxRequest | netif.AnyExtra) -> bytes:
    return b"".join(i.pack().ljust(SLOT, b"\0") for i in items)


def chain(sizes: list[int], *, offset: int = 0, total: int | None = None) -> list[TxRequest]:
    reqs = []
    for k, size in enumerate(sizes):
        more = NETTXF_more_data if k < len(sizes) - 1 else 0
        reqs.append(TxRequest(100 + k, offset, more, k, size))
    first = reqs[0]
    reqs[0] = TxRequest(first.gref, first.offset, first.flags, first.id, sum(sizes) if total is None else total)
    return reqs


def test_single_and_multi_slot_packets() -> None:
    pkt = netif.parse_tx_packet(slots(TxRequest(5, 64, 0, 1, 1500)), 1)
    assert pkt is not None and pkt.slots == 1 and pkt.size == 1500
    assert pkt.fragments == (netif.Fragment(5, 64, 1500),)
    reqs = chain([1000, 4096, 200])
    pkt = netif.parse_tx_packet(slots(*reqs), 3)
    assert pkt is not None
    assert [f.length for f in pkt.fragments] == [1000, 4096, 200] and pkt.size == 5296


def test_extras_precede_fragments_and_chain_by_more() -> None:
    first = TxRequest(5, 0, NETTXF_extra_info | NETTXF_more_data, 1, 3000)
    gso = netif.GsoExtra(netif.XEN_NETIF_EXTRA_TYPE_GSO, netif.XEN_NETIF_EXTRA_FLAG_MORE, 1448, 1, 0)
    mcast = netif.McastExtra(netif.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, 0, bytes(6))
    frag = TxRequest(6, 0, 0, 2, 1000)
    buf = slots(first, gso, mcast, frag)
    pkt = netif.parse_tx_packet(buf, 4)
    assert pkt is not None and pkt.slots == 4 and pkt.extras == (gso, mcast)
    assert [f.length for f in pkt.fragments] == [2000, 1000]
    for partial in (1, 2, 3):  # the chain continues beyond what was consumed so far
        assert netif.parse_tx_packet(buf, partial) is None


def test_scenario_06_too_many_slots_is_fatal() -> None:
    reqs = chain([10] * 22)
    with pytest.raises(NetifFatalError, match=r"^packet uses more than 20 slots after the first$"):
        netif.parse_tx_packet(slots(*reqs), len(reqs))
    pkt = netif.parse_tx_packet(slots(*chain([10, 20])), 2)
    assert pkt is not None and [r.id for r in pkt.requests] == [0, 1]


def test_scenario_06_more_than_18_data_slots_drops_the_packet() -> None:
    reqs = chain([10] * 19)
    with pytest.raises(NetifPacketError) as exc:
        netif.parse_tx_packet(slots(*reqs), len(reqs))
    assert exc.value.slots == 19 and exc.value.ids == tuple(range(19))


def test_scenario_06_first_size_smaller_than_fragments_drops() -> None:
    reqs = chain([100, 500, 500], total=600)
    with pytest.raises(NetifPacketError):
        netif.parse_tx_packet(slots(*reqs), 3)


def test_scenario_06_zero_length_packet_drops() -> None:
    # hostile-inputs.md scenario 6: all-zero-length fragments are dropped (no zero-length
    # allocation), whether in one slot or a chain
    for reqs in ([TxRequest(5, 0, 0, 1, 0)], chain([0, 0, 0])):
        with pytest.raises(NetifPacketError) as exc:
            netif.parse_tx_packet(slots(*reqs), len(reqs))
        assert exc.value.slots == len(reqs)
    pkt = netif.parse_tx_packet(slots(*chain([1, 0])), 2)  # one byte: a packet, zero-size fragment or not
    assert pkt is not None and pkt.size == 1


def test_scenario_06_total_above_64k_drops() -> None:
    # `size` is a u16, so a packet claims at most 0xFFFF; fragments adding up to more drop it
    reqs = chain([4096] * 17, total=0xFFFF)
    with pytest.raises(NetifPacketError):
        netif.parse_tx_packet(slots(*reqs), 17)
    ok = chain([4096] * 15 + [4095], total=0xFFFF)
    pkt = netif.parse_tx_packet(slots(*ok), 16)
    assert pkt is not None and pkt.size == 0xFFFF and pkt.fragments[0].length == 4096


def test_scenario_06_fragment_crossing_its_page_is_fatal() -> None:
    with pytest.raises(NetifFatalError):
        netif.parse_tx_packet(slots(TxRequest(5, 4000, 0, 1, 200)), 1)
    with pytest.raises(NetifFatalError):
        netif.check_slot(1, 4096)
    netif.check_slot(0, 4096)


def test_bad_extra_is_fatal() -> None:
    first = TxRequest(5, 0, NETTXF_extra_info, 1, 100)
    for bad, text in (
        (netif.ExtraInfo(netif.XEN_NETIF_EXTRA_TYPE_NONE, 0), "extra-info type 0 invalid"),
        (netif.ExtraInfo(netif.XEN_NETIF_EXTRA_TYPE_MAX, 0), "extra-info type 5 invalid"),
        (netif.GsoExtra(netif.XEN_NETIF_EXTRA_TYPE_GSO, 0, 1448, 7, 0), "GSO type 7 unknown"),
        (netif.GsoExtra(netif.XEN_NETIF_EXTRA_TYPE_GSO, 0x80, 1448, 1, 0), "extra-info flags 0x80 unknown"),
    ):
        with pytest.raises(NetifFatalError, match=f"^netif {text}$"):
            netif.parse_tx_packet(slots(first, bad), 2)


def test_endless_extra_chain_is_bounded() -> None:
    first = TxRequest(5, 0, NETTXF_extra_info, 1, 100)
    more = netif.HashExtra(netif.XEN_NETIF_EXTRA_TYPE_HASH, netif.XEN_NETIF_EXTRA_FLAG_MORE, 0, 1, 0)
    with pytest.raises(NetifFatalError):
        netif.parse_tx_packet(slots(first, *([more] * 40)), 41)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=SLOT, max_size=SLOT * 30), fatal=st.integers(1, 25))
def test_hostile_tx_slots_only_raise_peer_errors_and_stay_bounded(data: bytes, fatal: int) -> None:
    count = len(data) // SLOT
    try:
        pkt = netif.parse_tx_packet(data, count, fatal_slots=fatal)
    except PeerError:
        return
    if pkt is not None:
        assert pkt.slots <= count and len(pkt.requests) <= fatal + 1
        assert sum(f.length for f in pkt.fragments) == pkt.size <= netif.XEN_NETIF_MAX_TX_SIZE
        assert all(f.offset + f.length <= 4096 for f in pkt.fragments)


def test_scenario_15_rx_response_checks() -> None:
    assert netif.validate_rx_response(netif.RxResponse(1, 100, 0, 1400)) == 1400
    assert netif.validate_rx_response(netif.RxResponse(1, 0, 0, netif.NETIF_RSP_DROPPED)) == 0
    with pytest.raises(ProtocolError):
        netif.validate_rx_response(netif.RxResponse(1, 4000, 0, 200))
    with pytest.raises(ProtocolError):
        netif.validate_rx_response(netif.RxResponse(1, 0, 0, -7))


def test_ring_sizes_and_limits() -> None:
    assert (netif.NET_TX_RING_SIZE, netif.NET_RX_RING_SIZE, netif.NET_CTRL_RING_SIZE) == (256, 256, 128)
    assert netif.XEN_NETIF_NR_SLOTS_MIN == 18 and netif.XEN_NETIF_MAX_TX_SIZE == 0xFFFF
    assert netif.TxResponse.LAYOUT.size == 4 and netif.TX_RING.slot_size == 12


def test_rx_response_edges() -> None:
    """A zero-byte response is data (0 bytes), not an error status; data may end exactly at
    the page's end but not one byte past it; a negative status other than ERROR/DROPPED
    is a protocol error naming the response."""
    rx = netif.RxResponse
    assert netif.validate_rx_response(rx(3, 100, 0, 0)) == 0
    assert netif.validate_rx_response(rx(3, 0, 0, 4096)) == 4096
    assert netif.validate_rx_response(rx(3, 4000, 0, 96)) == 96
    with pytest.raises(ProtocolError, match=r"^netif rx response 3: offset 4000 \+ 97 > page$"):
        netif.validate_rx_response(rx(3, 4000, 0, 97))
    for status in (netif.NETIF_RSP_ERROR, netif.NETIF_RSP_DROPPED):
        assert netif.validate_rx_response(rx(3, 4095, 0, status)) == 0
    with pytest.raises(ProtocolError, match=r"^netif rx response 3: unknown status -3$"):
        netif.validate_rx_response(rx(3, 0, 0, -3))


def test_tx_chain_limits_at_their_edges_and_the_refusals_text() -> None:
    """18 data slots are a packet, 19 are dropped (every consumed slot named); 5 chained
    extras pass, a 6th is fatal; a GSO size of 1 passes, 0 is fatal; each refusal says
    what was wrong."""
    pkt = netif.parse_tx_packet(slots(*chain([10] * 18)), 18)
    assert pkt is not None and pkt.slots == 18 and len(pkt.fragments) == 18
    with pytest.raises(NetifPacketError, match=r"^packet uses 19 data slots \(> 18\)$"):
        netif.parse_tx_packet(slots(*chain([10] * 19)), 19)
    with pytest.raises(NetifPacketError, match=r"^fragments \(65536\) exceed packet size 65535$") as exc:
        netif.parse_tx_packet(slots(*chain([4096] * 17, total=0xFFFF)), 17)
    assert exc.value.slots == 17 and exc.value.ids == tuple(range(17))
    with pytest.raises(NetifPacketError, match=r"^packet of 0 bytes$"):
        netif.parse_tx_packet(slots(TxRequest(5, 0, 0, 1, 0)), 1)
    with pytest.raises(NetifFatalError, match=r"^fragment offset 4000 [+] size 200 crosses the page$"):
        netif.parse_tx_packet(slots(TxRequest(5, 4000, 0, 1, 200)), 1)
    first = TxRequest(5, 0, NETTXF_extra_info, 1, 100)

    def extras(k: int) -> list[netif.HashExtra]:
        more = netif.XEN_NETIF_EXTRA_FLAG_MORE
        return [netif.HashExtra(netif.XEN_NETIF_EXTRA_TYPE_HASH, more if i < k - 1 else 0, 0, 1, 0)
                for i in range(k)]  # fmt: skip

    pkt = netif.parse_tx_packet(slots(first, *extras(5)), 6)
    assert pkt is not None and len(pkt.extras) == 5
    with pytest.raises(NetifFatalError, match=r"^too many chained extra-info slots$"):
        netif.parse_tx_packet(slots(first, *extras(6)), 7)
    gso = netif.GsoExtra(netif.XEN_NETIF_EXTRA_TYPE_GSO, 0, 1, 1, 0)
    assert netif.parse_tx_packet(slots(first, gso), 2) is not None
    with pytest.raises(NetifFatalError, match=r"^netif GSO size 0$"):
        netif.parse_tx_packet(slots(first, netif.GsoExtra(netif.XEN_NETIF_EXTRA_TYPE_GSO, 0, 0, 1, 0)), 2)
    with pytest.raises(LocalError, match=r"^parse_tx_packet needs at least one slot$"):
        netif.parse_tx_packet(b"", 0)
    with pytest.raises(LocalError, match=r"^netif_extra_info: buffer too short at -16$"):
        netif.parse_extra(bytes(64), -16)


@st.composite
def _tx_chain(draw: st.DrawFn) -> bytes:
    """One chain of data slots, half of them plain, half bent by one field (a length
    before the total is summed: an empty or runt fragment in a chain that adds up)."""
    n = draw(st.sampled_from([1, 2, 2, 3, 18, 19, 21]))
    later = draw(st.lists(st.sampled_from([0, 14, 60, 1500, 3996, 3996]), min_size=n - 1,
                          max_size=n - 1))
    lengths = [draw(st.sampled_from([14, 60, 1500, 3996])), *later]
    offsets = draw(st.lists(st.sampled_from([0, 0, 100]), min_size=n, max_size=n))
    bend = draw(st.booleans())
    field = draw(st.sampled_from([1, 2, 4, 4]))  # offset, flags, size (twice)
    k_bent = draw(st.one_of(st.just(0), st.integers(0, n - 1)))
    value = draw(st.sampled_from({1: [4000, 4096, 0xFFFF], 2: [0, 8, 12, 0xFFFF],
                                  4: [0, 1, 13, 4000, 0xFFFF]}[field]))
    if bend and field == 4:
        lengths[k_bent] = value
    total = sum(lengths) + draw(st.sampled_from([0, 0, 0, 0, -1, 1, 60000]))
    flags = draw(st.sampled_from([0, 1, 2, 3]))
    reqs = [[draw(st.integers(0, 2**32 - 1)), offsets[k], flags if k == 0 else 0,
             draw(st.integers(0, 0xFFFF)), lengths[k]] for k in range(n)]
    reqs[0][4] = total & 0xFFFF
    for k in range(n - 1):
        reqs[k][2] |= NETTXF_more_data
    if bend and field != 4:
        reqs[k_bent][field] = value
    out = [netif.pack_tx_request(*r).ljust(SLOT, b"\0") for r in reqs]
    if draw(st.integers(0, 2)) == 0:  # a GSO record (or a bent one) after the first slot
        out[0] = netif.pack_tx_request(*reqs[0][:2], reqs[0][2] | NETTXF_extra_info,
                                       *reqs[0][3:]).ljust(SLOT, b"\0")
        typ = draw(st.sampled_from([1, 1, 1, 2, 4, 0]))
        eflags = draw(st.sampled_from([0, 0, 0, 1, 2]))
        gso_type = draw(st.sampled_from([1, 2, 2, 0, 3]))
        gso_size = draw(st.sampled_from([1448, 1448, 0, 0xFFFF]))
        out.insert(1, bytes([typ, eflags]) + gso_size.to_bytes(2, "little") +
                   bytes([gso_type, 0]) + draw(st.binary(min_size=6, max_size=6)))
    return b"".join(out)


@st.composite
def _tx_slots(draw: st.DrawFn) -> tuple[bytes, int]:
    """Slots that hold plain chains (and every way of not being one), or noise."""
    if draw(st.integers(0, 4)):
        raw = b"".join(draw(st.lists(_tx_chain(), max_size=8)))
    else:
        raw = draw(st.binary(max_size=SLOT * 40))
    count = len(raw) // SLOT
    return raw + draw(st.binary(max_size=SLOT)), draw(st.sampled_from(
        [count, count, count, max(count - 1, 0), max(count - 3, 0)]))


@settings(max_examples=300, deadline=None)
@given(_tx_slots(), st.integers(1, 20), st.integers(1, 22), st.sampled_from([True, True, False]),
       st.sampled_from([0, 1, 2, 3, 3]))
def test_compiled_tx_scan_matches_its_twin(batch: tuple[bytes, int], max_slots: int,
                                           fatal: int, sg: bool, gso: int) -> None:
    """The compiled TX scan takes exactly the plain chains the readable twin (built on
    parse_tx_packet) takes, GSO records of the offered types included, with the same
    fields, and stops where it stops."""
    from xenpv.protocols import _netscan  # built by setup.py: missing is a failure

    raw, count = batch
    twin = netif.scan_tx_reference(raw, count, max_slots=max_slots, fatal_slots=fatal, sg=sg,
                                   gso=gso)
    assert _netscan.scan_tx(raw, count, max_slots, fatal, sg, gso) == twin
    assert netif.scan_tx(raw, count, max_slots=max_slots, fatal_slots=fatal, sg=sg,
                         gso=gso) == twin


def test_tx_scan_takes_plain_chains_and_stops_at_the_first_other() -> None:
    """Two plain chains (one slot; three slots with scatter-gather) are taken with their
    ids and fragments; the scan stops at a chain with extra-info, and without
    scatter-gather at the multi-slot chain; a runt, an incomplete chain and a fragment
    crossing its page stop it too."""
    one = TxRequest(9, 64, 1, 3, 60)
    multi = chain([100, 4096, 20], offset=0)
    extra = TxRequest(1, 0, NETTXF_extra_info, 4, 60)
    raw = slots(one, *multi, extra, TxRequest(0, 0, 0, 0, 0))
    got = netif.scan_tx(raw, 6)
    assert got == [(1, 60, 1, (3,), ((9, 64, 60),), (0, 0)),
                   (NETTXF_more_data, 4216, 3, (0, 1, 2),
                    ((100, 0, 100), (101, 0, 4096), (102, 0, 20)), (0, 0))]
    assert netif.scan_tx(raw, 6, sg=False) == got[:1]
    assert netif.scan_tx(raw, 3) == got[:1]  # the second chain is not complete
    assert netif.scan_tx(slots(TxRequest(9, 0, 0, 3, 13)), 1) == []
    assert netif.scan_tx(slots(TxRequest(9, 4000, 0, 3, 97)), 1) == []
    assert netif.scan_tx(slots(*chain([100, 4096, 20])), 3, max_slots=2) == []
    assert netif.scan_tx(slots(*chain([100, 0, 20])), 3) == []  # an empty fragment
    assert netif.scan_tx(slots(*chain([13, 100])), 2) == []  # a header split over slots
    assert netif.scan_tx(slots(*chain([100, 4096, 20]), one), 4, fatal_slots=1) == []
    # a chain with one GSO record: taken only for an offered type, the record's slot
    # counted in the slots used but not among the ids
    big = chain([1000, 4096, 4096])
    big[0] = TxRequest(big[0].gref, 0, big[0].flags | NETTXF_extra_info, 0, big[0].size)
    for kind, mask in ((1, netif.SCAN_GSO_TCPV4), (2, netif.SCAN_GSO_TCPV6)):
        gso = netif.GsoExtra(netif.XEN_NETIF_EXTRA_TYPE_GSO, 0, 1448, kind, 0)
        raw = slots(big[0], gso, *big[1:], one)
        assert netif.scan_tx(raw, 5) == []  # no GSO offered: the full check answers it
        assert netif.scan_tx(raw, 5, gso=3 ^ mask) == []
        assert netif.scan_tx(raw, 5, gso=mask) == [
            (NETTXF_extra_info | NETTXF_more_data, 9192, 4, (0, 1, 2),
             ((100, 0, 1000), (101, 0, 4096), (102, 0, 4096)), (kind, 1448)),
            (1, 60, 1, (3,), ((9, 64, 60),), (0, 0))]
        assert netif.scan_tx(raw, 3, gso=mask) == []  # incomplete
        more = netif.GsoExtra(netif.XEN_NETIF_EXTRA_TYPE_GSO, 1, 1448, kind, 0)
        assert netif.scan_tx(slots(big[0], more, *big[1:]), 4, gso=3) == []  # a second extra


def test_pure_python_switch_turns_the_tx_scan_to_its_twin(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """XENPV_PURE_PYTHON=1 makes the TX scan use its readable twin, as every module with a
    compiled twin does (xenpv.compiled); otherwise the built extension serves."""
    from xenpv.protocols import _netscan  # built by setup.py: missing is a failure

    monkeypatch.setenv("XENPV_PURE_PYTHON", "1")
    assert netif._compiled_scan() is None
    monkeypatch.setenv("XENPV_PURE_PYTHON", "0")
    assert netif._compiled_scan() is _netscan.scan_tx

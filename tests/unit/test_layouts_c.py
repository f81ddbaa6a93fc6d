"""xenpv's protocol layouts and constants against Xen's own headers, compiled by a C compiler.

Every record layout in :mod:`xenpv.protocols` that names a C type is checked member by
member (offset, size, signedness) and as a whole (sizeof) against libxen-dev's headers
compiled with cffi; every integer and string macro of the headers' protocol families must
exist in the matching xenpv module with the same value; ring slot counts are compared with
``__CONST_RING_SIZE``.  The x86_32 blkif ABI is compiled for i386 (``gcc -m32``) and, as a
cross-check, with ``#pragma pack(4)`` in an x86-64 compile (i386 aligns u64 to 4).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest
import xenheaders

from xenpv.protocols import (
    blkif,
    console,
    kbdif,
    netif,
    usbif,
    vchan,
    xsring,
)
from xenpv.protocols.layout import Layout, RingLayout

HEADERS = [
    "xen/xen.h",
    "xen/grant_table.h",
    "xen/event_channel.h",
    "xen/io/ring.h",
    "xen/io/protocols.h",
    "xen/io/blkif.h",
    "xen/io/netif.h",
    "xen/io/console.h",
    "xen/io/kbdif.h",
    "xen/io/xs_wire.h",
    "xen/io/usbif.h",
    "xen/io/libxenvchan.h",
]
PRELUDE = "".join(f"#include <{h}>\n" for h in HEADERS)

#: module -> (headers whose macros it mirrors, regex of the macro families it must have)
FAMILIES: dict[ModuleType, tuple[list[str], str]] = {
    blkif: (["xen/io/blkif.h", "xen/io/protocols.h"], r"BLKIF_\w+|VDISK_\w+|XEN_IO_PROTO_ABI_\w+"),
    netif: (["xen/io/netif.h"], r"_?XEN_NETIF_\w+|_?NETTXF_\w+|_?NETRXF_\w+|NETIF_RSP_\w+"),
    kbdif: (["xen/io/kbdif.h"], r"XENKBD_\w+"),
    xsring: (["xen/io/xs_wire.h"], r"XENSTORE_\w+"),
    usbif: (["xen/io/usbif.h"], r"USBIF_\w+|USB_\w+_RING_SIZE"),
    vchan: (["xen/io/libxenvchan.h"], r"VCHAN_\w+"),
}
#: Constants that are C enumerators rather than macros.
ENUMERATORS: dict[ModuleType, list[str]] = {
    usbif: ["USB_VER_UNKNOWN", "USB_VER_USB11", "USB_VER_USB20", "USB_VER_USB30"],
}
#: Macros of a family that are not constants (an initialiser), or exist only when building
#: the hypervisor itself (``#ifdef __XEN__``).
NOT_CONSTANTS: set[str] = set()

#: Layouts whose record fills a 40-byte event slot: compared with the union's size.
SIZE_EXPR = {
    name: "sizeof(union xenkbd_in_event)"
    for name in (
        "xenkbd_motion",
        "xenkbd_key",
        "xenkbd_position",
        "xenkbd_mtouch.pos",
        "xenkbd_mtouch.shape",
        "xenkbd_mtouch.orientation",
        "xenkbd_mtouch.plain",
    )
}
#: Members xenpv decodes differently from their C type (u8[4] read as one LE u32).
NO_SIGN_CHECK = {("netif_extra_info.hash", "u.hash.value")}
#: One-element C arrays (``x[1]``, the start of a variable-length tail) xenpv reads as a scalar.
ARRAY_OF_ONE: set[tuple[str, str]] = set()

#: Offsets xenpv states as module constants -> the C expression they must equal.
OFFSET_CONSTANTS: dict[tuple[ModuleType, str], str] = {
    (console, "XENCONS_IN_OFFSET"): "offsetof(struct xencons_interface, in)",
    (console, "XENCONS_OUT_OFFSET"): "offsetof(struct xencons_interface, out)",
    (console, "XENCONS_IN_SIZE"): "sizeof(((struct xencons_interface *)0)->in)",
    (console, "XENCONS_OUT_SIZE"): "sizeof(((struct xencons_interface *)0)->out)",
    (console, "XENCONS_IN_CONS_OFFSET"): "offsetof(struct xencons_interface, in_cons)",
    (console, "XENCONS_IN_PROD_OFFSET"): "offsetof(struct xencons_interface, in_prod)",
    (console, "XENCONS_OUT_CONS_OFFSET"): "offsetof(struct xencons_interface, out_cons)",
    (console, "XENCONS_OUT_PROD_OFFSET"): "offsetof(struct xencons_interface, out_prod)",
    (console, "XENCONS_INTERFACE_SIZE"): "sizeof(struct xencons_interface)",
    (xsring, "XS_REQ_OFFSET"): "offsetof(struct xenstore_domain_interface, req)",
    (xsring, "XS_RSP_OFFSET"): "offsetof(struct xenstore_domain_interface, rsp)",
    (xsring, "XS_REQ_CONS_OFFSET"): "offsetof(struct xenstore_domain_interface, req_cons)",
    (xsring, "XS_REQ_PROD_OFFSET"): "offsetof(struct xenstore_domain_interface, req_prod)",
    (xsring, "XS_RSP_CONS_OFFSET"): "offsetof(struct xenstore_domain_interface, rsp_cons)",
    (xsring, "XS_RSP_PROD_OFFSET"): "offsetof(struct xenstore_domain_interface, rsp_prod)",
    (xsring, "XS_SERVER_FEATURES_OFFSET"): "offsetof(struct xenstore_domain_interface, server_features)",
    (xsring, "XS_CONNECTION_OFFSET"): "offsetof(struct xenstore_domain_interface, connection)",
    (xsring, "XS_ERROR_OFFSET"): "offsetof(struct xenstore_domain_interface, error)",
    (xsring, "XS_INTERFACE_SIZE"): "sizeof(struct xenstore_domain_interface)",
    (xsring, "XSD_SOCKMSG_SIZE"): "sizeof(struct xsd_sockmsg)",
    (vchan, "VCHAN_LEFT_CONS_OFFSET"): "offsetof(struct vchan_interface, left.cons)",
    (vchan, "VCHAN_LEFT_PROD_OFFSET"): "offsetof(struct vchan_interface, left.prod)",
    (vchan, "VCHAN_RIGHT_CONS_OFFSET"): "offsetof(struct vchan_interface, right.cons)",
    (vchan, "VCHAN_RIGHT_PROD_OFFSET"): "offsetof(struct vchan_interface, right.prod)",
    (vchan, "VCHAN_LEFT_ORDER_OFFSET"): "offsetof(struct vchan_interface, left_order)",
    (vchan, "VCHAN_RIGHT_ORDER_OFFSET"): "offsetof(struct vchan_interface, right_order)",
    (vchan, "VCHAN_CLI_LIVE_OFFSET"): "offsetof(struct vchan_interface, cli_live)",
    (vchan, "VCHAN_SRV_LIVE_OFFSET"): "offsetof(struct vchan_interface, srv_live)",
    (vchan, "VCHAN_CLI_NOTIFY_OFFSET"): "offsetof(struct vchan_interface, cli_notify)",
    (vchan, "VCHAN_SRV_NOTIFY_OFFSET"): "offsetof(struct vchan_interface, srv_notify)",
    (vchan, "VCHAN_GRANTS_OFFSET"): "offsetof(struct vchan_interface, grants)",
    (blkif, "BLKIF_SEGMENTS_PER_INDIRECT_FRAME"): "4096 / sizeof(struct blkif_request_segment)",
}

#: Layouts of a part of a C struct: (layout, the C struct, offset of the part in it).
EMBEDDED: list[tuple[Layout, str, int]] = [
    (console.INDEXES_LAYOUT, "struct xencons_interface", console.XENCONS_INDEXES_OFFSET),
    (xsring.CONTROL_LAYOUT, "struct xenstore_domain_interface", xsring.XS_REQ_CONS_OFFSET),
    (usbif.ISOC_LAYOUT, "struct usbif_urb_request", usbif.URB_REQUEST_LAYOUT.offsets["u"]),
]

#: (ring, C ring type name, pages)
RINGS: list[tuple[RingLayout, str, int]] = [
    *((blkif.LAYOUTS[blkif.ABI.X86_64].ring, "blkif", p) for p in (1, 2, 4, 8, 16)),
    (netif.TX_RING, "netif_tx", 1),
    (netif.RX_RING, "netif_rx", 1),
    (netif.CTRL_RING, "xen_netif_ctrl", 1),
    (usbif.URB_RING, "usbif_urb", 1),
    (usbif.CONN_RING, "usbif_conn", 1),
]


def _layouts() -> list[Layout]:
    seen: dict[int, Layout] = {}
    for mod in FAMILIES:
        for value in vars(mod).values():
            if isinstance(value, Layout) and value.c_type:
                seen.setdefault(id(value), value)
    for abi in (blkif.ABI.X86_64, blkif.ABI.ARM):
        lay = blkif.LAYOUTS[abi]
        for value in (lay.request, lay.discard, lay.indirect, lay.response):
            seen.setdefault(id(value), value)
    seen.setdefault(id(blkif.SEGMENT_LAYOUT), blkif.SEGMENT_LAYOUT)
    for value in (console.INTERFACE_LAYOUT, vchan.RING_SHARED_LAYOUT):
        seen.setdefault(id(value), value)
    return sorted(seen.values(), key=lambda lay: lay.name)


LAYOUTS = _layouts()


def member_queries(layout: Layout, ctype: str | None = None) -> dict[str, str]:
    """Queries for sizeof, and offset/size/signedness of every member, of one layout."""
    t = ctype or layout.c_type
    assert t is not None
    q = {f"{layout.name}|sizeof": SIZE_EXPR.get(layout.name, f"sizeof({t})")}
    for leaf in layout.leaves():
        member = f"(({t} *)0)->{leaf.c_path}"
        q[f"{layout.name}|off|{leaf.c_path}"] = f"offsetof({t}, {leaf.c_path})"
        q[f"{layout.name}|size|{leaf.c_path}"] = f"sizeof({member})"
        if leaf.code != "s" and (layout.name, leaf.c_path) not in NO_SIGN_CHECK:
            array = leaf.count > 1 or (layout.name, leaf.c_path) in ARRAY_OF_ONE
            elem = f"{member}[0]" if array else member
            q[f"{layout.name}|signed|{leaf.c_path}"] = f"((__typeof__({elem}))-1 < 0)"
    return q


def check_members(layout: Layout, values: dict[str, int], size: int | None = None) -> None:
    """Assert every member of ``layout`` matches the compiled values."""
    assert values[f"{layout.name}|sizeof"] == (layout.size if size is None else size), layout.name
    for leaf in layout.leaves():
        key = f"{layout.name}|%s|{leaf.c_path}"
        assert values[key % "off"] == leaf.offset, f"{layout.name}.{leaf.c_path} offset"
        assert values[key % "size"] == leaf.size, f"{layout.name}.{leaf.c_path} size"
        if (key % "signed") in values:
            assert bool(values[key % "signed"]) == leaf.signed, f"{layout.name}.{leaf.c_path} sign"


def family_macros() -> dict[ModuleType, dict[str, str]]:
    """The macros of each module's families, as defined in the headers (name -> body)."""
    out: dict[ModuleType, dict[str, str]] = {}
    for mod, (headers, pattern) in FAMILIES.items():
        macros = xenheaders.defined_macros(xenheaders.header_text(*headers), pattern)
        out[mod] = {k: v for k, v in macros.items() if k not in NOT_CONSTANTS}
    return out


class Compiled:
    """Everything the tests compare, computed by one cffi compile of Xen's headers."""

    def __init__(self, tmpdir: Path) -> None:
        self.macros = family_macros()
        ints: dict[str, str] = {}
        strs: dict[str, str] = {}
        for layout in LAYOUTS:
            ints.update(member_queries(layout))
        for mod, macros in self.macros.items():
            for name, body in macros.items():
                is_str = body.startswith('"') or isinstance(getattr(mod, name, None), str)
                (strs if is_str else ints)[f"{mod.__name__}|{name}"] = name
        for mod, names in ENUMERATORS.items():
            ints.update({f"{mod.__name__}|{n}": n for n in names})
        for (mod, name), expr in OFFSET_CONSTANTS.items():
            ints[f"offset|{mod.__name__}|{name}"] = expr
        for layout, ctype, _base in EMBEDDED:
            ints.update(member_queries(layout, ctype))
        for _ring, cname, pages in RINGS:
            ints[f"ring|{cname}|{pages}"] = f"__CONST_RING_SIZE({cname}, {pages * 4096})"
            ints[f"slot|{cname}"] = f"sizeof(union {cname}_sring_entry)"
            ints[f"hdr|{cname}"] = f"offsetof(struct {cname}_sring, ring)"
        self.ints, self.strs = xenheaders.cffi_values(ints, strs, PRELUDE, tmpdir)


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    """One compile of all queries per session."""
    return Compiled(tmp_path_factory.mktemp("xenheaders"))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_record_layout_matches_xen_headers(layout: Layout, compiled: Compiled) -> None:
    check_members(layout, compiled.ints)


@pytest.mark.parametrize("mod", list(FAMILIES), ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_header_constant_exists_with_the_same_value(mod: ModuleType, compiled: Compiled) -> None:
    macros = compiled.macros[mod]
    assert len(macros) >= 2, f"no macros discovered for {mod.__name__}"
    missing = [name for name in macros if not hasattr(mod, name)]
    assert not missing, f"{mod.__name__} lacks {missing}"
    for name in macros:
        key = f"{mod.__name__}|{name}"
        expected: int | str = compiled.strs[key] if key in compiled.strs else compiled.ints[key]
        assert getattr(mod, name) == expected, name
    for name in ENUMERATORS.get(mod, []):
        assert getattr(mod, name) == compiled.ints[f"{mod.__name__}|{name}"], name


@pytest.mark.parametrize("part", EMBEDDED, ids=lambda e: e[0].name)
def test_partial_layouts_match_their_place_in_the_c_struct(
    part: tuple[Layout, str, int], compiled: Compiled
) -> None:
    layout, _ctype, base = part
    for leaf in layout.leaves():
        key = f"{layout.name}|%s|{leaf.c_path}"
        assert compiled.ints[key % "off"] == base + leaf.offset, leaf.c_path
        assert compiled.ints[key % "size"] == leaf.size, leaf.c_path
        assert bool(compiled.ints[key % "signed"]) == leaf.signed, leaf.c_path


@pytest.mark.parametrize("key", list(OFFSET_CONSTANTS), ids=lambda k: k[1])
def test_offset_constants_match_xen_headers(key: tuple[ModuleType, str], compiled: Compiled) -> None:
    mod, name = key
    assert getattr(mod, name) == compiled.ints[f"offset|{mod.__name__}|{name}"]


@pytest.mark.parametrize("ring", RINGS, ids=lambda r: f"{r[1]}-{r[2]}")
def test_ring_geometry_matches_const_ring_size(ring: tuple[RingLayout, str, int], compiled: Compiled) -> None:
    layout, cname, pages = ring
    assert layout.nr_ents(pages) == compiled.ints[f"ring|{cname}|{pages}"]
    assert layout.slot_size == compiled.ints[f"slot|{cname}"]
    assert compiled.ints[f"hdr|{cname}"] == 64


def test_kbd_and_vchan_geometry_constants(compiled: Compiled) -> None:
    # derived constants are compared above as macros; check the slot helpers agree with them
    assert kbdif.in_slot_offset(kbdif.XENKBD_IN_RING_LEN) == kbdif.XENKBD_IN_RING_OFFS
    assert kbdif.out_slot_offset(26) == kbdif.XENKBD_OUT_RING_OFFS + kbdif.XENKBD_OUT_EVENT_SIZE
    assert compiled.ints[f"{kbdif.__name__}|XENKBD_IN_RING_LEN"] == 51
    assert vchan.INTERFACE_LAYOUT.size == compiled.ints["offset|xenpv.protocols.vchan|VCHAN_GRANTS_OFFSET"]


# -- x86_32 blkif ABI ------------------------------------------------------------------------

BLKIF_32 = blkif.LAYOUTS[blkif.ABI.X86_32]
BLKIF_32_LAYOUTS = [BLKIF_32.request, BLKIF_32.discard, BLKIF_32.indirect, BLKIF_32.response]


def _blkif32_queries() -> dict[str, str]:
    q: dict[str, str] = {}
    for layout in BLKIF_32_LAYOUTS:
        q.update(member_queries(layout))
    for pages in (1, 2, 4, 8, 16):
        q[f"ring|{pages}"] = f"__CONST_RING_SIZE(blkif, {pages * 4096})"
    q["slot"] = "sizeof(union blkif_sring_entry)"
    return q


def test_blkif_x86_32_abi_matches_i386_compile(tmp_path: Path) -> None:
    """Xen's blkif.h compiled for i386 (``-m32 -ffreestanding``: no 32-bit libc needed)."""
    # gcc targets i386 without a 32-bit libc (``-ffreestanding -S``); a compiler that cannot
    # is a broken test environment, not a reason to pass.
    assert xenheaders.m32_supported(tmp_path), "C compiler without i386 code generation"
    values = xenheaders.asm_values(
        _blkif32_queries(), "#include <xen/io/blkif.h>\n", tmp_path, m32=True, name="blkif32"
    )
    for layout in BLKIF_32_LAYOUTS:
        check_members(layout, values)
    for pages in (1, 2, 4, 8, 16):
        assert BLKIF_32.ring.nr_ents(pages) == values[f"ring|{pages}"]
    assert BLKIF_32.ring.slot_size == values["slot"] == 108


def test_blkif_x86_32_abi_matches_pack4_compile(tmp_path: Path) -> None:
    """The same headers in an x86-64 compile with u64 alignment forced to 4 (i386's rule)."""
    prelude = "#pragma pack(push, 4)\n#include <xen/io/blkif.h>\n#pragma pack(pop)\n"
    values = xenheaders.asm_values(_blkif32_queries(), prelude, tmp_path, m32=False, name="blkif_pack4")
    for layout in BLKIF_32_LAYOUTS:
        # i386 blkif.h adds an explicit u64 `pad` to the indirect request (`#ifdef __i386__`),
        # which an x86-64 compile does not see: 56 bytes there, 64 on i386 and in xenpv.
        size = 56 if layout is BLKIF_32.indirect else None
        check_members(layout, values, size)
    assert BLKIF_32.indirect.padding()[-1] == (56, 8)
    for pages in (1, 2, 4, 8, 16):
        assert BLKIF_32.ring.nr_ents(pages) == values[f"ring|{pages}"]


#: Device protocols whose layout does not depend on the guest ABI (only blkif's does).
ABI_NEUTRAL = (netif, kbdif, console, xsring, usbif, vchan)


def test_other_device_layouts_are_the_same_on_i386(tmp_path: Path) -> None:
    """netif, kbdif, console, xenstore, usbif and vchan records compiled for i386 match too."""
    assert xenheaders.m32_supported(tmp_path), "C compiler without i386 code generation"
    layouts = [lay for lay in LAYOUTS if any(lay in vars(m).values() for m in ABI_NEUTRAL)]
    assert len(layouts) >= 20
    queries: dict[str, str] = {}
    for layout in layouts:
        queries.update(member_queries(layout))
    prelude = "".join(f"#include <{h}>\n" for h in HEADERS if "/io/" in h)
    # libxenvchan.h includes <sys/types.h>, which a freestanding i386 compile lacks; it
    # needs nothing from it for the structs checked here.
    stub = tmp_path / "stub"
    (stub / "sys").mkdir(parents=True)
    (stub / "sys" / "types.h").write_text("/* stand-in for a freestanding compile */\n")
    values = xenheaders.asm_values(
        queries, prelude, tmp_path, m32=True, name="neutral32", extra_includes=(stub,)
    )
    for layout in layouts:
        check_members(layout, values)


def test_header_macro_discovery_sees_known_names() -> None:
    macros = family_macros()
    assert {"BLKIF_OP_INDIRECT", "XEN_IO_PROTO_ABI_X86_32"} <= set(macros[blkif])
    assert re.fullmatch(r'"[^"]+"', macros[blkif]["XEN_IO_PROTO_ABI_ARM"])


def test_platform_constants_match_the_headers(tmp_path: Path) -> None:
    """The grant and event-channel facts the platforms use (``platforms/base.py``) are
    Xen's: every ``GNTST_*`` status, every ``EVTCHNSTAT_*`` state, the reserved refs and
    ``DOMID_SELF``."""
    from xenpv.platforms import base

    queries = {f"GNTST_{m.name}": f"GNTST_{m.name}" for m in base.GntSt}
    queries |= {f"EVTCHNSTAT_{m.name}": f"EVTCHNSTAT_{m.name}" for m in base.EvtchnState}
    queries |= {"GNTTAB_NR_RESERVED_ENTRIES": "GNTTAB_NR_RESERVED_ENTRIES",
                "DOMID_SELF": "DOMID_SELF"}
    values = xenheaders.asm_values(queries, PRELUDE, tmp_path, m32=False, name="platform")
    ours = {f"GNTST_{m.name}": m.value for m in base.GntSt}
    ours |= {f"EVTCHNSTAT_{m.name}": m.value for m in base.EvtchnState}
    ours |= {"GNTTAB_NR_RESERVED_ENTRIES": base.GNTTAB_NR_RESERVED_ENTRIES,
             "DOMID_SELF": base.DOMID_SELF}
    assert values == ours
    # and nothing of the header's families is missing from the enums
    text = xenheaders.header_text("xen/grant_table.h", "xen/event_channel.h")
    names = set(xenheaders.defined_macros(text, r"GNTST_\w+|EVTCHNSTAT_\w+"))
    assert names == {n for n in ours if n.startswith(("GNTST_", "EVTCHNSTAT_"))}

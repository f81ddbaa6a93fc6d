"""The replacement ``libxenforeignmemory.so.1``: dom0 maps guest frames of an emulated
domain (``xenforeignmemory_map``/``map2``/``unmap``/``restrict``), through the daemon's
FOREIGN_MAP, called through cffi exactly as xenconsoled and QEMU call it.

The guest (domain 1) allocates frames with the loopback client (FRAME_ALLOC); this
process then acts as dom0 with the library and checks contiguity in ``arr[]`` order,
that ``prot`` is honoured (the kernel's view of the mapping), per-frame ``err[]`` as
Xen's library fills it, the whole-call failures, and that the daemon lets go of every
mapping on unmap and on close.  A frame the guest also grants at reserved ref 0 (what
Xen's domain builder does for the console page) is one page whether dom0 maps the grant
with libxengnttab or the frame with libxenforeignmemory.
"""

from __future__ import annotations

import errno
import mmap
from collections.abc import Iterator
from typing import Any

import cffi
import pytest
from shim_peers import LoopbackRun

from xenpv.errors import PlatformError
from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.platforms.loopback.env import shim_dir

PAGE = 4096
MAP_FIXED = 0x10  # sys/mman.h, Linux x86-64

ffi = cffi.FFI()
ffi.cdef("""
void *xenforeignmemory_open(void *logger, unsigned open_flags);
int xenforeignmemory_close(void *fmem);
void *xenforeignmemory_map(void *fmem, uint32_t dom, int prot, size_t pages,
                           const unsigned long arr[], int err[]);
void *xenforeignmemory_map2(void *fmem, uint32_t dom, void *addr, int prot, int flags,
                            size_t pages, const unsigned long arr[], int err[]);
int xenforeignmemory_unmap(void *fmem, void *addr, size_t pages);
int xenforeignmemory_restrict(void *fmem, uint16_t domid);
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int mprotect(void *addr, size_t len, int prot);
void *xengnttab_open(void *logger, unsigned open_flags);
int xengnttab_close(void *xgt);
void *xengnttab_map_grant_ref(void *xgt, uint32_t domid, uint32_t ref, int prot);
int xengnttab_unmap(void *xgt, void *start_address, uint32_t count);
""")


@pytest.fixture(scope="module")
def run() -> Iterator[LoopbackRun]:
    """A daemon with domains 1 and 2."""
    r = LoopbackRun({1: "guest", 2: "other"})
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def guest(run: LoopbackRun) -> Iterator[ClientPlatform]:
    """Domain 1's own platform (it allocates the frames)."""
    p = ClientPlatform.for_domain(run.rundir, 1)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def dom0(run: LoopbackRun) -> Iterator[ClientPlatform]:
    """Dom0's platform, for the daemon's accounting (STATS)."""
    p = ClientPlatform.for_domain(run.rundir, 0)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def fm(run: LoopbackRun, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The library, with this process acting as dom0 for the handles it opens."""
    monkeypatch.setenv("XENPV_LOOPBACK_SOCKET", str(run.rundir / "dom0" / "control"))
    return ffi.dlopen(str(shim_dir() / "libxenforeignmemory.so.1"))


@pytest.fixture
def handle(fm: Any) -> Iterator[Any]:
    """An open handle (closed afterwards)."""
    h = fm.xenforeignmemory_open(ffi.NULL, 0)
    assert h != ffi.NULL, f"open failed: errno {ffi.errno}"
    try:
        yield h
    finally:
        fm.xenforeignmemory_close(h)


def mappings_of_dom0(dom0: ClientPlatform) -> int:
    """Mappings dom0 holds, as the daemon counts them (one per FOREIGN_MAP)."""
    return int(dom0.grants.stats(0)[2])


def protection(addr: Any, pages: int = 1) -> list[str]:
    """The kernel's permission strings (``rw-s`` …) for each page at ``addr``."""
    start = int(ffi.cast("uintptr_t", addr))
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            spans.append((lo, hi, line.split()[1]))
    out = []
    for i in range(pages):
        a = start + i * PAGE
        out.append(next(p for lo, hi, p in spans if lo <= a < hi))
    return out


def test_frames_map_contiguously_in_the_order_asked_and_both_sides_see_the_bytes(
        fm: Any, handle: Any, guest: ClientPlatform, dom0: ClientPlatform) -> None:
    frames = guest.grants.alloc_frames(3)
    for i in range(3):
        frames.mem[i * PAGE : i * PAGE + 6] = f"frame{i}".encode()
    order = [frames.refs[2], frames.refs[0], frames.refs[1]]
    err = ffi.new("int[3]", [7, 7, 7])
    addr = fm.xenforeignmemory_map(handle, 1, mmap.PROT_READ | mmap.PROT_WRITE, 3,
                                   ffi.new("unsigned long[]", order), err)
    assert addr != ffi.NULL, f"errno {ffi.errno}"
    assert list(err) == [0, 0, 0]
    buf = ffi.buffer(addr, 3 * PAGE)
    assert [bytes(buf[i * PAGE : i * PAGE + 6]) for i in range(3)] == [b"frame2", b"frame0",
                                                                        b"frame1"]
    assert protection(addr, 3) == ["rw-s"] * 3
    buf[PAGE : PAGE + 5] = b"dom0!"  # page 1 of the mapping is frame 0
    assert bytes(frames.mem[0:5]) == b"dom0!"
    assert mappings_of_dom0(dom0) == 1
    assert fm.xenforeignmemory_unmap(handle, addr, 3) == 0
    assert mappings_of_dom0(dom0) == 0
    guest.grants.free_frames(frames)


def test_read_only_prot_gives_a_read_only_mapping(
        fm: Any, handle: Any, guest: ClientPlatform, dom0: ClientPlatform) -> None:
    frames = guest.grants.alloc_frames(1)
    frames.mem[0:2] = b"ro"
    err = ffi.new("int[1]")
    addr = fm.xenforeignmemory_map(handle, 1, mmap.PROT_READ, 1,
                                   ffi.new("unsigned long[]", list(frames.refs)), err)
    assert addr != ffi.NULL
    assert protection(addr) == ["r--s"]
    assert bytes(ffi.buffer(addr, 2)) == b"ro"
    # the descriptor behind it was read-only: the kernel refuses write access
    libc = ffi.dlopen(None)
    assert libc.mprotect(addr, PAGE, mmap.PROT_READ | mmap.PROT_WRITE) == -1
    assert ffi.errno == errno.EACCES
    assert fm.xenforeignmemory_unmap(handle, addr, 1) == 0
    guest.grants.free_frames(frames)


def test_err_array_reports_each_frame_and_the_good_ones_are_mapped(
        fm: Any, handle: Any, guest: ClientPlatform, dom0: ClientPlatform) -> None:
    frames = guest.grants.alloc_frames(2)
    frames.mem[0:1] = b"A"
    frames.mem[PAGE : PAGE + 1] = b"B"
    missing = 0x7FFFFFF0
    arr = [frames.refs[0], missing, frames.refs[1], missing + 1, 1 << 40]
    err = ffi.new("int[5]")
    addr = fm.xenforeignmemory_map(handle, 1, mmap.PROT_READ | mmap.PROT_WRITE, 5,
                                   ffi.new("unsigned long[]", arr), err)
    assert addr != ffi.NULL
    assert list(err) == [0, -errno.EINVAL, 0, -errno.EINVAL, -errno.EINVAL]
    buf = ffi.buffer(addr, 5 * PAGE)
    assert (bytes(buf[0:1]), bytes(buf[2 * PAGE : 2 * PAGE + 1])) == (b"A", b"B")
    assert protection(addr, 5) == ["rw-s", "---p", "rw-s", "---p", "---p"]
    assert mappings_of_dom0(dom0) == 2  # one request per run of good frames
    assert fm.xenforeignmemory_unmap(handle, addr, 5) == 0
    assert mappings_of_dom0(dom0) == 0
    guest.grants.free_frames(frames)


def test_without_err_array_one_bad_frame_fails_the_whole_call(
        fm: Any, handle: Any, guest: ClientPlatform, dom0: ClientPlatform) -> None:
    frames = guest.grants.alloc_frames(2)
    arr = ffi.new("unsigned long[]", [frames.refs[0], frames.refs[1], 0x7FFFFFF0])
    addr = fm.xenforeignmemory_map(handle, 1, mmap.PROT_READ, 3, arr, ffi.NULL)
    assert addr == ffi.NULL and ffi.errno == errno.EINVAL
    assert mappings_of_dom0(dom0) == 0  # nothing left mapped on the daemon's side
    guest.grants.free_frames(frames)


def test_whole_call_failures(fm: Any, handle: Any, guest: ClientPlatform,
                             run: LoopbackRun, monkeypatch: pytest.MonkeyPatch) -> None:
    frames = guest.grants.alloc_frames(1)
    arr = ffi.new("unsigned long[]", list(frames.refs))
    err = ffi.new("int[1]")
    rw = mmap.PROT_READ | mmap.PROT_WRITE
    assert fm.xenforeignmemory_map(handle, 9, rw, 1, arr, err) == ffi.NULL
    assert ffi.errno == errno.ESRCH  # no such domain
    assert fm.xenforeignmemory_map(handle, 1, rw, 0, arr, err) == ffi.NULL
    assert ffi.errno == errno.EINVAL  # no pages
    # an unprivileged domain cannot map foreign frames
    monkeypatch.setenv("XENPV_LOOPBACK_SOCKET", str(run.rundir / "dom2" / "control"))
    h2 = fm.xenforeignmemory_open(ffi.NULL, 0)
    assert h2 != ffi.NULL
    try:
        assert fm.xenforeignmemory_map(h2, 1, rw, 1, arr, err) == ffi.NULL
        assert ffi.errno == errno.EPERM
    finally:
        fm.xenforeignmemory_close(h2)
    # a restricted handle maps only its domain
    assert fm.xenforeignmemory_restrict(handle, 2) == 0
    assert fm.xenforeignmemory_map(handle, 1, rw, 1, arr, err) == ffi.NULL
    assert ffi.errno == errno.EPERM
    guest.grants.free_frames(frames)


def test_map2_places_the_mapping_at_a_fixed_address(
        fm: Any, handle: Any, guest: ClientPlatform, dom0: ClientPlatform) -> None:
    frames = guest.grants.alloc_frames(2)
    frames.mem[PAGE : PAGE + 5] = b"fixed"
    libc = ffi.dlopen(None)
    spot = libc.mmap(ffi.NULL, 2 * PAGE, 0,  # PROT_NONE
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert int(ffi.cast("intptr_t", spot)) != -1
    err = ffi.new("int[2]")
    addr = fm.xenforeignmemory_map2(handle, 1, spot, mmap.PROT_READ, MAP_FIXED, 2,
                                    ffi.new("unsigned long[]", list(frames.refs)), err)
    assert addr == spot and list(err) == [0, 0]
    assert bytes(ffi.buffer(addr, 2 * PAGE)[PAGE : PAGE + 5]) == b"fixed"
    assert fm.xenforeignmemory_unmap(handle, addr, 2) == 0
    guest.grants.free_frames(frames)


def test_closing_the_handle_releases_its_mappings_and_freed_frames_stay_while_mapped(
        fm: Any, guest: ClientPlatform, dom0: ClientPlatform) -> None:
    h = fm.xenforeignmemory_open(ffi.NULL, 0)
    frames = guest.grants.alloc_frames(1)
    frames.mem[0:4] = b"kept"
    err = ffi.new("int[1]")
    addr = fm.xenforeignmemory_map(h, 1, mmap.PROT_READ, 1,
                                   ffi.new("unsigned long[]", list(frames.refs)), err)
    assert addr != ffi.NULL
    guest.grants.free_frames(frames)  # the guest lets go; dom0 still maps it
    assert bytes(ffi.buffer(addr, 4)) == b"kept"
    assert mappings_of_dom0(dom0) == 1
    fm.xenforeignmemory_close(h)
    assert mappings_of_dom0(dom0) == 0
    assert bytes(ffi.buffer(addr, 4)) == b"kept"  # the memory stays until munmapped
    ffi.dlopen(None).munmap(addr, PAGE)


def test_a_frame_granted_at_ref_0_is_one_page_as_grant_and_as_frame(
        fm: Any, handle: Any, guest: ClientPlatform, dom0: ClientPlatform) -> None:
    gt = ffi.dlopen(str(shim_dir() / "libxengnttab.so.1"))
    frames = guest.grants.alloc_frames(1)
    gfn = frames.refs[0]
    granted = guest.grants.grant_frame(gfn, 0, ref=0)
    assert granted.refs == (0,)
    with pytest.raises(PlatformError) as busy:
        guest.grants.grant_frame(gfn, 0, ref=0)
    assert busy.value.errno == errno.EBUSY
    rw = mmap.PROT_READ | mmap.PROT_WRITE
    xgt = gt.xengnttab_open(ffi.NULL, 0)
    assert xgt != ffi.NULL
    try:
        by_ref = gt.xengnttab_map_grant_ref(xgt, 1, 0, rw)
        assert by_ref != ffi.NULL, f"errno {ffi.errno}"
        err = ffi.new("int[1]")
        by_gfn = fm.xenforeignmemory_map(handle, 1, rw, 1, ffi.new("unsigned long[]", [gfn]),
                                         err)
        assert by_gfn != ffi.NULL and err[0] == 0
        frames.mem[0:5] = b"guest"
        assert bytes(ffi.buffer(by_ref, 5)) == b"guest"
        ffi.buffer(by_gfn, 5)[0:5] = b"frame"
        assert bytes(ffi.buffer(by_ref, 5)) == b"frame" and bytes(granted.mem[0:5]) == b"frame"
        assert gt.xengnttab_unmap(xgt, by_ref, 1) == 0
        # ending the grant leaves the frame, and freeing the frame leaves the mapping
        guest.grants.end_access(granted)
        guest.grants.free_frames(frames)
        assert bytes(ffi.buffer(by_gfn, 5)) == b"frame"
        assert fm.xenforeignmemory_unmap(handle, by_gfn, 1) == 0
        assert dom0.grants.stats(1)[0] == 0  # no grant of the guest is left
    finally:
        gt.xengnttab_close(xgt)


def test_granting_a_frame_is_refused_cleanly(guest: ClientPlatform, dom0: ClientPlatform) -> None:
    frames = guest.grants.alloc_frames(1)
    gfn = frames.refs[0]
    conn = guest.grants.connection

    def refused(gfn: int, ref: int, domid: int, flags: int) -> int:
        with pytest.raises(PlatformError) as exc:
            conn.call(proto.Op.GNT_GRANT_FRAME, proto.GRANT_FRAME_REQ.pack(gfn, ref, domid, flags))
        return int(exc.value.errno)

    assert refused(gfn + 1, 0, 0, proto.SHARE_WRITABLE) == errno.EINVAL  # not a frame
    assert refused(gfn, 0, 0, 0) == errno.EINVAL  # read-only
    assert refused(gfn, 5, 0, proto.SHARE_WRITABLE) == errno.EINVAL  # not a reserved ref
    assert refused(gfn, 0, 1, proto.SHARE_WRITABLE) == errno.EINVAL  # to itself
    assert refused(gfn, 0, 9, proto.SHARE_WRITABLE) == errno.ESRCH  # no such domain
    # dom0 cannot grant the guest's frame: frames are its own domain's only
    other = dom0.grants.connection
    with pytest.raises(PlatformError) as exc:
        other.call(proto.Op.GNT_GRANT_FRAME,
                   proto.GRANT_FRAME_REQ.pack(gfn, proto.ANY_REF, 1, proto.SHARE_WRITABLE))
    assert exc.value.errno == errno.EINVAL
    anywhere = guest.grants.grant_frame(gfn, 0)  # a free ref, not a reserved one
    assert anywhere.refs[0] >= 8
    guest.grants.end_access(anywhere)
    guest.grants.free_frames(frames)
    with pytest.raises(PlatformError):
        guest.grants.grant_frame(gfn, 0)  # released frames cannot be granted
    assert dom0.grants.stats(1)[0] == 0


def test_many_frames_map_in_one_call_though_each_frame_is_its_own_descriptor(
        fm: Any, handle: Any, guest: ClientPlatform, dom0: ClientPlatform) -> None:
    """hostile-inputs.md scenario 14 (a peer reaches only what it may): each guest frame
    is its own memfd, so 400 frames need more descriptors than one reply carries; the
    library splits the request after E2BIG and still returns one contiguous mapping."""
    allocs = [guest.grants.alloc_frames(200) for _ in range(2)]
    gfns = [g for a in allocs for g in a.refs]
    for a in allocs:
        for i in range(200):
            a.mem[i * PAGE : i * PAGE + 4] = (a.refs[i]).to_bytes(4, "little")
    err = ffi.new("int[]", len(gfns))
    addr = fm.xenforeignmemory_map(handle, 1, mmap.PROT_READ, len(gfns),
                                   ffi.new("unsigned long[]", gfns), err)
    assert addr != ffi.NULL, f"errno {ffi.errno}"
    assert set(err) == {0}
    buf = ffi.buffer(addr, len(gfns) * PAGE)
    assert [int.from_bytes(buf[i * PAGE : i * PAGE + 4], "little") for i in range(len(gfns))] \
        == gfns
    assert mappings_of_dom0(dom0) >= 2  # more than one FOREIGN_MAP behind the mapping
    assert fm.xenforeignmemory_unmap(handle, addr, len(gfns)) == 0
    assert mappings_of_dom0(dom0) == 0
    for a in allocs:
        guest.grants.free_frames(a)

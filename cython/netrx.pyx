# The net frontend's RX batch: one pass over the responses of a ring pass.
#
# The readable twin is xenpv.protocols.netif.scan_rx_reference (tests compare the two on
# arbitrary responses, posted pages and page contents): the same chains, checks, frames and
# error texts.  A chain is data responses joined by more_data, each followed by the
# extra-info slots its extra_info flag (then each record's MORE flag) announces; a data
# response carries its page's id, a known status and stays inside its page; an extra-info
# record has a type 1..4, no flag but MORE and, for GSO, a known type and a size; a chain
# uses at most MAX_CHAIN slots.  The scan stops after the last complete chain (the rest is
# continued in the next batch) or at a chain that breaks a rule (the error says which).

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int16_t, uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy

from includes.wire cimport le_u16, le_u32

cdef enum:
    RX_SLOT = 8
    PAGE_SIZE = 4096
    MORE_DATA = 4    # NETRXF_more_data
    EXTRA_INFO = 8   # NETRXF_extra_info
    FLAG_MORE = 1    # XEN_NETIF_EXTRA_FLAG_MORE
    TYPE_GSO = 1
    TYPE_HASH = 4
    TYPE_MAX = 5
    MAX_CHAIN = 23   # XEN_NETIF_NR_SLOTS_MIN + XEN_NETIF_EXTRA_TYPE_MAX
    RSP_ERROR = -1
    RSP_DROPPED = -2


def scan_rx(const uint8_t[::1] batch not None, Py_ssize_t count, posted,
            const uint8_t[::1] mem not None):
    """The frames of the complete chains at the start of ``count`` RX responses of
    ``batch``; ``posted[k]``: the page id at response ``k``'s ring slot, page ``id`` at
    ``id * 4096`` of ``mem``.  ``(frames, slots used, error or None)``, each frame
    ``(bytes or None, flags, gso type, gso size, hash value or None, hash type mask)``."""
    if count < 0 or count * RX_SLOT > batch.shape[0]:
        raise ValueError("batch too short for the slots")
    cdef list frames = []
    cdef Py_ssize_t npost = len(posted)
    cdef Py_ssize_t pos = 0, k, slots, idx, total, j, npieces
    cdef Py_ssize_t at[MAX_CHAIN]
    cdef Py_ssize_t length[MAX_CHAIN]
    cdef const uint8_t *p
    cdef uint16_t rid, offset, flags, gso_size
    cdef int16_t status
    cdef uint8_t rtype, rflags, gso_type, hash_type
    cdef uint32_t rss_value
    cdef int first, failed, more, extra, have_rss, rss_type
    cdef bytes data
    cdef char *out
    while pos < count:
        k = pos
        slots = 0
        npieces = 0
        total = 0
        failed = 0
        first = -1
        more = 0
        extra = 0
        gso_type = 0
        gso_size = 0
        have_rss = 0
        rss_value = 0
        rss_type = 0
        while True:
            if k >= count:
                return frames, pos, None  # continued in the next batch
            if k >= npost:
                return frames, pos, "an RX response without a posted page"
            idx = posted[k]
            slots += 1
            if slots > MAX_CHAIN:
                return frames, pos, f"an RX chain longer than {MAX_CHAIN} slots"
            p = &batch[k * RX_SLOT]
            k += 1
            if extra:
                rtype = p[0]
                rflags = p[1]
                if rtype == 0 or rtype >= TYPE_MAX:
                    return frames, pos, f"netif extra-info type {rtype} invalid"
                if rflags & ~FLAG_MORE:
                    return frames, pos, f"netif extra-info flags {rflags:#x} unknown"
                if rtype == TYPE_GSO:
                    if p[4] != 1 and p[4] != 2:
                        return frames, pos, f"netif GSO type {p[4]} unknown"
                    if le_u16(p + 2) == 0:
                        return frames, pos, "netif GSO size 0"
                    gso_type = p[4]
                    gso_size = le_u16(p + 2)
                elif rtype == TYPE_HASH and p[2] < 4:
                    have_rss = 1
                    rss_value = le_u32(p + 4)
                    rss_type = 1 << p[2]
                extra = rflags & FLAG_MORE
            else:
                rid = le_u16(p)
                offset = le_u16(p + 2)
                flags = le_u16(p + 4)
                status = <int16_t>le_u16(p + 6)
                if rid != idx:
                    return frames, pos, f"RX response id {rid} in the slot of page {idx}"
                if status < 0:
                    if status != RSP_ERROR and status != RSP_DROPPED:
                        return frames, pos, f"netif rx response {rid}: unknown status {status}"
                    failed = 1
                else:
                    if <Py_ssize_t>offset + status > PAGE_SIZE:
                        return frames, pos, (f"netif rx response {rid}: offset {offset} + "
                                             f"{status} > page")
                    if idx < 0 or (idx + 1) * PAGE_SIZE > mem.shape[0]:
                        raise ValueError(f"page {idx} is outside the pages")
                    at[npieces] = idx * PAGE_SIZE + offset
                    length[npieces] = status
                    npieces += 1
                    total += status
                if first < 0:
                    first = flags
                more = flags & MORE_DATA
                extra = flags & EXTRA_INFO
            if not more and not extra:
                break
        if failed or total == 0:
            frames.append((None, first, gso_type, gso_size,
                           rss_value if have_rss else None, rss_type))
        else:
            data = PyBytes_FromStringAndSize(NULL, total)
            out = PyBytes_AS_STRING(data)
            total = 0
            for j in range(npieces):
                if length[j]:
                    memcpy(out + total, &mem[at[j]], length[j])
                total += length[j]
            frames.append((data, first, gso_type, gso_size,
                           rss_value if have_rss else None, rss_type))
        pos = k
    return frames, pos, None

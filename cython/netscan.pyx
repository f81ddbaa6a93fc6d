# The net backend's batch accept: one pass over the TX slots of a ring pass.
#
# The readable twin is xenpv.protocols.netif.scan_tx_reference (tests compare the two on
# arbitrary slots).  Only plain chains are accepted here: no extra-info slot but one GSO
# record of a type the backend offered (``gso`` mask: 1 TCPv4, 2 TCPv6; flags 0, size not
# 0), every slot
# present, at most ``max_slots`` data slots (and never past the fatal bound), a size of at
# least an Ethernet header and at most the TX maximum, fragments that fit the size, a first
# fragment holding the Ethernet header, no empty later fragment, no fragment crossing its
# page, several slots only with scatter-gather.  The scan stops at the first chain that is
# not plain; the full Python validation answers that one.  So this can only make the common
# case cheaper, never accept more.

from libc.stdint cimport uint8_t, uint16_t, uint32_t

from includes.wire cimport le_u16, le_u32

cdef enum:
    TX_SLOT = 12
    MORE_DATA = 4
    EXTRA_INFO = 8
    EXTRA_GSO = 1
    ETH_HLEN = 14
    MAX_TX_SIZE = 0xFFFF
    PAGE_SIZE = 4096


def scan_tx(const uint8_t[::1] batch not None, Py_ssize_t count, Py_ssize_t max_slots,
            Py_ssize_t fatal_slots, bint sg, unsigned gso=0):
    """The plain chains at the start of ``count`` 12-byte TX slots in ``batch`` (a
    private copy), in order, up to the first chain that is not plain: for each,
    ``(flags, size, slots, ids, ((gref, offset, length), ...), (gso type, gso size))``
    (``(0, 0)`` without a GSO record)."""
    if count < 0 or count * TX_SLOT > batch.shape[0]:
        raise ValueError("batch too short for the slots")
    cdef list out = []
    cdef Py_ssize_t pos = 0, n, k, limit, extras
    cdef const uint8_t *base
    cdef const uint8_t *ex
    cdef uint16_t flags, size, length, offset, gso_size
    cdef uint8_t gso_type
    cdef uint32_t rest
    cdef bint ok
    limit = max_slots if max_slots < fatal_slots + 1 else fatal_slots + 1
    if not sg and limit > 1:
        limit = 1
    while pos < count:
        base = &batch[pos * TX_SLOT]
        flags = le_u16(base + 6)
        size = le_u16(base + 10)
        if size < ETH_HLEN:
            break
        extras = 0
        gso_type = 0
        gso_size = 0
        if flags & EXTRA_INFO:  # one GSO record of an offered type, nothing else
            if pos + 1 >= count:
                break
            ex = base + TX_SLOT
            gso_type = ex[4]
            gso_size = le_u16(ex + 2)
            if ex[0] != EXTRA_GSO or ex[1] != 0 or gso_size == 0 or not (
                    (gso_type == 1 and gso & 1) or (gso_type == 2 and gso & 2)):
                break
            extras = 1
        # the chain's data slots (the first, then after the extra): stop at the first
        # without more_data
        n = 1
        while le_u16(base + ((n - 1 + extras) if n > 1 else 0) * TX_SLOT + 6) & MORE_DATA:
            if n >= limit or pos + extras + n >= count:
                n = 0
                break
            n += 1
        if n == 0:
            break
        rest = 0
        ok = True
        for k in range(1, n):
            length = le_u16(base + (k + extras) * TX_SLOT + 10)
            offset = le_u16(base + (k + extras) * TX_SLOT + 4)
            if length == 0 or <uint32_t>offset + length > PAGE_SIZE:
                ok = False
                break
            rest += length
        if not ok or rest > size or size - rest < ETH_HLEN:
            break
        offset = le_u16(base + 4)
        if <uint32_t>offset + (size - rest) > PAGE_SIZE:
            break
        frags = [(le_u32(base), offset, <uint32_t>(size - rest))]
        frags += [(le_u32(base + (k + extras) * TX_SLOT), le_u16(base + (k + extras) * TX_SLOT + 4),
                   le_u16(base + (k + extras) * TX_SLOT + 10)) for k in range(1, n)]
        ids = [le_u16(base + 8)]
        ids += [le_u16(base + (k + extras) * TX_SLOT + 8) for k in range(1, n)]
        out.append((flags, size, n + extras, tuple(ids), tuple(frags), (gso_type, gso_size)))
        pos += n + extras
    return out

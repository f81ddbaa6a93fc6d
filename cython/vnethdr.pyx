# A TAP write's virtio-net header, compiled: per frame, locate the IP and TCP/UDP headers,
# put the pseudo-header sum in a blank checksum's field, fill the 10-byte header (GSO type
# and size, header length, checksum start and offset) and hash the flow to a queue.
#
# The readable twin is xenpv.drivers.tap.vnet_frame_reference, built on
# xenpv.protocols.ethernet's l4_info / partial_checksum_field / flow_hash_of (tests compare
# the two on arbitrary frames).  Every read is bounded by the frame's length, as there.

from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_FromStringAndSize

import struct
import zlib

cdef enum:
    ETH_HLEN = 14
    P_IP = 0x0800
    P_IPV6 = 0x86DD
    P_8021Q = 0x8100
    TCP = 6
    UDP = 17
    VNET_HDR_LEN = 10
    NEEDS_CSUM = 1
    DATA_VALID = 2
    VNET_TCPV4 = 1
    VNET_TCPV6 = 4
    GSO_NONE = 0
    GSO_TCPV4 = 1

cdef bytes HDR_NONE = bytes(10)
cdef bytes HDR_VALID = bytes([DATA_VALID]) + bytes(9)
_crc32 = zlib.crc32


cdef inline uint32_t be16(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef inline uint32_t words(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    # sum of n // 2 big-endian 16-bit words (n even)
    cdef uint32_t total = 0
    cdef Py_ssize_t i
    for i in range(0, n, 2):
        total += be16(p + i)
    return total


cdef inline uint32_t fold(uint32_t total) noexcept nogil:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


cdef int locate(const uint8_t *d, Py_ssize_t n, int *version, Py_ssize_t *l3,
                Py_ssize_t *l4, int *proto) noexcept nogil:
    # 1 and the header places if the frame is TCP/UDP over IPv4/IPv6 (one VLAN tag, no
    # IPv6 extension header, no IPv4 fragment), every header within n; else 0
    cdef Py_ssize_t off = 12, ihl, need
    cdef uint32_t etype
    if n < ETH_HLEN:
        return 0
    etype = be16(d + off)
    if etype == P_8021Q:
        if n < ETH_HLEN + 4:
            return 0
        off += 4
        etype = be16(d + off)
    l3[0] = off + 2
    if etype == P_IP:
        if n < l3[0] + 20 or d[l3[0]] >> 4 != 4:
            return 0
        ihl = (d[l3[0]] & 0xF) * 4
        if ihl < 20 or n < l3[0] + ihl or be16(d + l3[0] + 6) & 0x3FFF:
            return 0
        version[0] = 4
        l4[0] = l3[0] + ihl
        proto[0] = d[l3[0] + 9]
    elif etype == P_IPV6:
        if n < l3[0] + 40 or d[l3[0]] >> 4 != 6:
            return 0
        version[0] = 6
        l4[0] = l3[0] + 40
        proto[0] = d[l3[0] + 6]
    else:
        return 0
    need = 20 if proto[0] == TCP else 8 if proto[0] == UDP else -1
    if need < 0 or n < l4[0] + need:
        return 0
    return 1


cdef uint32_t flow(const uint8_t[::1] data, Py_ssize_t n, int found, int version,
                   Py_ssize_t l3, Py_ssize_t l4, int proto):
    cdef uint8_t key[37]
    cdef Py_ssize_t k
    if not found:
        return _crc32(data[:min(n, 12)])
    if version == 4:
        memcpy(key, &data[l3 + 12], 8)
        k = 8
    else:
        memcpy(key, &data[l3 + 8], 32)
        k = 32
    key[k] = <uint8_t>proto
    memcpy(key + k + 1, &data[l4], 4)
    return _crc32(PyBytes_FromStringAndSize(<char *>key, k + 5))


def vnet_frame(data, bint csum_blank, bint data_validated, int gso_type, long gso_size,
               bint want_hash):
    """(virtio-net header + frame bytes for a TAP write or None, the frame's flow hash or
    0 unless ``want_hash``), as the twin ``vnet_frame_reference`` gives them."""
    cdef const uint8_t[::1] view = data
    cdef const uint8_t *d = &view[0] if view.shape[0] else NULL
    cdef Py_ssize_t n = view.shape[0], l3 = 0, l4 = 0, end, field, length
    cdef int version = 0, proto = 0, found = 0, gso = 0, tcp
    cdef uint32_t total, hdr_len = 0
    cdef bytearray out
    cdef uint8_t *o
    cdef bint plain = not csum_blank and gso_type == GSO_NONE
    if not plain or want_hash:
        found = locate(d, n, &version, &l3, &l4, &proto)
    hashed = flow(view, n, found, version, l3, l4, proto) if want_hash else 0
    if plain:
        return (HDR_VALID if data_validated else HDR_NONE) + bytes(data), hashed
    if not found:
        return None, hashed
    tcp = proto == TCP
    if gso_type != GSO_NONE:
        if not tcp or gso_size <= 0:
            return None, hashed
        gso = VNET_TCPV4 if gso_type == GSO_TCPV4 else VNET_TCPV6
        hdr_len = l4 + (d[l4 + 12] >> 4) * 4
    # the L4 data ends with the IP packet (Ethernet padding after it is not summed)
    if version == 4:
        end = l3 + be16(d + l3 + 2)
    else:
        end = l4 + be16(d + l3 + 4)
    end = min(end, n) if end >= l4 else n
    field = l4 + (16 if tcp else 6)
    if end < field + 2:
        return None, hashed
    length = end - l4
    if version == 4:
        if length > 0xFFFF:
            raise struct.error("IPv4 L4 length does not fit the pseudo header")
        total = words(d + l3 + 12, 8) + <uint32_t>proto + <uint32_t>length
    else:
        total = words(d + l3 + 8, 32) + <uint32_t>(length >> 16) + \
            <uint32_t>(length & 0xFFFF) + <uint32_t>proto
    total = fold(total)
    if gso and gso_size > 0xFFFF:
        raise struct.error("gso_size does not fit the header's 16 bits")
    out = PyByteArray_FromStringAndSize(NULL, VNET_HDR_LEN + n)  # every byte written below
    o = <uint8_t *>PyByteArray_AS_STRING(out)
    o[0] = NEEDS_CSUM
    o[1] = <uint8_t>gso
    o[2] = hdr_len & 0xFF
    o[3] = (hdr_len >> 8) & 0xFF
    o[4] = (gso_size & 0xFF) if gso else 0
    o[5] = ((gso_size >> 8) & 0xFF) if gso else 0
    o[6] = l4 & 0xFF
    o[7] = (l4 >> 8) & 0xFF
    o[8] = 16 if tcp else 6
    o[9] = 0
    if n:
        memcpy(o + VNET_HDR_LEN, d, n)
    o[VNET_HDR_LEN + field] = (total >> 8) & 0xFF
    o[VNET_HDR_LEN + field + 1] = total & 0xFF
    return out, hashed


def flow_hash(data):
    """The flow hash of a frame, as ``xenpv.protocols.ethernet.flow_hash`` gives it."""
    cdef const uint8_t[::1] view = data
    cdef const uint8_t *d = &view[0] if view.shape[0] else NULL
    cdef Py_ssize_t n = view.shape[0], l3 = 0, l4 = 0
    cdef int version = 0, proto = 0
    cdef int found = locate(d, n, &version, &l3, &l4, &proto)
    return flow(view, n, found, version, l3, l4, proto)

# Little-endian fields of wire records read from any alignment (the hosts xenpv runs on are
# little-endian: x86, arm64).

from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy


cdef inline uint32_t le_u32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline uint16_t le_u16(const uint8_t *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v

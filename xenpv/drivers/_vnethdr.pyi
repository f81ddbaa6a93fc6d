"""Type stub of the compiled TAP write header builder (cython/vnethdr.pyx)."""

def vnet_frame(data: bytes, csum_blank: bool, data_validated: bool, gso_type: int,
               gso_size: int, want_hash: bool) -> tuple[bytes | bytearray | None, int]: ...

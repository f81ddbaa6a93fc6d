"""Type stub of the compiled blkif batch accept (cython/blkscan.pyx)."""

from xenpv.protocols.layout import Buffer

def scan_rw(batch: Buffer, count: int, slot: int, id_offset: int, disk_sectors: int,
            readonly: bool, sector_size: int
            ) -> list[tuple[int, int, int, int, tuple[tuple[int, int, int], ...]] | None]: ...

"""Type stub of the compiled netif TX batch accept (cython/netscan.pyx)."""

from xenpv.protocols.layout import Buffer

def scan_tx(batch: Buffer, count: int, max_slots: int, fatal_slots: int, sg: bool,
            gso: int = 0
            ) -> list[tuple[int, int, int, tuple[int, ...], tuple[tuple[int, int, int], ...],
                            tuple[int, int]]]: ...

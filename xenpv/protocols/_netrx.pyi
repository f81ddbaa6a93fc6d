"""Type stub of the compiled netif RX batch scan (cython/netrx.pyx)."""

from collections.abc import Sequence

from xenpv.protocols.layout import Buffer

def scan_rx(batch: Buffer, count: int, posted: Sequence[int], mem: Buffer
            ) -> tuple[list[tuple[bytes | None, int, int, int, int | None, int]], int,
                       str | None]: ...

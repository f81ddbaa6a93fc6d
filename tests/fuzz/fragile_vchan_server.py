"""A deliberately fragile vchan server process for the ``vchan:process`` tests.

``python fragile_vchan_server.py CLIENT_DOMID PATH SOCKET``, run as a domain of the
loopback emulator: it serves vchan clients one after another like ``xenpv vchan-proxy -m
server`` (connecting its local side to SOCKET per client, closing it when the client
leaves), but it has a planted bug: instead of treating an insane index pair of the ring
it reads (more bytes claimed than the ring holds) as a broken peer, it crashes (SIGSEGV).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys

from xenpv.platforms.choose import open_platform
from xenpv.protocols.vchan import VCHAN_CLI_CONNECTED, VCHAN_LEFT_CONS_OFFSET
from xenpv.vchan import VchanServer


def planted_bug(server: VchanServer) -> None:
    """Crash when the left ring (client to server) claims more than its 1024 bytes."""
    cons, prod = struct.unpack_from("<II", server.ctrl.mem, VCHAN_LEFT_CONS_OFFSET)
    if (prod - cons) & 0xFFFFFFFF > 1024:
        os.kill(os.getpid(), signal.SIGSEGV)


def main() -> int:
    client, path, local = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    platform = open_platform()
    server = VchanServer(platform, client, path)
    buf = bytearray(4096)
    try:
        while True:
            while server.is_open != VCHAN_CLI_CONNECTED:
                server.wait_event(1.0)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(local)
                while True:
                    planted_bug(server)
                    if not (server.is_open == VCHAN_CLI_CONNECTED or server.data_ready()):
                        break
                    if not server.recv_nowait(buf):
                        server.wait_event(0.05)
            planted_bug(server)
            server.rings.discard()
    finally:
        server.close()
        platform.close()


if __name__ == "__main__":
    sys.exit(main())

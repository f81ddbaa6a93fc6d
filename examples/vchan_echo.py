"""Two emulated domains in this process and a vchan echo between them.

What it shows
-------------
* :class:`~xenpv.platforms.loopback.emulator.InProcessEmulator` builds the whole machine
  in one call: the emulated hypervisor (grant tables, event channels), the embedded
  xenstored with one socket per domain, and each domain's xenstore home.
* ``emu.platform(domid)`` is what every driver is given: grant table, event channels and
  xenstore of one domain.  The same vchan code runs on ``xenpv loopback up`` (one process
  per domain) and on real Xen; only the line that makes the platform changes.
* dom1 serves a vchan at the conventional path ``/local/domain/1/data/vchan/2/echo`` for
  dom2, in a thread of its own, with the blocking API; dom2 connects, sends a few messages
  and reads each one back.  At the end nothing is left granted, mapped or bound.

Run it: ``python examples/vchan_echo.py`` (a second or so).
"""

from __future__ import annotations

import threading

from xenpv.platforms.loopback.emulator import InProcessEmulator
from xenpv.vchan import VchanClient, VchanServer

SERVER, CLIENT = 1, 2
PATH = f"/local/domain/{SERVER}/data/vchan/{CLIENT}/echo"
MESSAGES = [b"hello", b"from dom2"]
BULK = bytes(range(256)) * 400  # 100 KiB: many times the default ring (1 KiB each way)


def serve(server: VchanServer) -> None:
    """dom1: send back whatever arrives, until the client closes the vchan."""
    server.wait_connected(timeout=10)
    while data := server.recv(65536, timeout=10):
        server.send(data)
    server.close()


def main() -> int:
    """Run the echo; returns the exit status."""
    with InProcessEmulator(domains=[SERVER, CLIENT]) as emu:
        dom1, dom2 = emu.platform(SERVER), emu.platform(CLIENT)

        # dom1 publishes the vchan (ring-ref and event-channel under PATH) ...
        server = VchanServer(dom1, CLIENT, PATH)
        echo = threading.Thread(target=serve, args=(server,))
        echo.start()

        # ... dom2 maps it and talks
        client = VchanClient(dom2, SERVER, PATH)
        for message in MESSAGES:
            client.send(message)
            reply = client.recv_exactly(len(message), timeout=10)
            assert reply == message, "the echo changed the data"
            print(f"dom2 sent {message!r}, dom1 echoed it back")
        # More than the rings hold: send a ring's worth, read it back, repeat.  (Sending
        # it all first would deadlock: dom1 blocks sending its echo until dom2 reads.)
        echoed = bytearray()
        for i in range(0, len(BULK), 1024):
            client.send(BULK[i : i + 1024])
            echoed += client.recv_exactly(len(BULK[i : i + 1024]), timeout=10)
        assert echoed == BULK, "the echo changed the data"
        print(f"dom2 sent {len(BULK)} bytes in 1 KiB pieces, all echoed back intact")
        client.close()
        echo.join(10)

        emu.assert_released()  # nothing granted, mapped or bound is left behind
        print("vchan echo done: no grant, mapping or port left")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

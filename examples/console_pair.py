"""A console pair: a guest's consoles served by a backend in dom0, bytes both ways.

What it shows
-------------
* Console 0 (no xenbus handshake): the guest places its ring page at the reserved grant
  ref 0 and offers an event channel (:class:`~xenpv.frontends.console.PrimaryConsole`);
  the toolstack publishes both under ``/local/domain/<guest>/console``
  (:func:`~xenpv.backends.console.publish_primary_console`); the backend
  (:class:`~xenpv.backends.console.ConsoleBackend`, the role of ``xenconsoled``) maps the
  page, binds the port and serves the console.  Here it hands the guest's output to a
  Python callback instead of a pty (``ConsoleConfig(pty=False)``, ``sink=``) and types
  into the console with ``session.feed``.
* A secondary console (``device/console/1``): the toolstack creates the device pair
  (:func:`~xenpv.xenbus.toolstack.add_device`); the guest's
  :class:`~xenpv.frontends.console.ConsoleFrontend` and the backend negotiate through the
  xenbus states until both are Connected, then the guest writes to its stream.
* Both guest sides are ordinary asyncio ``StreamReader``/``StreamWriter`` pairs.

Run it: ``python examples/console_pair.py`` (about a second).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from xenpv.backends.console import ConsoleBackend, ConsoleConfig, publish_primary_console
from xenpv.frontends.console import ConsoleFrontend, PrimaryConsole
from xenpv.platforms.loopback.emulator import InProcessEmulator
from xenpv.xenbus.states import XenbusState
from xenpv.xenbus.toolstack import add_device, remove_device

GUEST = 1
WAIT = 10.0


async def wait_for_output(out: dict[int, bytearray], domid: int, text: bytes) -> None:
    """Wait until the backend has received ``text`` from ``domid``'s consoles."""
    async with asyncio.timeout(WAIT):
        while text not in out[domid]:
            await asyncio.sleep(0.01)


async def main() -> int:
    """Run the pair; returns the exit status."""
    with InProcessEmulator(domains=[GUEST]) as emu:
        dom0, guest = emu.platform(0), emu.platform(GUEST)
        xs0 = await dom0.xenstore()  # dom0's asyncio xenstore client (toolstack + backend)
        xsg = await guest.xenstore()  # the guest's

        # dom0: the console backend, collecting what the guest prints
        out: dict[int, bytearray] = defaultdict(bytearray)
        backend = ConsoleBackend(dom0, xs0, ConsoleConfig(pty=False), domids=[GUEST],
                                 sink=lambda domid, data: out[domid].extend(data))
        await backend.start()

        # guest: console 0 at grant ref 0; toolstack: publish it
        console = PrimaryConsole(guest, backend_domid=0).setup()
        await publish_primary_console(xs0, GUEST, port=console.port, ring_ref=0)
        reader, writer = await console.open()
        writer.write(b"guest: console 0 says hello\n")
        await wait_for_output(out, GUEST, b"console 0 says hello\n")
        print("backend got from console 0: 'guest: console 0 says hello'")

        # dom0 types a line; the guest reads it
        session = await backend.primaries[GUEST].wait_ready(WAIT)
        session.feed(b"root\n")
        line = await asyncio.wait_for(reader.readline(), WAIT)
        print(f"guest read from console 0: {line!r}")
        assert line == b"root\n"

        # a secondary console through the xenbus handshake
        info = await add_device(xs0, "console", GUEST, 0, 1, frontend_keys={"type": "xenpv"})
        frontend = ConsoleFrontend(guest, xsg, info.frontend_path)
        await frontend.start()
        _reader2, writer2 = await frontend.streams(WAIT)
        await frontend.wait_state(XenbusState.Connected, timeout=WAIT)
        print(f"{info.frontend_path} is {frontend.state.name}")
        writer2.write(b"guest: console 1 works too\n")
        await wait_for_output(out, GUEST, b"console 1 works too\n")
        print("backend got from console 1: 'guest: console 1 works too'")

        # teardown: the toolstack removes the device (Closing/Closed handshake), then
        # everything else closes.  A ring page the backend still mapped when the frontend
        # let go is quarantined and ended later; closing the guest's platform (as the
        # end of its process would) ends it for sure.
        assert await remove_device(xs0, "console", GUEST, 1, 0, timeout=WAIT)
        await frontend.close()
        await backend.close()
        console.close()
        await xsg.close()
        await xs0.close()
        guest.close()
        dom0.close()
        emu.assert_released()
        print("console pair done: no grant, mapping or port left")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))

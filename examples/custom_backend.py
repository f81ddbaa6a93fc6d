"""A minimal custom split driver on the xenbus driver base: an "upper-case" device.

What it shows
-------------
A made-up device type ``upper``: the guest sends short texts, the backend in dom0 answers
each one in capitals.  It has every part a real PV device has, each in a few lines:

* **Wire format** (one module-level layout shared by both halves): a request/response ring
  of 64-byte slots in one granted page (``io/ring.h`` semantics, :mod:`xenpv.rings`);
  a request is ``(id, length, text)``, a response ``(id, status, text)``.
* **Negotiation** (:mod:`xenpv.xenbus.driver`): the backend publishes ``feature-upper``
  before InitWait (:meth:`publish_features`); the frontend grants the ring page, offers an
  event channel and writes ``ring-ref`` / ``event-channel`` (:meth:`publish`); the backend
  reads them with the strict parsers of :class:`~xenpv.xenbus.driver.PeerKeys`, maps the
  page and binds the port (:meth:`connect`); both release everything in
  :meth:`disconnect`.  The base class runs the xenbus state machine, the watches, the
  timeouts and the error nodes.
* **Peer input is checked**: a request whose length does not fit its slot is answered
  with ``-EINVAL``; a frontend that corrupts the ring indexes breaks the ring (a peer
  error), never the backend.
* **The toolstack** creates and removes the device pair
  (:func:`~xenpv.xenbus.toolstack.add_device` / :func:`~xenpv.xenbus.toolstack.remove_device`).

Everything runs in this process on :class:`~xenpv.platforms.loopback.emulator.InProcessEmulator`;
the two drivers only ever see their own platform and xenstore client, so each half would
run unchanged in its own domain.  Run it: ``python examples/custom_backend.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import struct
from typing import Any

from xenpv.errors import LocalError
from xenpv.platforms.base import GrantInUse
from xenpv.platforms.loopback.emulator import InProcessEmulator
from xenpv.rings import BackRing, FrontRing
from xenpv.xenbus.driver import BackendDriver, DeviceConfigError, FrontendDriver, PeerKeys
from xenpv.xenbus.states import XenbusState
from xenpv.xenbus.toolstack import add_device, remove_device

GUEST = 3
WAIT = 10.0

# ---------------------------------------------------------------- wire format (both halves)
SLOT = 64
TEXT = SLOT - 8
REQUEST = struct.Struct(f"<II{TEXT}s")  # id, length, text
RESPONSE = struct.Struct(f"<Ii{TEXT}s")  # id, status (length or -errno), text


async def wait_port(events: Any, port: int, timeout: float = WAIT) -> None:
    """Sleep until ``port`` fires, then unmask it (before the caller looks at the ring)."""
    async with asyncio.timeout(timeout):
        while await events.wait() != port:
            pass
    events.unmask(port)


# ---------------------------------------------------------------- backend (dom0)
class UpperBackend(BackendDriver):
    """Serves ``backend/upper/<guest>/<devid>``: answers each request in capitals."""

    def __init__(self, platform: Any, client: Any, path: str) -> None:
        super().__init__(client, path)
        self.platform = platform
        self.mapping: Any = None
        self.port: int | None = None
        self.task: asyncio.Task[None] | None = None
        self.served = 0

    async def publish_features(self) -> None:
        await self.write_keys({"feature-upper": 1})

    async def connect(self, peer: PeerKeys) -> None:
        ref, port = await peer.grant_ref("ring-ref"), await peer.port("event-channel")
        self.mapping = self.platform.grants.map(self.peer_domid, [ref])
        self.port = self.platform.events.bind_interdomain(self.peer_domid, port)
        ring = BackRing(self.mapping.mem, SLOT)
        self.task = asyncio.create_task(self.serve(ring, self.port))

    async def serve(self, ring: BackRing, port: int) -> None:
        """Answer requests until disconnect cancels this task."""
        events = self.platform.events
        while True:
            while (raw := ring.take_request()) is not None:
                rid, length, text = REQUEST.unpack(raw)
                if length > TEXT:  # peer input: never trust the length
                    ring.put_response(RESPONSE.pack(rid, -errno.EINVAL, b""))
                else:
                    upper = bytes(text[:length]).upper()
                    ring.put_response(RESPONSE.pack(rid, length, upper))
                self.served += 1
            if ring.push_responses_and_check_notify():
                events.notify(port)
            if not ring.final_check_for_requests():
                await wait_port(events, port, timeout=3600)

    async def disconnect(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
            self.task = None
        if self.port is not None:
            self.platform.events.unbind(self.port)
            self.port = None
        if self.mapping is not None:
            self.platform.grants.unmap(self.mapping)
            self.mapping = None


# ---------------------------------------------------------------- frontend (guest)
class UpperFrontend(FrontendDriver):
    """Drives ``device/upper/<devid>`` in the guest; :meth:`call` sends one text."""

    def __init__(self, platform: Any, client: Any, path: str) -> None:
        super().__init__(client, path)
        self.platform = platform
        self.pages: Any = None
        self.ring: FrontRing | None = None
        self.port: int | None = None
        self.next_id = 0

    async def publish(self, backend: PeerKeys) -> None:
        if not await backend.feature("feature-upper"):
            raise DeviceConfigError("the backend does not offer feature-upper")
        self.pages = self.platform.grants.grant(self.peer_domid, 1)
        self.ring = FrontRing(self.pages.mem, SLOT)  # initialises the shared header
        self.port = self.platform.events.alloc_unbound(self.peer_domid)
        await self.write_keys({"ring-ref": self.pages.refs[0], "event-channel": self.port})

    async def call(self, text: bytes) -> bytes:
        """Send ``text`` (at most 56 bytes), wait for the answer."""
        ring, port, events = self.ring, self.port, self.platform.events
        if ring is None or port is None or self.state is not XenbusState.Connected:
            raise LocalError("the device is not connected")
        rid, self.next_id = self.next_id, self.next_id + 1
        ring.put_request(REQUEST.pack(rid, len(text), text))
        if ring.push_requests_and_check_notify():
            events.notify(port)
        while (raw := ring.take_response()) is None:
            if not ring.final_check_for_responses():
                await wait_port(events, port)
        got_id, status, answer = RESPONSE.unpack(raw)
        assert got_id == rid, "responses come back in order here"
        if status < 0:
            raise OSError(-status, f"backend refused request {rid}")
        return bytes(answer[:status])

    async def disconnect(self) -> None:
        self.ring = None
        if self.port is not None:
            self.platform.events.unbind(self.port)
            self.port = None
        if self.pages is not None:
            with contextlib.suppress(GrantInUse):  # still mapped: freed with the platform
                self.platform.grants.end_access(self.pages)
            self.pages = None


# ---------------------------------------------------------------- the toolstack and a run
async def main() -> int:
    """Create the device, connect both halves, make a few calls, remove it."""
    with InProcessEmulator(domains=[GUEST]) as emu:
        dom0, guest = emu.platform(0), emu.platform(GUEST)
        xs0, xsg = await dom0.xenstore(), await guest.xenstore()

        info = await add_device(xs0, "upper", GUEST, 0)
        backend = UpperBackend(dom0, xs0, info.backend_path)
        frontend = UpperFrontend(guest, xsg, info.frontend_path)
        await backend.start()
        await frontend.start()
        await frontend.wait_state(XenbusState.Connected, timeout=WAIT)
        await backend.wait_state(XenbusState.Connected, timeout=WAIT)
        print(f"{info.frontend_path} and {info.backend_path} are Connected")

        for text in (b"hello", b"split drivers in python", b"xen"):
            print(f"guest sent {text!r}, backend answered {await frontend.call(text)!r}")
        try:
            await frontend.call(b"y" * 60)  # too long: the backend refuses it
        except OSError as exc:
            print(f"a 60-byte text is refused: {errno.errorcode.get(exc.errno or 0)}")

        assert await remove_device(xs0, "upper", GUEST, info.devid, 0, timeout=WAIT)
        await frontend.wait_done(WAIT)
        await backend.wait_done(WAIT)
        print(f"device removed after {backend.served} requests")
        await frontend.close()
        await backend.close()
        await xsg.close()
        await xs0.close()
        guest.close()
        dom0.close()
        emu.assert_released()
        print("custom backend done: no grant, mapping or port left")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))

"""Hostile peers against the real keyboard drivers (targets ``kbdfront:driver`` and
``kbdback:driver``).

Theory of operation
-------------------
Each input gets a fresh world (:func:`~xenpv.fuzz.xenbus_driver.xenstore_world` for
``vkbd``: embedded xenstored, in-process emulator) in which our
:class:`~xenpv.frontends.keyboard.KeyboardFrontend` and
:class:`~xenpv.backends.keyboard.KeyboardBackendDriver` connect normally.  Then one side
turns hostile and plays the input as up to :data:`MAX_OPS` operations on the shared page,
its event channel and its xenstore keys:

* ``kbdfront:driver`` (the frontend is the victim): the backend writes raw 40-byte
  events (well-formed, out-of-range, unknown types, random bytes) into the ring, moves
  ``in_prod`` anywhere (ahead by up to 2^32-1, backwards), floods the port, rewrites its
  feature keys, goes Closed;
* ``kbdback:driver`` (the backend is the victim): the frontend moves ``in_cons``
  anywhere, floods the port, rewrites its ``request-*``/``page-gref``/``event-channel``
  keys with garbage and cycles its state, while the backend keeps sending input (keys
  pressed and released, motion).

Invariants (an :class:`~xenpv.fuzz.hostile.InvariantViolation` otherwise): no exception
escapes the victim; every event the frontend delivers passes
:func:`~xenpv.frontends.keyboard.check_event` for the negotiated mode; the frontend's
ring, once broken, delivers nothing more; the backend's backlog stays within its bound
(plus at most one release per distinct key); ``close()`` completes; afterwards the
emulator holds nothing; the input takes at most :data:`INPUT_BUDGET_S`.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from xenpv.backends.hid.source import KeyInput, RelInput
from xenpv.backends.keyboard import KeyboardBackendDriver, KeyboardConfig
from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.frontends.keyboard import KeyboardFrontend, check_event
from xenpv.fuzz.hostile import InvariantViolation, violation
from xenpv.fuzz.source import ByteSource
from xenpv.fuzz.xenbus_driver import BE, FE, play_input, xenstore_world
from xenpv.protocols import ProtocolError
from xenpv.protocols import kbdif as K
from xenpv.xenbus import XenbusState as S
from xenpv.xenstore.wire import XenstoreError

__all__ = ["INPUT_BUDGET_S", "MAX_OPS", "KbdDriverTarget"]

MAX_OPS = 32
INPUT_BUDGET_S = 20.0
BACKLOG = 16
_CLOSE_S, _OP_S, _HOOK_S = 0.3, 2.0, 2.0
_GARBAGE = [b"", b"abc", b"-1", b"0", b"1", b"2", b"4000", b"99999", str(2**40).encode(),
            b"yes", b"\xff\xfe", b"7" * 300]
_FE_KEYS = ("page-gref", "event-channel", "request-abs-pointer", "request-raw-pointer",
            "request-multi-touch", "page-ref")
_BE_KEYS = ("feature-abs-pointer", "width", "height", "multi-touch-num-contacts")


class KbdDriverTarget:
    """One side of the keyboard pair as the victim (``"frontend"`` or ``"backend"``)."""

    def __init__(self, victim: str) -> None:
        if victim not in ("frontend", "backend"):
            raise LocalError(f"victim must be frontend or backend, not {victim!r}")
        self.victim = victim

    def __call__(self, data: bytes) -> None:
        """Play one input; raises InvariantViolation on a breach."""
        play_input("kbd", "keyboard driver", lambda: self._run(data),
                   ("xenpv.xenbus", "xenpv.frontends", "xenpv.backends"))

    async def _run(self, data: bytes) -> None:
        src = ByteSource(data)
        async with xenstore_world("vkbd") as w:
            fp, bp = await w.add()
            cfg = KeyboardConfig(multi_touch=(320, 200, 4), backlog=BACKLOG)
            be = KeyboardBackendDriver(w.machine.domain(BE), w.be, bp, cfg,
                                       close_timeout=_CLOSE_S, op_timeout=_OP_S,
                                       hook_timeout=_HOOK_S)
            fe = KeyboardFrontend(w.machine.domain(FE), w.fe, fp, multi_touch=True,
                                  raw_pointer=src.boolean(), queue=64,
                                  close_timeout=_CLOSE_S, op_timeout=_OP_S,
                                  hook_timeout=_HOOK_S)
            delivered: list[Any] = []
            reader: asyncio.Task[None] | None = None
            try:
                await be.start()
                await fe.start()
                async with asyncio.timeout(5.0):
                    while be.session is None or fe.state is not S.Connected:
                        await asyncio.sleep(0.005)
                reader = asyncio.create_task(self._read(fe, delivered))
                if self.victim == "frontend":
                    await self._hostile_backend(src, w, be, bp)
                else:
                    await self._hostile_frontend(src, w, be, fp)
                await asyncio.sleep(0.05)
                self._check(fe, be, delivered)
            finally:
                if reader is not None:
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
                for d in (fe, be):
                    try:
                        await asyncio.wait_for(d.close(), 10.0)
                    except Exception as e:
                        raise violation("close() failed", e) from None
                w.machine.release()
                try:
                    w.machine.assert_released()
                except AssertionError as e:
                    raise violation("the emulator still holds resources", e) from None

    async def _read(self, fe: KeyboardFrontend, out: list[Any]) -> None:
        while True:
            async for ev in fe.events():
                out.append(ev)
            await asyncio.sleep(0.01)  # a connection ended: follow the next one

    def _check(self, fe: KeyboardFrontend, be: KeyboardBackendDriver,
               delivered: list[Any]) -> None:
        mode = fe.mode
        consumer = fe.consumer
        if consumer is not None and consumer.delivered_at_break is not None and \
                consumer.stats["delivered"] != consumer.delivered_at_break:
            raise InvariantViolation("events were accepted after the ring broke")
        for ev in delivered:
            if mode is not None:
                try:
                    check_event(ev, mode)
                except ProtocolError as e:
                    raise InvariantViolation(f"an invalid event was delivered: {e}") from None
        session = be.session
        if session is not None and len(session.producer.backlog) > BACKLOG + K.RAW_POINTER_MAX:
            raise InvariantViolation("the backend's backlog grew without bound")

    async def _hostile_backend(self, src: ByteSource, w: Any, be: KeyboardBackendDriver,
                               bp: str) -> None:
        for _ in range(MAX_OPS):
            if src.remaining <= 0:
                return
            session = be.session
            op = src.below(6)
            try:
                if session is None:
                    await asyncio.sleep(0.005)
                elif op == 0:  # raw events: random bytes or a bent well-formed one
                    n = 1 + src.below(8)
                    raw = b"".join(_event(src) for _ in range(n))
                    session.ring.write(raw)
                    session._notify()
                elif op == 1:  # in_prod anywhere
                    cons = struct.unpack_from("<I", session.page, 0)[0]
                    ahead = src.choice([52, 1 << 31, 0xFFFFFFFF, src.u32(), -1])
                    struct.pack_into("<I", session.page, 4, (cons + ahead) & 0xFFFFFFFF)
                    session._notify()
                elif op == 2:  # notification flood
                    for _ in range(src.below(500)):
                        session.events.notify(session.port)
                elif op == 3:  # rewrite a feature key
                    await w.be.write(f"{bp}/{src.choice(_BE_KEYS)}", src.choice(_GARBAGE))
                elif op == 4:
                    await w.be.write(f"{bp}/state", src.choice([b"5", b"6", b"99", b"4"]))
                else:
                    await asyncio.sleep(src.below(20) / 1000)
            except (PeerError, LocalError, PlatformError, XenstoreError):
                pass  # the hostile side's own operation refused
            await asyncio.sleep(0)

    async def _hostile_frontend(self, src: ByteSource, w: Any, be: KeyboardBackendDriver,
                                fp: str) -> None:
        for i in range(MAX_OPS):
            if src.remaining <= 0:
                return
            be.send(KeyInput(2 + src.below(40), src.boolean()))
            be.send(RelInput(src.below(9) - 4, src.below(9) - 4))
            session = be.session
            op = src.below(5)
            try:
                if session is not None and op == 0:  # in_cons anywhere
                    struct.pack_into("<I", session.page, 0, src.u32())
                    session.events.notify(session.port)
                elif session is not None and op == 1:
                    for _ in range(src.below(500)):
                        session.events.notify(session.port)
                elif op == 2:
                    await w.fe.write(f"{fp}/{src.choice(_FE_KEYS)}", src.choice(_GARBAGE))
                elif op == 3:
                    await w.fe.write(f"{fp}/state", src.choice([b"1", b"3", b"4", b"5", b"6",
                                                                b"99", b""]))
                else:
                    await asyncio.sleep(src.below(20) / 1000)
            except (PeerError, LocalError, PlatformError, XenstoreError):
                pass
            if i % 4 == 0:
                await asyncio.sleep(0)


def _event(src: ByteSource) -> bytes:
    kind = src.below(6)
    if kind == 0:
        return src.take(40).ljust(40, b"\0")
    if kind == 1:
        return K.Key(K.XENKBD_TYPE_KEY, src.below(3), src.choice([30, 0x110, 0, 0x300,
                                                                  src.u32()])).pack()
    if kind == 2:
        return K.Position(K.XENKBD_TYPE_POS, src.u16() - 100, src.u16() - 100, 0).pack()
    if kind == 3:
        return K.MTouchPos(K.XENKBD_TYPE_MTOUCH, src.below(7), src.below(6), src.below(400),
                           src.below(300)).pack()
    if kind == 4:
        return K.MTouchOrient(K.XENKBD_TYPE_MTOUCH, K.XENKBD_MT_EV_ORIENT, src.below(5),
                              src.u8() * 2 - 256).pack()
    return bytes([src.u8()]) + bytes(39)

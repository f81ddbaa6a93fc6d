"""Focus routing: one set of input sources, several guests, input only to the foreground one.

Theory of operation
-------------------
A :class:`FocusRouter` owns input sources (:meth:`~FocusRouter.add_source`: a task per
source feeds its events to :meth:`~FocusRouter.route`) and targets (one keyboard backend
per guest, anything with ``send(event) -> bool``, registered under the guest's domid).
Exactly one target has the focus; :meth:`~FocusRouter.route` delivers to it and to no
other.  The guarantees, each kept by one rule:

* **nothing reaches a background guest**: an event goes to the focused target only; the
  only events a target receives after losing the focus are the releases of the next rule,
  sent during the switch itself;
* **nothing stays pressed**: the router records, per target, the keys/buttons it
  delivered pressed and the touch contacts it delivered down; on a switch (by
  :meth:`~FocusRouter.focus`, by the hotkey, or when the focused target is removed) the
  losing target gets a release for each key and an up for each contact (then a frame);
  a release is delivered only to a target that has the key pressed (a key pressed in
  one guest and released after a switch is not released twice, nor in the new guest);
  when a source ends (a device unplugged) its keys still down are released and its
  contacts lifted;
* **the hotkey is never delivered**: ``hotkey`` is a chord, the last code the trigger and
  the others modifiers that must be held; a trigger press completing the chord switches
  to the next target (domid order, wrapping) and neither it nor its release is
  delivered.  The modifiers are ordinary keys delivered to the guest that had the focus
  and released there by the switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from xenpv.backends.hid.source import InputEvent, InputSource, KeyInput, TouchInput
from xenpv.errors import LocalError
from xenpv.protocols.keycodes import NAMES

__all__ = ["DEFAULT_HOTKEY", "FocusRouter", "InputTarget"]

log = logging.getLogger(__name__)

#: Right Ctrl + Scroll Lock.
DEFAULT_HOTKEY = (NAMES["RIGHTCTRL"], NAMES["SCROLLLOCK"])


class InputTarget(Protocol):
    """What the router delivers to (a :class:`~xenpv.backends.keyboard.KeyboardBackendDriver`)."""

    def send(self, ev: InputEvent) -> bool:
        """Deliver ``ev``; False if it could not be (not connected)."""
        ...


class FocusRouter:
    """See the module docstring.  ``on_focus(domid)`` is called after every switch."""

    def __init__(self, *, hotkey: Sequence[int] | None = DEFAULT_HOTKEY,
                 on_focus: Callable[[int | None], None] | None = None) -> None:
        """No sources, no targets, no focus yet."""
        if hotkey is not None and not hotkey:
            raise LocalError("the hotkey needs at least one code")
        self.hotkey = tuple(hotkey) if hotkey is not None else None
        self.on_focus = on_focus
        self.targets: dict[int, InputTarget] = {}
        self.focused: int | None = None
        self.sources: dict[str, asyncio.Task[None]] = {}
        self._pressed: dict[int, set[int]] = {}  # per target: keys delivered down
        self._contacts: dict[int, set[int]] = {}  # per target: contacts delivered down
        self._down: set[int] = set()  # keys physically down (all sources)
        self._swallowed: set[int] = set()  # hotkey triggers whose release is swallowed
        self.stats = {"routed": 0, "no_focus": 0, "hotkeys": 0, "switches": 0,
                      "released_on_switch": 0, "orphan_releases": 0}

    # -- targets and focus
    def add_target(self, domid: int, target: InputTarget) -> None:
        """Route to ``target`` for ``domid``; the first target gets the focus."""
        self.targets[domid] = target
        self._pressed.setdefault(domid, set())
        self._contacts.setdefault(domid, set())
        if self.focused is None:
            self.focus(domid)

    def remove_target(self, domid: int) -> None:
        """Stop routing to ``domid`` (its keys are released first while it can take them);
        the focus moves to the next target if it had it."""
        if domid not in self.targets:
            return
        if self.focused == domid:
            others = sorted(set(self.targets) - {domid})
            self.focus(others[0] if others else None)
        self._release_all(domid)
        del self.targets[domid]
        self._pressed.pop(domid, None)
        self._contacts.pop(domid, None)

    def focus(self, domid: int | None) -> None:
        """Give the focus to ``domid`` (None: nobody); everything the previous target has
        pressed is released there first."""
        if domid is not None and domid not in self.targets:
            raise LocalError(f"no input target for domain {domid}")
        if domid == self.focused:
            return
        old, self.focused = self.focused, domid
        if old is not None and old in self.targets:
            self._release_all(old)
        self.stats["switches"] += 1
        if self.on_focus is not None:
            self.on_focus(domid)

    def next_focus(self) -> None:
        """Focus the next target in domid order (wrapping)."""
        order = sorted(self.targets)
        if not order:
            return
        if self.focused not in order:
            self.focus(order[0])
            return
        self.focus(order[(order.index(self.focused) + 1) % len(order)])

    def pressed_in(self, domid: int) -> set[int]:
        """Keys the router delivered pressed to ``domid`` and not yet released."""
        return set(self._pressed.get(domid, ()))

    def _release_all(self, domid: int) -> None:
        target = self.targets[domid]
        keys = self._pressed[domid]
        for code in sorted(keys):
            target.send(KeyInput(code, False))
            self.stats["released_on_switch"] += 1
        keys.clear()
        contacts = self._contacts[domid]
        if contacts:
            for c in sorted(contacts):
                target.send(TouchInput("up", c))
            target.send(TouchInput("frame", 0))
            contacts.clear()

    # -- events
    def route(self, ev: InputEvent) -> None:
        """Deliver ``ev`` to the focused target (or act on the hotkey)."""
        if isinstance(ev, KeyInput):
            if self._hotkey(ev):
                return
            if ev.pressed:
                self._down.add(ev.code)
            else:
                self._down.discard(ev.code)
        domid = self.focused
        if domid is None:
            self.stats["no_focus"] += 1
            return
        if isinstance(ev, KeyInput):
            pressed = self._pressed[domid]
            if ev.pressed:
                pressed.add(ev.code)
            elif ev.code in pressed:
                pressed.discard(ev.code)
            else:
                self.stats["orphan_releases"] += 1
                return  # pressed in a guest that lost the focus: released there already
        elif isinstance(ev, TouchInput):
            contacts = self._contacts[domid]
            if ev.kind == "down":
                contacts.add(ev.contact)
            elif ev.kind == "up":
                if ev.contact not in contacts:
                    return
                contacts.discard(ev.contact)
            elif ev.kind != "frame" and ev.contact not in contacts:
                return  # a contact that went down in another guest
        self.stats["routed"] += 1
        self.targets[domid].send(ev)

    def _hotkey(self, ev: KeyInput) -> bool:
        if self.hotkey is None:
            return False
        *mods, trigger = self.hotkey
        if ev.code != trigger:
            return False
        if not ev.pressed:
            if trigger in self._swallowed:
                self._swallowed.discard(trigger)
                return True
            return False
        if all(m in self._down for m in mods):
            self._swallowed.add(trigger)
            self.stats["hotkeys"] += 1
            self.next_focus()
            return True
        return False

    # -- sources
    def add_source(self, source: InputSource) -> None:
        """Route ``source``'s events until it ends (call from a running loop)."""
        if source.name in self.sources:
            raise LocalError(f"source {source.name!r} already routed")
        self.sources[source.name] = asyncio.create_task(self._pump(source),
                                                        name=f"hid {source.name}")

    async def _pump(self, source: InputSource) -> None:
        mine: set[int] = set()
        touching: set[int] = set()
        try:
            async for ev in source.events():
                if isinstance(ev, KeyInput):
                    (mine.add if ev.pressed else mine.discard)(ev.code)
                elif isinstance(ev, TouchInput) and ev.kind in ("down", "up"):
                    (touching.add if ev.kind == "down" else touching.discard)(ev.contact)
                self.route(ev)
        except Exception as exc:  # a source failing must not take the router down
            log.warning("input source %s failed: %r", source.name, exc)
        finally:
            for code in sorted(mine):  # unplugged with keys down: release them
                self.route(KeyInput(code, False))
            for contact in sorted(touching):  # and lift its fingers
                self.route(TouchInput("up", contact))
            if touching:
                self.route(TouchInput("frame", 0))
            self.sources.pop(source.name, None)

    async def close(self) -> None:
        """Stop every source task (sources themselves are closed by their owners) and
        release every target's keys."""
        tasks = list(self.sources.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for domid in list(self.targets):
            self._release_all(domid)

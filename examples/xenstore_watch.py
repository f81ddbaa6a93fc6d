"""A xenstore watch: dom0 follows what a guest writes into its ``data`` directory.

What it shows
-------------
* The embedded xenstored of :class:`~xenpv.platforms.loopback.emulator.InProcessEmulator`
  gives each domain its own socket (``emu.xenstore_path(domid)``); a connection on it acts
  as that domain, with that domain's permissions.
* The asyncio client (:func:`xenpv.xenstore.client.connect`): dom0 registers a watch on
  ``/local/domain/2/data`` and iterates over its events (``async for path, token in
  watch``).  The first event is the watch path itself, as on Xen; then one event per
  change below it, removals included.  Events are hints: the watcher reads the value.
* Permissions: the guest owns its ``data`` directory but may not write dom1's (the server
  answers ``EACCES``, raised as :class:`~xenpv.xenstore.wire.XenstoreError`).
* A transaction (``xs.transaction()``) writes two keys at once.

Run it: ``python examples/xenstore_watch.py`` (well under a second).
"""

from __future__ import annotations

import asyncio

from xenpv.platforms.loopback.emulator import InProcessEmulator
from xenpv.xenstore.client import connect
from xenpv.xenstore.wire import XenstoreError

GUEST = 2
DATA = f"/local/domain/{GUEST}/data"


async def follow(emu: InProcessEmulator, seen: list[str], ready: asyncio.Event) -> None:
    """dom0: print every change under the guest's data directory, until ``done`` is removed."""
    async with await connect(emu.xenstore_path(0), timeout=5) as xs:
        async with xs.watch(DATA) as watch:
            async for path, _token in watch:
                if path == DATA:  # the initial event: the watch is in place
                    ready.set()
                    continue
                try:
                    value = (await xs.read(path)).decode()
                except XenstoreError as exc:  # removed since the event fired
                    value = f"<{exc.errno_name}>"
                print(f"dom0 saw {path} = {value}")
                seen.append(path.removeprefix(DATA + "/"))
                if path.endswith("/done") and value == "<ENOENT>":
                    return


async def guest(emu: InProcessEmulator) -> None:
    """dom2: write, update in a transaction, try a key it may not write, remove."""
    async with await connect(emu.xenstore_path(GUEST), timeout=5) as xs:
        await xs.write("data/greeting", "hello")  # relative: below /local/domain/2
        async with xs.transaction() as t:
            await t.write("data/temperature", "21")
            await t.write("data/unit", "C")
        try:
            await xs.write("/local/domain/1/data/intruder", "x")
        except XenstoreError as exc:
            print(f"dom2 may not write dom1's data: {exc.errno_name}")
        await xs.write("data/done", "1")
        await xs.rm("data/done")


async def main() -> int:
    """Run the watcher and the guest; returns the exit status."""
    with InProcessEmulator(domains=[1, GUEST]) as emu:
        seen: list[str] = []
        ready = asyncio.Event()
        watcher = asyncio.create_task(follow(emu, seen, ready))
        await asyncio.wait_for(ready.wait(), 10)
        await guest(emu)
        await asyncio.wait_for(watcher, 10)
        keys = ("greeting", "temperature", "unit", "done")
        for key in keys:
            assert key in seen, f"no event for {key}"
        # (``done`` may give one event or two: its write and its removal can be read as
        # one change if both happened before dom0 looked)
        print(f"watch done: events for {', '.join(keys)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))

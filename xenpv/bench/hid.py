"""``xenpv bench hid``: input events per second and injection-to-delivery latency, ours
against QEMU 7.2's vkbd, with the emulator's notify round trip as the floor.

Setup (the loopback daemon, one guest): device 0 is served by our
:class:`~xenpv.backends.keyboard.KeyboardBackendDriver` in this process (dom0), device 1
by QEMU (dom0's device model, through the replacement libraries, QMP on a Unix socket).
Each device has our frontend in its own process (``xenpv hid watch --timing``), so
frontend and backend are always in separate processes; the watcher reports the
monotonic receive time of every event (one clock for all processes of the machine).

* latency: ``LAT_EVENTS`` key events, one at a time, ``PACE_S`` apart; injection time is
  taken just before ``backend.send`` (ours) or before the QMP ``input-send-event``
  command is written (QEMU); p50 and p99 of receive minus injection, in µs;
* events per second: ``RATE_EVENTS`` key events injected back to back (ours: one
  ``send`` each; QEMU: one QMP command each, the way a VNC or QMP client feeds it), from
  the first injection to the last delivery;
* ``notify_rtt_us``: :func:`xenpv.bench.platform.notify_rtt_us` in the same run.

Targets: ``ours_latency_us_p50`` at most 1.5 times ``notify_rtt_us``; ours at least twice
QEMU's events per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from xenpv.bench.report import Ratio, Rounds, add_rounds_option, rounds_of
from xenpv.errors import LocalError

GUEST = 5
PACE_S = 0.002
LAT_EVENTS = 400
RATE_EVENTS = 2000
_KEYS = list(range(2, 52))


def configure(parser: argparse.ArgumentParser) -> None:
    """``--quick``: a smoke run (tiny counts, one round)."""
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    add_rounds_option(parser, 3)


def prerequisites() -> None:
    """QEMU's build for Xen must have been fetched (``xenpv peers fetch``)."""
    from xenpv import peers

    try:
        peers.find(peers.QEMU)
    except Exception as exc:
        raise LocalError(f"bench hid needs QEMU ({peers.QEMU}): {exc}") from None


def _key_events(n: int) -> list[tuple[int, bool]]:
    """n key events, press/release pairs cycling over 50 keys (nothing stays down)."""
    return [(_KEYS[(i // 2) % len(_KEYS)], i % 2 == 0) for i in range(n)]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Watcher:
    """``xenpv hid watch GUEST --devid D --timing --count N`` as the guest."""

    def __init__(self, lab: Any, devid: int, count: int, relative: bool) -> None:
        args = [sys.executable, "-m", "xenpv", "hid", "watch", str(GUEST), "--rundir",
                lab.rundir, "--devid", str(devid), "--count", str(count), "--timing"]
        if relative:
            args.append("--relative")
        self.proc = lab.spawn(GUEST, args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              bufsize=0)

    def line(self, timeout: float) -> dict[str, Any]:
        from xenpv.testing.vchan import read_line

        return dict(json.loads(read_line(self.proc, timeout)))


async def _measure(lab: Any, qmp_path: Path, n_lat: int, n_rate: int,
                   rec: Rounds, round_no: int) -> None:
    from xenpv.backends.hid.source import KeyInput
    from xenpv.backends.keyboard import KeyboardBackendDriver, KeyboardConfig
    from xenpv.xenbus.toolstack import add_device
    from xenpv.xenstore.client import connect

    xs0 = await connect(str(Path(lab.rundir) / "dom0" / "xenstore"))
    dom0 = lab.platform(0)
    be = None
    try:
        ours_dev, qemu_dev = 2 * round_no, 2 * round_no + 1  # fresh devices each round
        ours_info = await add_device(xs0, "vkbd", GUEST, 0, ours_dev,
                                     backend_type="vkbd-xenpv")
        qemu_info = await add_device(xs0, "vkbd", GUEST, 0, qemu_dev)
        be = KeyboardBackendDriver(dom0, xs0, ours_info.backend_path,
                                   KeyboardConfig(backlog=1 << 16, rate_allowance=1 << 20))
        await be.start()
        qmp = await _Qmp.connect(qmp_path, 30.0)
        try:
            for which, devid in (("ours", ours_dev), ("qemu", qemu_dev)):
                for kind, n in (("latency", n_lat), ("rate", n_rate)):
                    watcher = _Watcher(lab, devid, n, relative=True)
                    ready = await asyncio.to_thread(watcher.line, 60.0)
                    if ready.get("event") != "ready":
                        raise LocalError(f"watcher: {ready}")
                    if which == "ours":
                        async with asyncio.timeout(30):
                            while be.session is None:
                                await asyncio.sleep(0.01)
                    else:
                        async with asyncio.timeout(30):
                            while await xs0.read(f"{qemu_info.backend_path}/state") != b"4":
                                await asyncio.sleep(0.01)
                        await asyncio.sleep(0.2)  # QEMU's input handler follows Connected
                    sent: list[float] = []
                    for code, down in _key_events(n):
                        sent.append(time.monotonic())
                        if which == "ours":
                            be.send(KeyInput(code, down))
                        else:
                            await qmp.key(code, down)
                        if kind == "latency":
                            await asyncio.sleep(PACE_S)
                        elif which == "ours" and len(sent) % 64 == 0:
                            await asyncio.sleep(0)  # let the backend see the frontend
                    done = await asyncio.to_thread(watcher.line, 60.0)
                    times = done.get("times", [])
                    if len(times) != n:
                        raise LocalError(f"{which}: {len(times)} of {n} events arrived")
                    if kind == "latency":
                        lat = [(t - s) * 1e6 for s, t in zip(sent, times, strict=True)]
                        rec.add(f"{which}_latency_us_p50", statistics.median(lat))
                        rec.add(f"{which}_latency_us_p99", _percentile(lat, 0.99))
                    else:
                        rec.add(f"{which}_events_per_s", n / (times[-1] - sent[0]))
                    assert watcher.proc.stdin is not None
                    watcher.proc.stdin.close()
                    await asyncio.to_thread(watcher.proc.wait, 30)
        finally:
            qmp.close()
    finally:
        if be is not None:
            await be.close()
        await xs0.close()


class _Qmp:
    """Enough QMP for key events (qcodes by Linux code for the keys used)."""

    _QCODES = {2: "1", 3: "2", 4: "3", 5: "4", 6: "5", 7: "6", 8: "7", 9: "8", 10: "9",
               11: "0", 12: "minus", 13: "equal", 14: "backspace", 15: "tab", 16: "q",
               17: "w", 18: "e", 19: "r", 20: "t", 21: "y", 22: "u", 23: "i", 24: "o",
               25: "p", 26: "bracket_left", 27: "bracket_right", 28: "ret", 29: "ctrl",
               30: "a", 31: "s", 32: "d", 33: "f", 34: "g", 35: "h", 36: "j", 37: "k",
               38: "l", 39: "semicolon", 40: "apostrophe", 41: "grave_accent",
               42: "shift", 43: "backslash", 44: "z", 45: "x", 46: "c", 47: "v", 48: "b",
               49: "n", 50: "m", 51: "comma"}

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path, timeout: float) -> _Qmp:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    reader, writer = await asyncio.open_unix_connection(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await asyncio.sleep(0.05)
            q = cls(reader, writer)
            await reader.readline()
            await q._execute({"execute": "qmp_capabilities"})
            return q

    async def _execute(self, msg: dict[str, Any]) -> None:
        self.writer.write(json.dumps(msg).encode() + b"\n")
        while True:
            reply = json.loads(await self.reader.readline())
            if "return" in reply:
                return
            if "error" in reply:
                raise LocalError(f"QMP: {reply['error']}")

    async def key(self, code: int, down: bool) -> None:
        event = {"type": "key", "data": {"down": down,
                                         "key": {"type": "qcode", "data": self._QCODES[code]}}}
        await self._execute({"execute": "input-send-event", "arguments": {"events": [event]}})

    def close(self) -> None:
        self.writer.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, medians over rounds, ratios and targets."""
    from xenpv import peers
    from xenpv.bench.platform import notify_rtt_us, placements
    from xenpv.testing.vchan import VchanLab

    prerequisites()
    quick = bool(getattr(args, "quick", False))
    rounds = rounds_of(args, 3)
    n_lat, n_rate, n_rtt = (20, 100, 50) if quick else (LAT_EVENTS, RATE_EVENTS, 2000)
    rec = Rounds("hid")
    cpus = placements().get("cross", placements()["same"])
    with VchanLab(domains=(1, GUEST)) as lab:
        qmp_path = Path(lab.rundir) / "qmp.sock"
        lab.spawn(0, peers.qemu_device_model(GUEST, qmp_path),
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for r in range(rounds):
            rec.add("notify_rtt_us", notify_rtt_us(lab.rundir, n_rtt, cpus))
            asyncio.run(_measure(lab, qmp_path, n_lat, n_rate, rec, r))
    ratios = {
        "ours_latency_p50_vs_notify_rtt": Ratio("ours_latency_us_p50", "notify_rtt_us",
                                                "<= 1.5"),
        "ours_vs_qemu_events_per_s": Ratio("ours_events_per_s", "qemu_events_per_s", ">= 2"),
        "ours_vs_qemu_latency_p50": Ratio("ours_latency_us_p50", "qemu_latency_us_p50"),
    }
    units = {k: "µs" if k.endswith("_us") or "_us_" in k else "events/s"
             for k in rec.samples}
    better = {k: "lower" for k in rec.samples if "_latency_us_" in k}
    return rec.result(ratios=ratios, units=units, better=better)

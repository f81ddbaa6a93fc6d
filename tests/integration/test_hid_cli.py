"""``xenpv device add vkbd`` and ``xenpv hid``: backend and frontends in separate processes.

The toolstack adds two vkbd devices (guests A and B, one with a multi-touch surface) on
the loopback daemon; ``xenpv hid backend`` serves both; ``xenpv hid watch`` runs as each
guest; ``xenpv hid inject`` types, ``xenpv hid focus`` switches and ``xenpv hid list``
reports.  Each watcher prints exactly the events typed while its guest had the focus,
plus the releases of the switch.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from cli_support import json_line, xenpv

from xenpv.platforms.loopback.harness import DaemonMachine
from xenpv.protocols.keycodes import NAMES

GUEST_A, GUEST_B = 21, 22
WAIT = 30.0


def cli(*args: str) -> str:
    res = subprocess.run(xenpv(*args), capture_output=True, text=True, timeout=WAIT)
    assert res.returncode == 0, res.stderr
    return res.stdout


def inputs(proc: subprocess.Popen[bytes], n: int) -> list[dict[str, object]]:
    out = []
    for _ in range(n):
        try:
            line = json_line(proc, WAIT)
        except AssertionError:
            raise AssertionError(f"only {out} of {n} events") from None
        assert line["event"] == "input", line
        out.append({k: v for k, v in line.items() if k not in ("event", "pressed_keys")})
    return out


def key(code: int, pressed: int) -> dict[str, object]:
    return {"type": "Key", "pressed": pressed, "keycode": code}


def test_backend_watch_inject_focus_list(procs: list[subprocess.Popen[bytes]]) -> None:
    machine = DaemonMachine(max_grants=64, max_ports=32)
    try:
        for g in (GUEST_A, GUEST_B):
            machine.create_domain(g)
        rundir = machine.rundir
        sock = str(Path(rundir) / "dom0" / "xenstore")
        cli("device", "add", "vkbd", "-f", str(GUEST_A), "-s", sock)
        cli("device", "add", "vkbd", "-f", str(GUEST_B), "-s", sock, "--multi-touch",
            "320x200x2")
        # unbuffered: several lines may arrive at once, and json_line selects on the fd
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "bufsize": 0}
        be = subprocess.Popen(xenpv("hid", "backend", "--rundir", rundir, "--width", "1000",
                                    "--height", "500"), **pipes)  # type: ignore[call-overload]
        procs.append(be)
        assert json_line(be, WAIT)["event"] == "ready"
        watchers = {}
        for g, extra in ((GUEST_A, ()), (GUEST_B, ("--multi-touch",))):
            w = subprocess.Popen(xenpv("hid", "watch", str(g), "--rundir", rundir, *extra),
                                 **pipes)  # type: ignore[call-overload]
            procs.append(w)
            ready = json_line(w, WAIT)
            assert ready["event"] == "ready"
            watchers[g] = (w, ready["mode"])
        assert watchers[GUEST_B][1]["multi_touch"] == [320, 200, 2]  # type: ignore[index]
        assert watchers[GUEST_A][1]["multi_touch"] is None  # type: ignore[index]
        # the backend reports focus changes; the first guest connected has it
        focus = json_line(be, WAIT)
        assert focus["event"] == "focus"
        first = int(focus["domid"])  # type: ignore[call-overload]
        other = GUEST_B if first == GUEST_A else GUEST_A
        listing = cli("hid", "list", "--rundir", rundir)
        assert f"focus: {first}" in listing and "sources: api" in listing

        cli("hid", "inject", "--rundir", rundir, "a", "+leftshift", "abs:500,250,1000,500")
        w1, w2 = watchers[first][0], watchers[other][0]
        assert inputs(w1, 4) == [
            key(NAMES["A"], 1), key(NAMES["A"], 0), key(NAMES["LEFTSHIFT"], 1),
            {"type": "Position", "abs_x": 500, "abs_y": 250, "rel_z": 0}]
        cli("hid", "focus", "--rundir", rundir, str(other))
        assert json_line(be, WAIT) == {"event": "focus", "domid": other}
        # the guest losing the focus gets shift released
        assert inputs(w1, 1) == [key(NAMES["LEFTSHIFT"], 0)]
        cli("hid", "inject", "--rundir", rundir, "--", "-leftshift", "b")
        assert inputs(w2, 2) == [key(NAMES["B"], 1), key(NAMES["B"], 0)]
        # the hotkey switches back and is not delivered anywhere
        cli("hid", "inject", "--rundir", rundir, "--", "+rightctrl", "scrolllock",
            "-rightctrl", "c")
        assert json_line(be, WAIT) == {"event": "focus", "domid": first}
        assert inputs(w2, 2) == [key(NAMES["RIGHTCTRL"], 1), key(NAMES["RIGHTCTRL"], 0)]
        assert inputs(w1, 2) == [key(NAMES["C"], 1), key(NAMES["C"], 0)]
        res = subprocess.run(xenpv("hid", "inject", "--rundir", rundir, "nosuchkey"),
                             capture_output=True, text=True, timeout=WAIT)
        assert res.returncode == 1 and "bad event" in res.stderr
        # one line, naming the subcommand, never a traceback
        assert res.stderr.startswith("xenpv hid inject: ") and res.stderr.count("\n") == 1
        for p in (w1, w2, be):
            assert p.stdin is not None
            p.stdin.close()
            assert p.wait(WAIT) == 0
        machine.assert_released()
    finally:
        machine.close()

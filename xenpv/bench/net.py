"""``xenpv bench net``: iperf3 between two kernel stacks through our net pair, through our
frontend on QEMU 10's net backend, and through a veth pair between the same two
namespaces (the kernel's floor), in one run.

Setup (made and removed by the run; needs root, ``ip`` and the peers tree's ``iperf3`` and
QEMU 10, which ``xenpv peers fetch`` brings): two network namespaces, a "guest" one and
a "dom0" one, joined three ways:

* ``ours``: the loopback daemon with one guest; ``xenpv net backend --all --tap … --netns
  DOM0`` as dom0 in its own process (its TAP, two queues, on the backend's userspace
  switch) and ``xenpv net frontend 0 --tap … --netns GUEST`` as the guest in another (a
  TAP with one queue per vif queue); the vif has two queues, checksum and TSO offload on
  both TAPs, so 64 KiB TCP frames cross the rings as GSO.  Addresses 198.18.0.1 (dom0)
  and 198.18.0.2 (guest).
* ``qemu``: on the same loopback daemon, QEMU 10 as dom0's device model serving the
  guest's vif 1 (``xen-net-device`` over a TAP netdev it creates in the dom0 namespace,
  :func:`xenpv.testing.qemunet.start_qemu_net`) and ``xenpv net frontend 1 --tap …
  --netns GUEST`` as the guest in its own process.  QEMU offers ``feature-rx-copy`` only:
  one queue, no scatter-gather, no offloads, so our frontend cuts the guest kernel's TSO
  frames into MSS-sized segments before they leave.  198.18.1.1 and 198.18.1.2.
* ``veth``: a veth pair between the two namespaces, 198.19.0.1 and 198.19.0.2, the
  kernel's own offloads as they are by default.

One ``iperf3`` server runs in the dom0 namespace for the whole run; each figure is one
``iperf3`` client in the guest namespace, for ``--duration`` seconds:

* ``PATH_tcp_gbps``: one TCP stream guest → dom0 (the receiver's bits per second);
* ``ours_tcp_rx_gbps``: one TCP stream dom0 → guest (``-R``);
* ``ours_tcp_2streams_gbps``: two TCP streams guest → dom0 (two flows, each on the
  queue its flow hash picks);
* ``PATH_udp_pps``: UDP datagrams of 64 bytes of payload sent as fast as the client can
  (``-b 0``), datagrams *received* per second (the receiver's bytes over 64: its loss
  count, from sequence gaps, is no count of what arrived).

The figures are interleaved over ``--rounds`` rounds (medians, spreads; see
:mod:`xenpv.bench.report`).  ``setup.cpu_per_second`` gives, for ours and QEMU's (last round),
the CPU seconds per second of the measurement used by the frontend process, the backend
process (ours or QEMU) and the emulator daemon (which does the grant copies): a process
near 1.0 is what bounds the path on this machine.  Nothing is pinned (placement
``unpinned``): the two iperf3 processes, the frontend and backend processes and the
daemon share the machine's CPUs.

Targets: ours at least twice QEMU for TCP and for UDP packets per second; ours at least a
tenth of veth for TCP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from xenpv.bench.report import Ratio, Rounds, add_rounds_option, rounds_of
from xenpv.errors import LocalError

GUEST = 7
MAC = "02:16:3e:00:07:00"
WAIT = 60.0
UDP_PAYLOAD = 64
PORT = 5201


class Route(NamedTuple):
    """A path between the two namespaces: the dom0 end's address (the iperf3 server)
    and the guest end's, both on a /24 of 198.18.0.0/15."""

    server: str
    client: str


#: Every path measured, by the prefix of its keys.
ROUTES: dict[str, Route] = {
    "ours": Route("198.18.0.1", "198.18.0.2"),
    "qemu": Route("198.18.1.1", "198.18.1.2"),
    "veth": Route("198.19.0.1", "198.19.0.2"),
}
#: The MAC of the guest's vif 1, the one QEMU serves.
QEMU_MAC = "02:16:3e:00:07:01"


def configure(parser: argparse.ArgumentParser) -> None:
    """``--quick``, ``--rounds``, ``--duration``."""
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    add_rounds_option(parser, 3)
    parser.add_argument("--duration", type=int, default=None, metavar="S",
                        help="seconds per iperf3 measurement (default 2; 1 with --quick)")


def prerequisites() -> None:
    """Root (network namespaces), ``ip``, and the peers tree's ``iperf3`` and QEMU 10."""
    from xenpv import peers

    if os.geteuid() != 0:
        raise LocalError("bench net creates network namespaces: run it as root")
    if shutil.which("ip") is None:
        raise LocalError("bench net needs 'ip' (iproute2)")
    peers.find("iperf3")
    peers.find(peers.QEMU10)


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if res.returncode != 0:
        raise LocalError(f"ip {' '.join(args)}: {res.stderr.strip()}")


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time process ``pid`` has used (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class NetLab:
    """The two namespaces, the veth pair, the loopback daemon with our backend and
    frontend processes, and the iperf3 server; :meth:`close` ends every process it
    started (by pid) and removes the namespaces."""

    def __init__(self, workdir: str) -> None:
        tag = f"xpvn{os.getpid() % 100000}"
        self.guest, self.dom0 = f"{tag}g", f"{tag}d"
        self.gtap, self.dtap = f"{tag}gt", f"{tag}dt"
        self.gveth, self.dveth = f"{tag}gv", f"{tag}dv"
        self.gqtap, self.dqtap = f"{tag}gq", f"{tag}dq"
        self.workdir = Path(workdir)
        self.namespaces: list[str] = []
        self.lab: Any = None
        self.backend: subprocess.Popen[bytes] | None = None
        self.frontend: subprocess.Popen[bytes] | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.tests = 0  # iperf3 tests the server ran
        self.qemu: subprocess.Popen[Any] | None = None
        self.qemu_frontend: subprocess.Popen[bytes] | None = None
        self.qemu_log: Any = None
        self.ready: dict[str, Any] = {}
        self.qemu_ready: dict[str, Any] = {}
        self.done: dict[str, Any] = {}

    # -- setup ----------------------------------------------------------------------------
    def start(self) -> None:
        """Make everything; on failure the caller's :meth:`close` undoes what was made."""
        for ns in (self.guest, self.dom0):
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        self._start_veth()
        self._start_ours()
        self._start_qemu()
        self._start_server()

    def _start_veth(self) -> None:
        _ip("-n", self.guest, "link", "add", self.gveth, "type", "veth", "peer", "name",
            self.dveth, "netns", self.dom0)
        self._address(self.guest, self.gveth, ROUTES["veth"].client)
        self._address(self.dom0, self.dveth, ROUTES["veth"].server)

    def _address(self, ns: str, dev: str, addr: str) -> None:
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        _ip("-n", ns, "link", "set", dev, "up")

    def _start_ours(self) -> None:
        from xenpv.testing.vchan import VchanLab, read_line

        self.lab = VchanLab(domains=(GUEST,), max_grants=8192)
        rundir = self.lab.rundir
        xenpv = [sys.executable, "-m", "xenpv"]
        self.backend = self.lab.spawn(0, [*xenpv, "net", "backend", "--all", "--rundir",
                                          rundir, "--tap", self.dtap, "--netns", self.dom0,
                                          "--max-queues", "2", "--tap-queues", "2"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self._expect(self.backend, "backend", read_line)
        sock = str(Path(rundir) / "dom0" / "xenstore")
        subprocess.run([*xenpv, "device", "add", "vif", "-f", str(GUEST), "-s", sock,
                        "--mac", MAC], check=True, capture_output=True, text=True,
                       timeout=WAIT, env=self.lab.env(0))
        self.frontend = self.lab.spawn(GUEST, [*xenpv, "net", "frontend", "0", "--rundir",
                                               rundir, "--domid", str(GUEST), "--tap",
                                               self.gtap, "--netns", self.guest,
                                               "--max-queues", "2"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       bufsize=0)
        self.ready = self._expect(self.frontend, "frontend", read_line)
        self._address(self.guest, self.gtap, ROUTES["ours"].client)
        self._address(self.dom0, self.dtap, ROUTES["ours"].server)

    def _start_qemu(self) -> None:
        from xenpv.testing.qemunet import start_qemu_net
        from xenpv.testing.vchan import read_line

        self.qemu_log = open(self.workdir / "qemu.log", "wb")  # closed by close()
        self.qemu, _path = asyncio.run(start_qemu_net(
            self.lab, GUEST, netns=self.dom0, tap=self.dqtap, log=self.qemu_log, mac=QEMU_MAC,
            idx=1, timeout=WAIT))
        self.qemu_frontend = self.lab.spawn(
            GUEST, [sys.executable, "-m", "xenpv", "net", "frontend", "1", "--rundir",
                    self.lab.rundir, "--domid", str(GUEST), "--tap", self.gqtap, "--netns",
                    self.guest, "--max-queues", "1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.qemu_ready = self._expect(self.qemu_frontend, "frontend on QEMU", read_line)
        self._address(self.guest, self.gqtap, ROUTES["qemu"].client)
        self._address(self.dom0, self.dqtap, ROUTES["qemu"].server)

    @staticmethod
    def _expect(proc: subprocess.Popen[bytes], what: str,
                read_line: Callable[..., str]) -> dict[str, Any]:
        line: dict[str, Any] = json.loads(read_line(proc, WAIT))
        if line.get("event") != "ready":
            raise LocalError(f"net {what}: {line}")
        return line

    def _start_server(self) -> None:
        from xenpv import peers

        log = self.workdir / "iperf3-server.log"
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.dom0, str(peers.find("iperf3")), "-s", "-p",
             str(PORT), "--forceflush", "--logfile", str(log)],
            env=peers.run_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        self._listening(1)

    def _listening(self, test: int) -> None:
        """Wait until the server listens for its ``test``-th client: it opens its socket
        anew after each test (and says so), so a client right behind the previous one
        could find it closed."""
        log = self.workdir / "iperf3-server.log"
        deadline = time.monotonic() + 20.0
        assert self.server is not None
        while (log.read_text() if log.exists() else "").count("Server listening") < test:
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise LocalError(f"iperf3 server is not listening: {self._server_log()}")
            time.sleep(0.01)

    def _server_log(self) -> str:
        log = self.workdir / "iperf3-server.log"
        return (log.read_text() if log.exists() else "")[-500:]

    # -- measurements ---------------------------------------------------------------------
    def pids(self, route: str) -> dict[str, int]:
        """The processes of ``route`` (ours or qemu): frontend, backend, emulator daemon."""
        front, back = ((self.frontend, self.backend) if route == "ours"
                       else (self.qemu_frontend, self.qemu))
        assert front is not None and back is not None
        return {"front": front.pid, "back": back.pid, "emulator": self.lab.machine.proc.pid}

    def iperf(self, route: str, duration: int, *, udp: bool = False, streams: int = 1,
              reverse: bool = False) -> dict[str, Any]:
        """One iperf3 client in the guest namespace towards ``route``'s server; its JSON."""
        from xenpv import peers

        cmd = ["ip", "netns", "exec", self.guest, str(peers.find("iperf3")), "-c",
               ROUTES[route].server, "-p", str(PORT), "-J", "-t", str(duration),
               "-P", str(streams), "--connect-timeout", "5000"]
        if udp:
            cmd += ["-u", "-l", str(UDP_PAYLOAD), "-b", "0"]
        if reverse:
            cmd.append("-R")
        self._listening(self.tests + 1)
        res = subprocess.run(cmd, env=peers.run_env(), capture_output=True, text=True,
                             timeout=WAIT + duration)
        self.tests += 1
        try:
            out: dict[str, Any] = json.loads(res.stdout)
        except ValueError:
            out = {"error": (res.stdout + res.stderr).strip()[-500:]}
        if res.returncode != 0 or "error" in out:
            raise LocalError(f"iperf3 {route}{' udp' if udp else ''}: {out.get('error')}; "
                             f"server: {self._server_log()}")
        return out

    # -- teardown -------------------------------------------------------------------------
    def close(self) -> None:
        """End our processes (the backend and frontend report their counters first), the
        iperf3 server and the daemon; remove the namespaces."""
        from xenpv.testing.vchan import read_line

        # the backend first: it reports its queues' counters while still connected
        for name, proc in (("backend", self.backend), ("frontend", self.frontend),
                           ("qemu_frontend", self.qemu_frontend)):
            if proc is None or proc.poll() is not None or proc.stdin is None:
                continue
            with contextlib.suppress(Exception):
                proc.stdin.close()
                self.done[name] = json.loads(read_line(proc, WAIT))
                proc.wait(WAIT)
        if self.server is not None:
            if self.server.poll() is None:
                self.server.kill()  # `ip netns exec` exec'd iperf3: the same pid
            self.server.wait(WAIT)
            if self.server.stderr is not None:
                self.server.stderr.close()
        if self.lab is not None:
            self.lab.close()  # kills what it spawned and still runs (QEMU), stops the daemon
        if self.qemu_log is not None:
            self.qemu_log.close()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self.namespaces.clear()


def tcp_gbps(out: dict[str, Any]) -> float:
    """The receiver's throughput of an iperf3 TCP run (GB/s of bits: Gbit/s)."""
    return float(out["end"]["sum_received"]["bits_per_second"]) / 1e9


def udp_pps(out: dict[str, Any]) -> float:
    """Datagrams received per second of an iperf3 UDP run: the bytes the receiver got
    over the datagram size (its loss count, from sequence gaps, is no count of what
    arrived)."""
    s = out["end"]["sum_received"]
    seconds = float(s["seconds"])
    return int(s["bytes"]) / UDP_PAYLOAD / seconds if seconds > 0 else 0.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, medians over rounds, ratios and targets."""
    prerequisites()
    quick = bool(getattr(args, "quick", False))
    rounds = rounds_of(args, 3)
    duration = args.duration if args.duration is not None else (1 if quick else 2)
    if duration < 1:
        raise LocalError("--duration must be at least 1 second")
    rec = Rounds("net")
    cpu: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="xenpv-bench-net-") as tmp:
        lab = NetLab(tmp)
        try:
            lab.start()

            def measure(key: str, route: str, figure: Callable[[dict[str, Any]], float],
                        **kw: Any) -> Callable[[], float]:
                def one() -> float:
                    pids = lab.pids(route) if route != "veth" else {}
                    before = {k: _cpu_seconds(p) for k, p in pids.items()}
                    t0 = time.monotonic()
                    value = figure(lab.iperf(route, duration, **kw))
                    seconds = time.monotonic() - t0
                    if pids:
                        cpu[key] = {k: round((_cpu_seconds(p) - before[k]) / seconds, 3)
                                    for k, p in pids.items()}
                    if value <= 0:
                        raise LocalError(f"{key}: nothing got through")
                    return value
                return one

            rec.interleave(rounds, {
                "ours_tcp_gbps": measure("ours_tcp_gbps", "ours", tcp_gbps),
                "veth_tcp_gbps": measure("veth_tcp_gbps", "veth", tcp_gbps),
                "ours_tcp_rx_gbps": measure("ours_tcp_rx_gbps", "ours", tcp_gbps,
                                            reverse=True),
                "ours_tcp_2streams_gbps": measure("ours_tcp_2streams_gbps", "ours",
                                                  tcp_gbps, streams=2),
                "ours_udp_pps": measure("ours_udp_pps", "ours", udp_pps, udp=True),
                "veth_udp_pps": measure("veth_udp_pps", "veth", udp_pps, udp=True),
                "qemu_tcp_gbps": measure("qemu_tcp_gbps", "qemu", tcp_gbps),
                "qemu_udp_pps": measure("qemu_udp_pps", "qemu", udp_pps, udp=True),
            })
        finally:
            lab.close()
    ratios = {
        "ours/qemu tcp": Ratio("ours_tcp_gbps", "qemu_tcp_gbps", ">= 2"),
        "ours/qemu udp": Ratio("ours_udp_pps", "qemu_udp_pps", ">= 2"),
        "ours/veth tcp": Ratio("ours_tcp_gbps", "veth_tcp_gbps", ">= 0.1"),
        "ours/veth udp": Ratio("ours_udp_pps", "veth_udp_pps"),
        "ours 2 streams/1 stream tcp": Ratio("ours_tcp_2streams_gbps", "ours_tcp_gbps"),
    }
    units = {k: "Gbit/s" if k.endswith("_gbps") else "packets/s" for k in rec.samples}
    back = lab.done.get("backend", {})
    front = lab.done.get("frontend", {})
    qfront = lab.done.get("qemu_frontend", {})
    setup = {"duration_s": duration, "udp_payload_bytes": UDP_PAYLOAD,
             "routes": {k: r._asdict() for k, r in ROUTES.items()},
             "queues": lab.ready.get("queues"), "qemu_queues": lab.qemu_ready.get("queues"),
             "offload": True,
             "cpu_per_second": cpu,
             "frontend_stats": (front.get("vif") or {}).get("stats"),
             "qemu_frontend_stats": (qfront.get("vif") or {}).get("stats"),
             "qemu_backend_features": (qfront.get("vif") or {}).get("backend_features"),
             "frontend_tap": front.get("tap"), "backend_tap": back.get("tap")}
    placement = "unpinned: iperf3 client and server, the frontend and backend processes " \
                "(ours, QEMU) and the emulator daemon share every CPU"
    return rec.result(units=units, ratios=ratios, placement=placement, extra={"setup": setup})

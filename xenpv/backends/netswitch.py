"""A learning Ethernet switch in the backend process: vifs talk without the kernel.

Theory of operation
-------------------
A :class:`NetSwitch` joins ports (:class:`SwitchPort`, one per vif, each with a
``deliver(frame)`` callable that queues a frame towards its guest).  A frame a port
sends in (:meth:`SwitchPort.send`) is forwarded as a learning switch does:

* its source MAC is learnt for the port (group addresses never are); the table is bounded
  (``max_macs``, oldest forgotten first) and a port's entries go when it leaves;
* a group destination (broadcast, multicast) or an unknown unicast one is flooded to
  every other port; a known one goes to its port only, and not at all if that is the
  port it came from.

Each port counts what came in from its guest (``rx_*``) and what went out to it
(``tx_*``), floods and drops; a delivery that raises is counted as a drop and never
reaches the sender.  Everything runs synchronously in the caller's loop turn, so a frame
is at its destination's ring (or in its backlog) when :meth:`SwitchPort.send` returns.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from xenpv.drivers.tap import TapDevice, TapPump
from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.protocols.ethernet import ETH_HLEN, NetFrame, is_multicast, mac_text

__all__ = ["NetSwitch", "SwitchPort", "TapUplink"]

log = logging.getLogger(__name__)

#: Largest MAC table by default (entries; the oldest is forgotten first).
DEFAULT_MAX_MACS = 1024


class SwitchPort:
    """One port of a :class:`NetSwitch`; made by :meth:`NetSwitch.attach`."""

    def __init__(self, switch: NetSwitch, name: str,
                 deliver: Callable[[NetFrame], object]) -> None:
        """Joined to ``switch``; ``deliver`` takes frames for this port's guest."""
        self.switch = switch
        self.name = name
        self.deliver = deliver
        self.stats = dict.fromkeys(("rx_packets", "rx_bytes", "tx_packets", "tx_bytes",
                                    "flooded", "dropped", "runts"), 0)

    def send(self, frame: NetFrame) -> int:
        """Forward a frame from this port's guest; returns the ports it reached."""
        return self.switch.forward(self, frame)

    def detach(self) -> None:
        """Leave the switch (its learnt MACs are forgotten)."""
        self.switch.detach(self)

    def info(self) -> dict[str, object]:
        """Counters and the MACs learnt on this port."""
        return {"name": self.name, **self.stats,
                "macs": [mac_text(m) for m, p in self.switch.table.items() if p is self]}


class NetSwitch:
    """A learning switch; see the module docstring."""

    def __init__(self, name: str = "xenpv0", *, max_macs: int = DEFAULT_MAX_MACS) -> None:
        """An empty switch."""
        if max_macs < 1:
            raise LocalError("max_macs must be positive")
        self.name = name
        self.max_macs = max_macs
        self.ports: list[SwitchPort] = []
        self.table: OrderedDict[bytes, SwitchPort] = OrderedDict()

    def attach(self, name: str, deliver: Callable[[NetFrame], object]) -> SwitchPort:
        """A new port whose frames go to ``deliver``."""
        port = SwitchPort(self, name, deliver)
        self.ports.append(port)
        return port

    def detach(self, port: SwitchPort) -> None:
        """Remove ``port`` and forget its MACs (idempotent)."""
        if port in self.ports:
            self.ports.remove(port)
        for mac in [m for m, p in self.table.items() if p is port]:
            del self.table[mac]

    def _learn(self, mac: bytes, port: SwitchPort) -> None:
        if is_multicast(mac):
            return
        table = self.table
        if table.get(mac) is not port:
            table[mac] = port
            while len(table) > self.max_macs:
                table.popitem(last=False)
        table.move_to_end(mac)

    def forward(self, src: SwitchPort, frame: NetFrame) -> int:
        """Learn and forward one frame that came in on ``src``; returns ports reached."""
        if src not in self.ports:
            return 0
        data = frame.data
        n = len(data)
        stats = src.stats
        stats["rx_packets"] += 1
        stats["rx_bytes"] += n
        if n < ETH_HLEN:
            stats["runts"] += 1
            return 0
        dst_mac = data[0:6]
        self._learn(data[6:12], src)
        dst = None if is_multicast(dst_mac) else self.table.get(dst_mac)
        if dst is src:
            return 0
        if dst is None:
            stats["flooded"] += 1
            targets = [p for p in self.ports if p is not src]
        else:
            targets = [dst]
        reached = 0
        for port in targets:
            try:
                port.deliver(frame)
            except (LocalError, PeerError, PlatformError) as exc:
                port.stats["dropped"] += 1
                log.debug("switch %s: delivery to %s failed: %s", self.name, port.name, exc)
                continue
            port.stats["tx_packets"] += 1
            port.stats["tx_bytes"] += n
            reached += 1
        return reached

    def info(self) -> dict[str, object]:
        """Ports, their counters and the MAC table size."""
        return {"name": self.name, "macs": len(self.table),
                "ports": [p.info() for p in self.ports]}


class TapUplink:
    """A TAP device as a port of a switch: frames the kernel sends go into the switch,
    frames the switch forwards to it go to the kernel (a kernel stack, possibly in
    another network namespace, behind the backend)."""

    def __init__(self, switch: NetSwitch, tap: TapDevice) -> None:
        """Join ``tap`` to ``switch``; :meth:`start` begins reading it."""
        self.tap = tap
        self.port = switch.attach(f"tap:{tap.name}", tap.write)
        self.pump = TapPump(tap, self._forward)

    def _forward(self, frames: list[NetFrame]) -> bool:
        # synchronous: the pump forwards from its reader callback, no task per pass
        send = self.port.send
        for frame in frames:  # delivered to the guests' RX rings in one copy per pass
            send(frame)
        return True

    def start(self) -> None:
        """Read the TAP in the running loop."""
        self.pump.start()

    async def close(self) -> None:
        """Stop reading, leave the switch, close the TAP."""
        await self.pump.close()
        self.port.detach()

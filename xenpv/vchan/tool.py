"""A small vchan workhorse for scripts, tests and benchmarks: ``python -m xenpv.vchan.tool``.

It runs as the domain given by its environment (``xenpv loopback env``, or real Xen) and
moves a stream through one vchan with the blocking API::

    python -m xenpv.vchan.tool server CLIENT_DOMID PATH [--send N] [--recv N] [--read-min B] [--write-min B]
    python -m xenpv.vchan.tool client SERVER_DOMID PATH [--send N] [--recv N]

Both directions run at once (one thread, never blocking on one direction while the other
could progress).  The bytes sent are slices of a random 1 MiB block at varying offsets,
written in ``--chunk`` sized pieces.  One JSON object per line goes to stdout:
``{"event": "ready", ...}`` once the vchan is up (server: published), then
``{"event": "done", "sent": N, "sent_crc": C, "received": M, "received_crc": D}`` where the
CRCs are zlib CRC-32 values of everything sent and received.  ``--recv -1`` reads until
the peer closes; ``--hold`` keeps the vchan open after the transfer until the peer goes
(then ``{"event": "peer-closed"}``) or stdin is closed (``{"event": "released"}``).  Exit status 0, or 2 if the stream broke.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
import zlib
from typing import Any

from xenpv.errors import PeerError
from xenpv.vchan.endpoint import VchanClient, VchanEndpoint, VchanServer

_BLOCK = 1 << 20


def emit(**fields: Any) -> None:
    """Print one JSON line and flush."""
    print(json.dumps(fields), flush=True)


def duplex(ep: VchanEndpoint, send_total: int, recv_total: int, chunk: int,
           timeout: float = 120.0) -> dict[str, int]:
    """Send ``send_total`` bytes and receive ``recv_total`` bytes (``-1``: until the peer
    closes) at the same time; returns counts and CRC-32s of both directions."""
    block = os.urandom(_BLOCK)
    src = memoryview(block + block[:chunk])
    buf = bytearray(max(chunk, 1))
    sent = received = 0
    sent_crc = received_crc = 0
    offset = 0
    deadline = time.monotonic() + timeout
    peer_gone = False
    while sent < send_total or (recv_total < 0 and not peer_gone) or received < recv_total:
        progress = False
        if sent < send_total:
            piece = src[offset : offset + min(chunk, send_total - sent)]
            n = ep.send_nowait(piece)
            if n:
                sent_crc = zlib.crc32(piece[:n], sent_crc)
                sent += n
                offset = (offset + n + 7) % _BLOCK
                progress = True
        if recv_total < 0 or received < recv_total:
            want = len(buf) if recv_total < 0 else min(len(buf), recv_total - received)
            n = ep.recv_nowait(buf, want)
            if n:
                received_crc = zlib.crc32(memoryview(buf)[:n], received_crc)
                received += n
                progress = True
            elif not ep.is_open:
                n = ep.recv_nowait(buf, want)
                if not n:
                    peer_gone = True
                    if recv_total >= 0 or sent < send_total:
                        break
                    continue
                received_crc = zlib.crc32(memoryview(buf)[:n], received_crc)
                received += n
                progress = True
        if not progress:
            if time.monotonic() > deadline:
                raise TimeoutError(f"vchan transfer stalled: sent {sent}, received {received}")
            if ep._spin(lambda: ep.rings.data_ready() or ep.rings.buffer_space()):
                continue
            ep.wait_event(0.5)
    return {"sent": sent, "sent_crc": sent_crc, "received": received,
            "received_crc": received_crc}


def _stdin_closed() -> bool:
    ready, _, _ = select.select([sys.stdin], [], [], 0)
    return bool(ready) and not os.read(sys.stdin.fileno(), 4096)


def _hold(ep: VchanEndpoint) -> str:
    """Keep the vchan open until the peer leaves ("peer-closed") or our stdin is closed
    ("released")."""
    while ep.is_open:
        if _stdin_closed():
            return "released"
        ep.wait_event(0.1)
    return "peer-closed"


def _platform() -> Any:
    from xenpv.platforms.loopback.client import ClientPlatform

    return ClientPlatform()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m xenpv.vchan.tool", description=__doc__.split("\n")[0])
    p.add_argument("role", choices=["server", "client"])
    p.add_argument("peer", type=int, help="the other domain")
    p.add_argument("path", help="xenstore path of the vchan")
    p.add_argument("--send", type=int, default=0, help="bytes to send")
    p.add_argument("--recv", type=int, default=0, help="bytes to receive (-1: until EOF)")
    p.add_argument("--chunk", type=int, default=1 << 16)
    p.add_argument("--read-min", type=int, default=0)
    p.add_argument("--write-min", type=int, default=0)
    p.add_argument("--hold", action="store_true", help="stay until the peer goes away")
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    platform = _platform()
    ep: VchanEndpoint
    if args.role == "server":
        ep = VchanServer(platform, args.peer, args.path, read_min=args.read_min,
                         write_min=args.write_min)
        emit(event="ready", port=ep.port, ring_ref=ep.ctrl.refs[0])
        ep.wait_connected(args.timeout)
    else:
        ep = VchanClient(platform, args.peer, args.path)
        emit(event="ready", port=ep.port)
    status = 0
    try:
        result = duplex(ep, args.send, args.recv, args.chunk, args.timeout)
        emit(event="done", **result)
        if args.hold:
            emit(event=_hold(ep))
    except (PeerError, BrokenPipeError, TimeoutError) as exc:
        emit(event="error", error=f"{type(exc).__name__}: {exc}")
        status = 2
    finally:
        ep.close()
        platform.close()
    return status


if __name__ == "__main__":
    sys.exit(main())

"""A small vchan workhorse for scripts, tests and benchmarks: ``python -m xenpv.vchan.tool``.

It runs as the domain given by its environment (``xenpv loopback env``, or real Xen) and
moves a stream through one vchan with the blocking API::

    python -m xenpv.vchan.tool server CLIENT_DOMID PATH [--send N] [--recv N] [--read-min B] [--write-min B]
    python -m xenpv.vchan.tool client SERVER_DOMID PATH [--send N] [--recv N]

Both directions run at once (one thread, never blocking on one direction while the other
could progress).  The bytes sent are slices of a random block (``--block``, 1 MiB by default) at
varying offsets, written in ``--chunk`` sized pieces.  One JSON object per line goes to stdout:
``{"event": "ready", ...}`` once the vchan is up (server: published), then
``{"event": "done", "sent": N, "sent_crc": C, "received": M, "received_crc": D, ...}`` where
the CRCs are zlib CRC-32 values of everything sent and received (the rest: timings and
notification counts, see :func:`duplex`).  ``--recv -1`` reads until
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
from xenpv.platforms.choose import open_platform
from xenpv.vchan.endpoint import VchanClient, VchanEndpoint, VchanServer

_BLOCK = 1 << 20


def emit(**fields: Any) -> None:
    """Print one JSON line and flush."""
    print(json.dumps(fields), flush=True)


def duplex(ep: VchanEndpoint, send_total: int, recv_total: int, chunk: int,
           timeout: float = 120.0, crc: bool = True, read_size: int = 0,
           block: int = _BLOCK) -> dict[str, Any]:
    """Send ``send_total`` bytes and receive ``recv_total`` bytes (``-1``: until the peer
    closes) at the same time; returns counts and CRC-32s of both directions (0 without
    ``crc``), ``recv_seconds`` (the time from the first to the last byte received),
    ``cpu_seconds`` (this process's CPU time over the transfer) and the endpoint's
    ``notifies`` and ``sleeps``.  The bytes sent are slices of a random ``block``-byte
    block at offsets that advance by each write (plus 7 with ``crc``, so that reordered
    or repeated data changes the CRC).  A one-way transfer uses the blocking calls
    (``send``/``recv_into``, which poll the ring before sleeping; ``timeout`` bounds each
    wait, and the whole transfer is checked against it every 256 calls), with nothing
    else per call but the bookkeeping: a benchmark's loop.  Both ways at once use the
    non-blocking calls and :meth:`~VchanEndpoint.idle` when neither moved."""
    first_recv = last_recv = 0.0
    data = os.urandom(block)
    src = memoryview(data * (1 + -(-chunk // block)))  # any offset < block has chunk bytes
    buf = bytearray(max(read_size or chunk, 1))
    view = memoryview(buf)
    sent = received = 0
    sent_crc = received_crc = 0
    offset = 0
    deadline = time.monotonic() + timeout
    peer_gone = False
    cpu0 = time.process_time()
    one_way = not recv_total or not send_total  # the blocking calls do the waiting
    send, recv_into, clock = ep.send, ep.recv_into, time.perf_counter
    whole = src[:chunk]  # the usual piece (offset 0, a whole chunk)
    cycle = chunk % block != 0
    calls = 0
    while one_way and sent < send_total:
        n = min(chunk, send_total - sent)
        piece = whole if offset == 0 and n == chunk else src[offset : offset + n]
        sent += send(piece, timeout)
        if crc:
            sent_crc = zlib.crc32(piece, sent_crc)
            offset = (offset + n + 7) % block
        elif cycle or n != chunk:  # else offset + chunk is offset again (mod block)
            offset = (offset + n) % block
        calls += 1
        if not calls & 255 and time.monotonic() > deadline:
            raise TimeoutError(f"vchan transfer too slow: sent {sent} of {send_total}")
    size = len(buf)
    while one_way and (recv_total < 0 or received < recv_total):
        want = size if recv_total < 0 or recv_total - received >= size else recv_total - received
        n = recv_into(buf, want, timeout)
        if not n:
            break
        last_recv = clock()
        if not received:
            first_recv = last_recv
        if crc:
            received_crc = zlib.crc32(view[:n], received_crc)
        received += n
        calls += 1
        if not calls & 255 and time.monotonic() > deadline:
            raise TimeoutError(f"vchan transfer too slow: received {received}")
    while not one_way and (sent < send_total or (recv_total < 0 and not peer_gone)
                           or received < recv_total):
        progress = False
        if sent < send_total:
            piece = src[offset : offset + min(chunk, send_total - sent)]
            n = ep.send_nowait(piece)
            if n:
                if crc:
                    sent_crc = zlib.crc32(piece[:n], sent_crc)
                sent += n
                offset = (offset + n + (7 if crc else 0)) % block
                progress = True
        if recv_total < 0 or received < recv_total:
            want = len(buf) if recv_total < 0 else min(len(buf), recv_total - received)
            n = ep.recv_nowait(buf, want)
            if n:
                last_recv = time.perf_counter()
                if not received:
                    first_recv = last_recv
                progress = True
            elif not ep.is_open:
                n = ep.recv_nowait(buf, want)
                if not n:
                    peer_gone = True
                    if recv_total >= 0 or sent < send_total:
                        break
                    continue
                progress = True
            if n:
                if crc:
                    received_crc = zlib.crc32(view[:n], received_crc)
                received += n
        if not progress:
            if time.monotonic() > deadline:
                raise TimeoutError(f"vchan transfer stalled: sent {sent}, received {received}")
            ep.idle(reading=recv_total < 0 or received < recv_total,
                    writing=sent < send_total, timeout=0.5)
    return {"sent": sent, "sent_crc": sent_crc, "received": received,
            "received_crc": received_crc, "recv_seconds": last_recv - first_recv,
            "cpu_seconds": time.process_time() - cpu0, "notifies": ep.notifies,
            "sleeps": ep.sleeps}


def echo(ep: VchanEndpoint, timeout: float) -> int:
    """Send back everything received until the peer closes; returns the bytes echoed."""
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    total = 0
    while True:
        try:
            n = ep.recv_into(buf, -1, timeout)
        except TimeoutError:
            return total
        if not n:
            return total
        ep.send(view[:n], timeout)
        total += n


def pingpong(ep: VchanEndpoint, count: int, size: int, timeout: float) -> dict[str, Any]:
    """``count`` round trips of ``size``-byte messages; returns median and mean in µs."""
    msg = os.urandom(size)
    back = bytearray(size)  # read back in place, as a C program would
    times: list[float] = []
    clock = time.perf_counter
    for _ in range(count):
        t0 = clock()
        ep.send(msg, timeout)
        ep.recv_exactly_into(back, size, timeout)
        times.append(clock() - t0)
        if back != msg:
            raise ValueError("ping-pong message came back changed")
    times.sort()
    return {"count": count, "size": size, "rtt_us_median": times[len(times) // 2] * 1e6,
            "rtt_us_mean": sum(times) / len(times) * 1e6}


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
    p.add_argument("--no-crc", action="store_true", help="skip the CRCs (benchmarks)")
    p.add_argument("--echo", action="store_true", help="echo everything until the peer closes")
    p.add_argument("--pingpong", type=int, default=0, metavar="COUNT",
                   help="measure COUNT round trips of --size byte messages")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--platform", choices=["loopback", "xen"], default="loopback",
                   help="the emulator's client (default) or Xen's C libraries (on the "
                   "emulator, its replacement libraries)")
    p.add_argument("--read-size", type=int, default=0, help="receive buffer (default: --chunk)")
    p.add_argument("--block", type=int, default=_BLOCK,
                   help="size of the random block the bytes sent are sliced from")
    p.add_argument("--spin-us", type=int, default=None, help="spin before sleeping (µs)")
    args = p.parse_args(argv)
    platform = open_platform(args.platform)
    ep: VchanEndpoint
    if args.role == "server":
        ep = VchanServer(platform, args.peer, args.path, read_min=args.read_min,
                         write_min=args.write_min)
        emit(event="ready", port=ep.port, ring_ref=ep.ctrl.refs[0])
        ep.wait_connected(args.timeout)
    else:
        ep = VchanClient(platform, args.peer, args.path)
        emit(event="ready", port=ep.port)
    if args.spin_us is not None:
        ep.spin_us = args.spin_us
    status = 0
    try:
        if args.echo:
            emit(event="done", echoed=echo(ep, args.timeout))
        elif args.pingpong:
            emit(event="done", **pingpong(ep, args.pingpong, args.size, args.timeout))
        else:
            result = duplex(ep, args.send, args.recv, args.chunk, args.timeout, not args.no_crc,
                            args.read_size, args.block)
            emit(event="done", **result)
        if args.hold:
            emit(event=_hold(ep))
    except (PeerError, BrokenPipeError, TimeoutError, EOFError, ValueError) as exc:
        emit(event="error", error=f"{type(exc).__name__}: {exc}")
        status = 2
    finally:
        ep.close()
        platform.close()
    return status


if __name__ == "__main__":
    sys.exit(main())

"""The embedded xenstored behaves the same on both event loops it can run on
(``--loop asyncio`` and ``--loop uvloop``): Xen's test-xenstore, pipelined and
dribbled requests, and watch events, against a daemon on each loop."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from xenpv import peers
from xenpv.xenstore import wire
from xenpv.xenstore.blocking import BlockingClient
from xenpv.xenstore.client import connect
from xenpv.xenstore.wire import XsType

TIMEOUT = 120


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_daemon_on_each_loop(xs_server_with: Callable[..., Any], loop: str) -> None:
    server = xs_server_with("--loop", loop)
    env = server.env()
    result = subprocess.run(
        [str(peers.find("test-xenstore"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    async def pipelined() -> None:
        c = await connect(server.socket, timeout=30)
        try:
            w = await c.watch("/p").register()
            assert (await w.get(timeout=10)).path == "/p"
            await asyncio.gather(*(c.write(f"/p/{i}", str(i)) for i in range(200)))
            values = await asyncio.gather(*(c.read(f"/p/{i}") for i in range(200)))
            assert values == [str(i).encode() for i in range(200)]
            seen = set()
            while len(seen) < 200:
                seen.add((await w.get(timeout=10)).path)
            assert seen == {f"/p/{i}" for i in range(200)}
        finally:
            await c.close()

    asyncio.run(pipelined())

    # requests dribbled a few bytes at a time, several per send, then a hang-up
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(server.socket)
        data = b"".join(
            wire.encode(XsType.READ, i + 1, 0, f"/p/{i}".encode() + b"\0") for i in range(50)
        )
        for k in range(0, len(data), 7):
            s.sendall(data[k : k + 7])
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        decoder = wire.Decoder()
        decoder.feed(got)
        replies = list(decoder)
        assert [(m.req_id, m.payload) for m in replies] == [
            (i + 1, str(i).encode()) for i in range(50)
        ]

    with BlockingClient(server.socket, timeout=30) as c:
        assert c.read("/p/7") == b"7"

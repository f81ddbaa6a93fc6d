"""``xenpv vchan-proxy -m client`` started before the server waits for it, like Xen's tool.

The client watches NODEPATH and tries to connect on every event; the first event fires
before the server has published anything, and reading the missing ``ring-ref`` must count
as "not ready yet", not end the client.
"""

from __future__ import annotations

import subprocess
import sys
import time

from xenpv.testing.vchan import VchanLab, vchan_path

SERVER, CLIENT = 4, 0
WAIT = 20.0


def test_client_started_before_the_server_waits_and_connects() -> None:
    path = vchan_path(SERVER, CLIENT, "late")
    with VchanLab((SERVER,)) as lab:
        client = lab.spawn(CLIENT, [sys.executable, "-m", "xenpv", "vchan-proxy", "-m", "client",
                                    str(SERVER), path, "-"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        time.sleep(1.0)  # the client is up and watching before the server exists
        assert client.poll() is None, client.stderr.read() if client.stderr else b""
        server = lab.spawn(SERVER, [sys.executable, "-m", "xenpv", "vchan-proxy", "-m", "server",
                                    str(CLIENT), path, "-"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert server.stdin is not None and client.stdin is not None
        server.stdin.write(b"late but here\n")
        server.stdin.close()
        # The client's own input stays open: end of file there ends a client as it ends
        # Xen's, and could overtake the server's line.  The server closing the vchan after
        # its line is what ends the client, with the line flushed first.
        try:
            client.wait(WAIT)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait()
            raise
        assert client.stdout is not None and client.stderr is not None
        out, err = client.stdout.read(), client.stderr.read()
        client.stdin.close()
        assert client.returncode == 0, err.decode()
        assert out == b"late but here\n"
        server.wait(WAIT)

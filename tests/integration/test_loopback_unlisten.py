"""A destroyed domain's xenstore socket stops accepting at once, not when the daemon exits.

The daemon removes ``dom<N>/`` on DOMAIN_DESTROY, which alone would hide a listener that
stayed open; so the test first gives the socket a second name (a hard link reaches the
same listening socket) and connects through that name after the destroy.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from xenpv.platforms.loopback.daemon import xenstore_path
from xenpv.platforms.loopback.harness import DaemonMachine

DOMID = 7


def connect(path: Path) -> socket.socket:
    """Connect to a Unix stream socket (OSError if nobody listens there)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5.0)
    try:
        s.connect(str(path))
    except BaseException:
        s.close()
        raise
    return s


def test_destroyed_domains_xenstore_listener_is_closed(
    daemon_machine: Callable[..., DaemonMachine],
) -> None:
    machine = daemon_machine()
    machine.create_domain(DOMID, "doomed")
    path = xenstore_path(machine.rundir, DOMID)
    with tempfile.TemporaryDirectory(dir=machine.rundir) as tmp:
        alias = Path(tmp) / "xs-alias"
        os.link(path, alias)  # same filesystem: a second name for the same socket
        connect(alias).close()  # it listens while the domain lives
        machine.destroy_domain(DOMID)
        assert not path.exists()
        with pytest.raises(ConnectionRefusedError):
            connect(alias).close()
    # the other domains' sockets are untouched
    connect(xenstore_path(machine.rundir, 0)).close()

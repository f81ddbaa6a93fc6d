"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xenpv import peers


@pytest.fixture(scope="session")
def peer_root() -> Path:
    """Root of the unpacked real Xen programs; a missing tree is an error, never a skip."""
    root = peers.peers_root()
    peers.find("usr/bin/xenstore-read", root)  # raises PeerMissing with instructions
    return root


@pytest.fixture(scope="session")
def peer_env(peer_root: Path) -> dict[str, str]:
    """Environment under which the real Xen programs find their libraries."""
    return peers.run_env()


def pytest_report_header(config: pytest.Config) -> str:
    return f"xenpv peers: {peers.peers_root()} (CI={os.environ.get('CI', '')})"

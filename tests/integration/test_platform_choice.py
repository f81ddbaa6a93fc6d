"""open_platform(): the one place that picks the platform of a process's domain."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from xenpv.errors import LocalError, PlatformError
from xenpv.platforms.choose import open_platform
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.platforms.loopback.env import ENV_SOCKET, domain_env
from xenpv.platforms.loopback.harness import DaemonMachine


def test_misuse_is_a_local_error() -> None:
    with pytest.raises(LocalError, match="unknown platform"):
        open_platform("hyperv")
    with pytest.raises(LocalError, match="needs domid"):
        open_platform(rundir="/nowhere")


def test_a_rundir_means_the_emulators_client_as_that_domain(
    daemon_machine: Callable[..., DaemonMachine],
) -> None:
    machine = daemon_machine(1)
    platform = open_platform(rundir=machine.rundir, domid=1)
    try:
        assert isinstance(platform, ClientPlatform) and platform.domid == 1
    finally:
        platform.close()


def test_the_emulators_environment_means_its_client(
    daemon_machine: Callable[..., DaemonMachine], monkeypatch: pytest.MonkeyPatch
) -> None:
    machine = daemon_machine(2)
    for key, value in domain_env(machine.rundir, 2).items():
        monkeypatch.setenv(key, value)
    platform = open_platform()
    try:
        assert isinstance(platform, ClientPlatform) and platform.domid == 2
    finally:
        platform.close()


def test_without_the_emulators_environment_it_is_real_xen(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # No emulator variable: real Xen through Xen's libraries.  This host has no Xen, so
    # opening fails as the platform reports a missing library or device, not as a
    # loopback error about $XENPV_LOOPBACK_SOCKET.
    monkeypatch.delenv(ENV_SOCKET, raising=False)
    monkeypatch.setenv("XENPV_XEN_LIB_DIR", str(tmp_path))
    with pytest.raises(PlatformError) as info:
        open_platform(domid=1)
    assert ENV_SOCKET not in str(info.value)
    assert "libxengnttab" in str(info.value)

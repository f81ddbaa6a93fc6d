"""What the ``block`` and ``net`` commands share about a device's two ends.

:func:`backend_parser` and :func:`guest_arguments` add the options every backend and
every command run as the guest take; :func:`domain_session` opens a domain's platform and xenstore client for the length of a
command (a backend serving every device of its domain, a frontend attaching to one of
its guest's devices); :func:`device_ends` reads what the frontend and the backend of a
guest's device wrote, and :func:`print_info` prints such a reading as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from xenpv.cli import args as cliargs
from xenpv.cli.console import _xenstore
from xenpv.errors import LocalError

__all__ = ["backend_parser", "device_ends", "domain_session", "guest_arguments", "print_info",
           "read_keys"]


def backend_parser(sub: Any, device: str, help: str) -> argparse.ArgumentParser:
    """A device command's ``backend`` subcommand (``help``) with what every backend takes:
    ``--rundir``, ``--as`` (the backend domain, dom0 by default) and the required
    ``--all`` (serve every ``device`` of that domain)."""
    be: argparse.ArgumentParser = sub.add_parser("backend", help=help)
    be.add_argument("--rundir", help="loopback emulator run directory (default: the environment)")
    be.add_argument("--as", dest="as_domid", type=cliargs.domid, default=0, help="backend domain")
    be.add_argument("--all", action="store_true", required=True,
                    help=f"serve every {device} of this backend domain, as they come and go")
    return be


def guest_arguments(parser: argparse.ArgumentParser) -> None:
    """``--rundir`` and ``--domid`` of a command run as the guest (as
    :func:`domain_session` takes them)."""
    parser.add_argument("--rundir",
                        help="loopback emulator run directory (default: the environment)")
    parser.add_argument("--domid", type=cliargs.domid,
                        help="this (the guest's) domain (needed with --rundir)")


@contextlib.asynccontextmanager
async def domain_session(rundir: str | None,
                         domid: int | None) -> AsyncIterator[tuple[Any, int, Any]]:
    """The platform, the domain id and a xenstore client of domain ``domid`` (of the
    emulator at ``rundir``, or the machine's) for the block; both closed after it.
    ``domid`` None is this process's own domain, which ``rundir`` cannot tell."""
    from xenpv.platforms.choose import open_platform

    if rundir is not None and domid is None:
        raise LocalError("--rundir needs --domid (the guest's domain)")
    platform = open_platform(rundir=rundir, domid=domid)
    try:
        domid = platform.domid if domid is None else domid
        client = await _xenstore(rundir, domid)
    except BaseException:
        platform.close()
        raise
    try:
        yield platform, domid, client
    finally:
        await client.close()
        platform.close()


async def read_keys(client: Any, path: str, names: tuple[str, ...]) -> dict[str, str]:
    """The keys of ``names`` that exist under ``path``, as text."""
    from xenpv.xenstore.wire import XenstoreError

    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = (await client.read(f"{path}/{name}")).decode("utf-8", "replace")
        except XenstoreError:
            continue
    return out


async def device_ends(client: Any, domid: int, devtype: str, devid: int, name: str,
                      front_keys: tuple[str, ...],
                      back_keys: tuple[str, ...]) -> tuple[str, str, dict[str, str],
                                                          dict[str, str]]:
    """Guest ``domid``'s device ``devtype``/``devid`` (``name`` in messages): its frontend
    path, its backend path (empty if the frontend names none) and the ``front_keys`` and
    ``back_keys`` each end wrote.  A :class:`LocalError` if there is no such device."""
    from xenpv.xenbus.paths import frontend_path

    fe = frontend_path(domid, devtype, devid)
    if not await client.exists(fe):
        raise LocalError(f"no {devtype} {name} in domain {domid} ({fe})")
    front = await read_keys(client, fe, front_keys)
    be = front.get("backend", "")
    back = await read_keys(client, be, back_keys) if be else {}
    return fe, be, front, back


async def print_info(socket: str | None,
                     info: Callable[[Any], Awaitable[dict[str, Any]]]) -> int:
    """Print, as JSON, what ``info`` reads through a xenstore client on ``socket`` (the
    default one for None); the exit status."""
    from xenpv.xenstore.client import XenstoreClient

    client = await XenstoreClient.connect(socket, timeout=10.0)
    try:
        print(json.dumps(await info(client), indent=2))
    finally:
        await client.close()
    return 0

"""The xenstore home a toolstack gives a new domain, shared by both emulator modes.

``/local/domain/N`` (owner dom0, readable by N) with ``domid`` and ``name`` (inherited:
read-only for N), ``device`` and ``control`` (owner dom0, readable by N), and ``data`` and
``error`` (owned by N: the guest may write there).  The table is in ``docs/loopback.md``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["write_domain_home"]


async def write_domain_home(xs: Any, domid: int, name: str) -> None:
    """Write domain ``domid``'s home in one transaction (retried on ``EAGAIN``), through
    ``xs``, an asyncio xenstore client acting as dom0."""
    home = f"/local/domain/{domid}"
    ro = ["n0", f"r{domid}"] if domid else ["n0"]
    rw = [f"n{domid}"]

    async def build(t: Any) -> None:
        await t.write(home, "")
        await t.set_perms(home, ro)
        await t.write(f"{home}/domid", str(domid))
        await t.write(f"{home}/name", name)
        for sub in ("device", "control"):
            await t.write(f"{home}/{sub}", "")
            await t.set_perms(f"{home}/{sub}", ro)
        for sub in ("data", "error"):
            await t.write(f"{home}/{sub}", "")
            await t.set_perms(f"{home}/{sub}", rw)

    await xs.transact(build)

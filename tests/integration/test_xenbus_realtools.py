"""Our xenbus drivers with Xen's own xenstore-utils (Debian bookworm) as the toolstack.

A shell toolstack creates and removes a device the way §5.2/§5.4 describe, with the real
``xenstore-write``/``xenstore-chmod``/``xenstore-rm`` talking to our embedded xenstored as
dom0; the toy drivers must connect, and must close and go away on the removal.  The
real ``xenstore-ls -p`` also checks what our toolstack helper creates.  A missing peer
program is an error (``PeerMissing``), never a skip.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_xenbus_support import BE, DEVTYPE, FE, S, World, both, run, toy_pair, xenstore_world

from xenpv import peers
from xenpv.xenbus import add_device


async def tool(w: World, name: str, *args: str) -> str:
    """Run Xen's ``xenstore-<name>`` against dom0's socket; return stdout (must succeed)."""
    env = peers.run_env()
    env["XENSTORED_PATH"] = w.sockets[0]
    proc = await asyncio.create_subprocess_exec(
        str(peers.find(f"usr/bin/xenstore-{name}")), *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, (name, args, err)
    return out.decode()


def test_real_xenstore_utils_as_the_toolstack() -> None:
    async def main() -> None:
        async with xenstore_world() as w:
            fp = f"/local/domain/{FE}/device/{DEVTYPE}/0"
            bp = f"/local/domain/{BE}/backend/{DEVTYPE}/{FE}/0"
            # §5.2 by hand: directories, permissions, then the keys (which inherit them)
            await tool(w, "write", fp, "", bp, "")
            await tool(w, "chmod", fp, f"n{FE}", f"r{BE}")
            await tool(w, "chmod", bp, f"n{BE}", f"r{FE}")
            await tool(w, "write", f"{fp}/backend", bp, f"{fp}/backend-id", str(BE),
                       f"{fp}/state", "1", f"{bp}/frontend", fp, f"{bp}/frontend-id",
                       str(FE), f"{bp}/online", "1", f"{bp}/state", "1")  # fmt: skip
            fe, be = toy_pair(w, fp, bp)
            await be.start()
            await fe.start()
            await both(fe.wait_state(S.Connected), be.wait_state(S.Connected))
            assert (await tool(w, "read", f"{fp}/state", f"{bp}/state")).split() == ["4", "4"]
            ref = (await tool(w, "read", f"{fp}/ring-ref")).strip()
            assert int(ref) == fe.pages.refs[0]
            # §5.4 removal as libxl does it, with the real tools
            await tool(w, "write", f"{bp}/online", "0", f"{bp}/state", "5")
            await be.wait_done()
            assert (await tool(w, "read", f"{bp}/state")).strip() == "6"
            assert fe.state is S.Closed
            await tool(w, "rm", fp, bp)
            await fe.wait_done()
            fe.retry_quarantine()
            assert w.machine.outstanding()["mappings"] == 0
            assert w.machine.outstanding()["grants"] == 0

    run(main())


def test_real_xenstore_ls_sees_what_the_toolstack_helper_created() -> None:
    async def main() -> None:
        async with xenstore_world() as w:
            await add_device(w.dom0, "vif", FE, BE, 0, frontend_keys={"mac": "00:16:3e:00:00:01"})
            listing = await tool(w, "ls", "-p", f"/local/domain/{BE}/backend/vif/{FE}/0")
            lines = {ln.split("=")[0].strip(): ln for ln in listing.splitlines()}
            assert set(lines) == {"frontend", "frontend-id", "online", "state"}
            for line in lines.values():
                assert line.rstrip().endswith(f"(n{BE},r{FE})"), line
            listing = await tool(w, "ls", "-p", f"/local/domain/{FE}/device/vif/0")
            assert '"00:16:3e:00:00:01"' in listing and f"(n{FE},r{BE})" in listing

    run(main())

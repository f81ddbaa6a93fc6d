"""The API reference builds with its documented command and covers the main packages.

``python scripts/api_docs.py OUT`` (docs/api/README.md) runs here into a temporary
directory, in a fresh interpreter, without network access needed: every public module
must import, and the pages of the packages a user meets first must be there with their
docstrings rendered.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: page -> a phrase of a docstring it must show
PAGES = {
    "index.html": "",
    "xenpv.html": "Xen paravirtual split drivers in Python",
    "xenpv/platforms/base.html": "GrantTable",
    "xenpv/platforms/loopback/emulator.html": "InProcessEmulator",
    "xenpv/platforms/xen.html": "XenPlatform",
    "xenpv/vchan.html": "VchanServer",
    "xenpv/xenstore/client.html": "XenstoreClient",
    "xenpv/xenstore/blocking.html": "BlockingClient",
    "xenpv/xenbus/driver.html": "BackendDriver",
    "xenpv/frontends/console.html": "PrimaryConsole",
    "xenpv/backends/console.html": "ConsoleBackend",
    "xenpv/rings.html": "FrontRing",
    "xenpv/protocols/blkif.html": "blkif",
}


def test_api_reference_builds_with_pages_for_the_main_packages(tmp_path: Path) -> None:
    out = tmp_path / "api"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "api_docs.py"), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"in {out}/index.html" in proc.stdout
    for page, phrase in PAGES.items():
        path = out / page
        assert path.is_file(), f"no page {page}"
        assert phrase in path.read_text(), f"{page} does not show {phrase!r}"
    assert not (out / "xenpv" / "cli.html").exists(), "the command line is not API"

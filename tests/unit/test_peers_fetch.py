"""``xenpv peers fetch`` with stand-in ``apt-get``/``dpkg-deb`` on PATH: the backports
come through a private source list and state into their own subtree, and the stamp makes
a second fetch do nothing until the package lists change."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenpv import peers

APT = """#!/bin/sh
echo "$*" >> "$LOG"
for a in "$@"; do
  case "$a" in Dir::Etc::sourcelist=*) cp "${a#Dir::Etc::sourcelist=}" "$LOG.sources";; esac
done
case " $* " in
  *" indextargets "*) echo "bookworm-updates http://archive.invalid/debian/"
                      echo "bookworm http://archive.invalid/debian/";;
  *" download "*) seen=; for a in "$@"; do
      [ -n "$seen" ] && case "$a" in -*|*=*) ;; *) touch "$a.deb";; esac
      [ "$a" = download ] && seen=1; done;;
esac
exit 0
"""
DPKG = """#!/bin/sh
mkdir -p "$3" && touch "$3/$(basename "$2").unpacked"
"""


def test_fetch_unpacks_backports_apart_and_is_idempotent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("apt-get", APT), ("dpkg-deb", DPKG)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "apt.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("LOG", str(log))
    root = tmp_path / "peers"

    peers.fetch(root, packages=("xenstore-utils",), backports=("qemu-system-xen",), quiet=True)
    assert (root / "xenstore-utils.deb.unpacked").exists()
    assert (root / peers.BACKPORTS_DIR / "qemu-system-xen.deb.unpacked").exists()
    assert not (root / "qemu-system-xen.deb.unpacked").exists()  # 7.2's files stay apart
    sources = Path(f"{log}.sources").read_text()
    assert " http://archive.invalid/debian/ bookworm-backports main" in sources
    calls = log.read_text().splitlines()
    private = [c for c in calls if "Dir::Etc::sourceparts=-" in c]
    assert len(private) == 2 and private[0].endswith("update -q")
    assert private[1].endswith("download -q qemu-system-xen")
    assert all("Dir::State=" in c and "Dir::Cache=" in c for c in private)
    assert not any("sourceparts" in c for c in calls if "xenstore-utils" in c)

    log.write_text("")
    peers.fetch(root, packages=("xenstore-utils",), backports=("qemu-system-xen",), quiet=True)
    assert log.read_text() == ""  # the stamp matches: nothing asked of apt

    peers.fetch(root, packages=("xenstore-utils",), backports=(), quiet=True)
    assert log.read_text().count("download") == 1  # another list: fetched again

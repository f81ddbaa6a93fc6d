"""Real Xen programs used as peers, fetched from Debian's archive without a Xen host.

xenpv is tested against programs nobody on this project wrote: xenstore-utils, Xen's
``test-xenstore``, ``vchan-socket-proxy``, ``xenconsoled``/``xenconsole``, libxenvchan and
friends.  Installing ``xen-utils`` system-wide drags in hypervisor tooling, so the packages
are downloaded with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into a private
tree (``peers_root()``), which is used through ``LD_LIBRARY_PATH``.  A few newer packages
come from bookworm-backports (:data:`BACKPORTS`) through a private apt source list and
state, so the system's apt configuration is left alone; they unpack into a subtree of
their own (:data:`BACKPORTS_DIR`), since QEMU 10's files have 7.2's paths.

``xenpv peers fetch`` does this; tests locate programs with :func:`find` and fail loudly if
one is missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from xenpv.errors import LocalError

#: Debian packages unpacked into the peers tree (bookworm, Xen 4.17).
PACKAGES: tuple[str, ...] = (
    "fio",  # fio: the machine's floor in bench block; the libraries below for its links
    # net tests and bench net: ping (bin/ping) and iperf3 with its libraries
    "iperf3",
    "iputils-ping",
    "libiperf0",  # iperf3
    "libsctp1",  # libiperf0
    "libaio1",  # qemu-utils
    "libboost-thread1.74.0",  # librados2 (fio)
    "libdaxctl1",  # libpmem1 (fio)
    "libfdt1",
    "libfmt9",  # librados2 (fio)
    "libfuse3-3",  # qemu-utils
    "libgfapi0",  # fio
    "libgfrpc0",  # libgfapi0 (fio)
    "libgfxdr0",  # libgfapi0 (fio)
    "libglusterfs0",  # libgfapi0 (fio)
    "libgstreamer-plugins-base1.0-0",
    "libibverbs1",  # fio
    "libnbd-bin",  # nbdinfo, nbdcopy: NBD clients of the block export tests
    "libnbd0",
    "libndctl6",  # libpmem1 (fio)
    "libnl-3-200",  # libibverbs1 (fio)
    "libnl-route-3-200",  # libibverbs1 (fio)
    "libnuma1",  # qemu-utils
    "libopus0",
    "liborc-0.4-0",
    "libpmem1",  # fio
    "libpmemblk1",  # fio
    "librados2",  # fio; its libceph-common is in usr/lib/x86_64-linux-gnu/ceph
    "librbd1",  # fio
    "librdmacm1",  # fio
    "libspice-server1",
    "liburing2",  # qemu-utils
    "libusb-1.0-0",
    "libxen-dev",
    "libxencall1",
    "libxendevicemodel1",
    "libxenevtchn1",
    "libxenforeignmemory1",
    "libxengnttab1",
    "libxenhypfs1",
    "libxenmisc4.17",
    "libxenstore4",
    "libxentoolcore1",
    "libxentoollog1",
    "libxml2",  # libnbd0
    "qemu-system-xen",  # usr/libexec/xen-qemu-system-i386 (PV backends); libraries above
    "qemu-utils",  # qemu-img, qemu-io: NBD clients of the block export tests
    "xen-utils-4.17",
    "xenstore-utils",
)
#: xl (in xen-utils-4.17) as the toolstack: the libraries it links besides Xen's.
PACKAGES += (
    "libyajl2",  # libxenlight's JSON
)

#: Packages from bookworm-backports, unpacked under :data:`BACKPORTS_DIR`.  QEMU 10.0 is
#: built against Xen 4.17's libraries and every library it links is in bookworm (``ldd``
#: through :func:`run_env` finds them all), so nothing else comes from there.
BACKPORTS: tuple[str, ...] = (
    "qemu-system-xen",  # QEMU 10: xen-net-device with a netdev peer (7.2's qnic has none)
)
#: The subtree of the peers tree holding :data:`BACKPORTS`.
BACKPORTS_DIR = "bookworm-backports"
#: The suite :data:`BACKPORTS` come from, on the archive the system's bookworm comes from.
BACKPORTS_SUITE = "bookworm-backports"

XEN_BIN = "usr/lib/xen-4.17/bin"
LIB_DIR = "usr/lib/x86_64-linux-gnu"
#: Debian's QEMU build for Xen (the device model libxl starts; PV backends).
QEMU = "usr/libexec/xen-qemu-system-i386"
#: QEMU 10 from bookworm-backports (same program, in :data:`BACKPORTS_DIR`).
QEMU10 = f"{BACKPORTS_DIR}/{QEMU}"
#: The archive keyring apt checks the backports suite with, when it is there.
ARCHIVE_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


class PeerMissing(LocalError):
    """A real peer program or file is not in the peers tree."""


def peers_root() -> Path:
    """Directory holding the unpacked packages (``$XENPV_PEERS_DIR`` or the user cache)."""
    env = os.environ.get("XENPV_PEERS_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(cache) / "xenpv" / "peers"


def _stamp(packages: tuple[str, ...], backports: tuple[str, ...] = ()) -> str:
    names = [*packages, *(f"{BACKPORTS_SUITE}/{b}" for b in backports)]
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]


def fetch(root: Path | None = None, packages: tuple[str, ...] = PACKAGES, quiet: bool = False,
          backports: tuple[str, ...] = BACKPORTS) -> Path:
    """Download and unpack ``packages`` into ``root`` and ``backports`` into its
    :data:`BACKPORTS_DIR` (idempotent: a stamp names what was unpacked); return ``root``."""
    root = root or peers_root()
    stamp = root / ".stamp"
    if stamp.exists() and stamp.read_text().strip() == _stamp(packages, backports):
        return root
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise PeerMissing(f"{tool} is needed to fetch the Xen peer programs (Debian/Ubuntu only)")
    root.mkdir(parents=True, exist_ok=True)
    out = subprocess.DEVNULL if quiet else None
    with tempfile.TemporaryDirectory(prefix="xenpv-debs-") as tmp:
        cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *packages]
        if subprocess.run(cmd, cwd=tmp, stdout=out).returncode != 0:
            # A fresh machine has no package lists yet.
            subprocess.run(["apt-get", "update", "-q"], check=True, stdout=out)
            subprocess.run(cmd, cwd=tmp, check=True, stdout=out)
        _unpack(Path(tmp), root)
    if backports:
        with tempfile.TemporaryDirectory(prefix="xenpv-backports-") as tmp:
            _download_backports(Path(tmp), backports, out)
            _unpack(Path(tmp) / "debs", root / BACKPORTS_DIR)
    stamp.write_text(_stamp(packages, backports) + "\n")
    return root


def _unpack(debs: Path, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)


def _archive_uri(out: int | None) -> str:
    """The URI of the archive the system's apt takes bookworm from (its package lists
    name it; they are fetched once if there are none yet)."""
    query = ["apt-get", "indextargets", "--format", "$(RELEASE) $(REPO_URI)"]
    for attempt in range(2):
        listed = subprocess.run(query, capture_output=True, text=True, check=True).stdout
        for line in listed.splitlines():
            release, _, uri = line.partition(" ")
            if release == "bookworm" and uri:
                return uri
        if attempt == 0:
            subprocess.run(["apt-get", "update", "-q"], check=True, stdout=out)
    raise PeerMissing("no apt source for Debian bookworm is configured: "
                      f"{BACKPORTS_SUITE} is taken from the same archive")


def _download_backports(tmp: Path, names: tuple[str, ...], out: int | None) -> None:
    """``apt-get download`` ``names`` from :data:`BACKPORTS_SUITE` into ``tmp/debs``,
    with a source list, package lists and cache of its own under ``tmp``."""
    for d in ("debs", "etc", "state/lists/partial", "cache/archives/partial"):
        (tmp / d).mkdir(parents=True)
    signed = f" [signed-by={ARCHIVE_KEYRING}]" if os.path.exists(ARCHIVE_KEYRING) else ""
    (tmp / "etc/sources.list").write_text(
        f"deb{signed} {_archive_uri(out)} {BACKPORTS_SUITE} main\n")
    private = ["-o", f"Dir::Etc::sourcelist={tmp / 'etc/sources.list'}",
               "-o", "Dir::Etc::sourceparts=-", "-o", f"Dir::State={tmp / 'state'}",
               "-o", f"Dir::Cache={tmp / 'cache'}", "-o", "APT::Sandbox::User=root"]
    subprocess.run(["apt-get", *private, "update", "-q"], check=True, stdout=out)
    subprocess.run(["apt-get", *private, "download", "-q", *names], cwd=tmp / "debs",
                   check=True, stdout=out)


def find(relpath: str, root: Path | None = None) -> Path:
    """Return the path of ``relpath`` inside the peers tree, or raise :class:`PeerMissing`.

    ``relpath`` is either a path relative to the tree root (``usr/bin/xenstore-read``) or a
    bare program name, looked up in ``usr/bin`` and Xen's private ``bin`` directory.
    """
    root = root or peers_root()
    candidates = [root / relpath] if "/" in relpath else [root / "usr/bin" / relpath, root / XEN_BIN / relpath]
    for c in candidates:
        if c.exists():
            return c
    raise PeerMissing(
        f"real peer {relpath!r} not found under {root}; run 'xenpv peers fetch' "
        "(the test command does this)"
    )


def qemu_device_model(domid: int, qmp: str | Path | None = None, *, qemu: str = QEMU) -> list[str]:
    """The command of QEMU as dom0's device model for ``domid`` (``-xen-attach``: the
    domain exists already), with no display and no default devices, and a QMP server on
    the Unix socket ``qmp`` if given.  Run it through the replacement libraries (as dom0
    of an emulator).  ``qemu``: which build (:data:`QEMU` is 7.2, :data:`QEMU10` 10.0).
    Raises :class:`PeerMissing` at once if that QEMU was not fetched."""
    command = [str(find(qemu)), "-machine", "xenpv", "-xen-domid", str(domid),
               "-xen-attach", "-display", "none", "-nodefaults"]
    if qmp is not None:
        command += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    return command


def qemu_net_backend(domid: int, tap: str, mac: str, idx: int = 0, *,
                     netns: str | None = None) -> list[str]:
    """The command of QEMU 10 (:data:`QEMU10`) as dom0's device model for ``domid``
    serving one vif: ``xen-net-device`` number ``idx`` with ``mac``, whose netdev is the
    TAP device ``tap`` (opened, or created if absent, when QEMU starts; no scripts).  QEMU
    writes ``backend/qnic/<domid>/<idx>`` and the guest's ``device/vif/<idx>`` itself.
    With ``netns`` the command runs in that network namespace (``ip netns exec``), so
    the TAP is there.  Raises :class:`PeerMissing` at once if QEMU 10 was not fetched."""
    command = [*qemu_device_model(domid, qemu=QEMU10),
               "-netdev", f"tap,id=n{idx},ifname={tap},script=no,downscript=no",
               "-device", f"xen-net-device,netdev=n{idx},mac={mac},idx={idx}"]
    return ["ip", "netns", "exec", netns, *command] if netns else command


def lib_dir(root: Path | None = None) -> Path:
    """Directory of the unpacked Xen libraries (for ``LD_LIBRARY_PATH`` and cffi)."""
    return find(LIB_DIR, root)


def include_dir(root: Path | None = None) -> Path:
    """Directory of Xen's public headers (``xen/io/ring.h`` …) from libxen-dev."""
    return find("usr/include", root)


def run_env(extra_lib_dirs: list[str] | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for running a peer program: ``LD_LIBRARY_PATH`` with the peers' libraries.

    ``extra_lib_dirs`` (for example the loopback emulator's replacement libraries) come
    first, so they take precedence over Debian's.
    """
    env = dict(os.environ if base is None else base)
    dirs = [*(extra_lib_dirs or []), str(lib_dir())]
    if env.get("LD_LIBRARY_PATH"):
        dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(dirs)
    return env


#: Where fio's libraries unpack besides :data:`LIB_DIR` (libnl under ``/lib``, librados'
#: private libceph-common).
FIO_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu/ceph")


def fio_env(root: Path | None = None) -> dict[str, str]:
    """Environment for running the peers tree's ``fio`` (its libraries on the path)."""
    root = root or peers_root()
    return run_env([str(root / d) for d in (*FIO_LIB_DIRS, LIB_DIR) if (root / d).is_dir()])

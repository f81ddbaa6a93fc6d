"""Exclusive ownership of a path (a socket, a run directory) by one live process.

Theory of operation
-------------------
A :class:`PidLock` is a lock file holding its owner's pid, locked with ``flock``.  The
kernel drops the lock when its owner exits, however it exits, so a lock file left behind
by a killed process is stale and simply taken over; a live owner makes :meth:`acquire`
raise :class:`InUseError` naming that owner's pid.  Daemons take the lock before they
remove or bind anything, so a second instance refuses instead of replacing a live
instance's sockets.

On release the owner unlinks the file and then closes it.  A process that opened the
old file just before the unlink could lock it once it is closed; :meth:`acquire`
therefore checks, once it holds a lock, that the path still names the file it locked,
and starts again otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from xenpv.errors import LocalError

__all__ = ["InUseError", "PidLock"]

_ATTEMPTS = 16


class InUseError(LocalError):
    """The path is owned by another live process (``pid``, or None if it is not known)."""

    def __init__(self, what: str, pid: int | None) -> None:
        owner = f"running process {pid}" if pid is not None else "another running process"
        super().__init__(f"{what} is in use by {owner}")
        self.pid = pid


class PidLock:
    """The lock file ``path``; ``what`` names the guarded thing in error messages."""

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = os.fspath(path)
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock and record this process's pid in it.

        Raises :class:`InUseError` if a live process holds it, ``OSError`` if the lock
        file cannot be created.
        """
        if self._fd is not None:
            return
        for _ in range(_ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"cannot create {self.path} (the lock of {self.what})"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise InUseError(self.what, pid) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its owner removed it while we opened it: start again
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._fd = fd
            return
        raise InUseError(self.what, None)

    def release(self) -> None:
        """Remove the lock file and drop the lock (no-op if not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None

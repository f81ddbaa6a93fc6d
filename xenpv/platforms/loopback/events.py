"""``/dev/xen/evtchn`` masking semantics over per-port inbox eventfds (client side).

Theory of operation
-------------------
Every port has an inbox eventfd; whoever signals the port writes 1 to it, so
notifications coalesce in the eventfd counter.  A handle keeps one ``epoll`` instance
(its pollable :meth:`EpollEvents.fileno`, the equivalent of ``xenevtchn_fd``) in which
each inbox is registered level-triggered for ``EPOLLIN``:

* :meth:`pending` takes one ready inbox and drains it (the counter drops to 0, so epoll
  stops reporting it); the port is now *masked* (``/dev/xen/evtchn``: a delivered port
  stays masked until re-enabled);
* a notification that arrives while the port is masked makes the inbox readable again;
  the next :meth:`pending` sees the port is masked, takes the inbox out of the epoll set
  (``EPOLL_CTL_MOD`` to no events) without draining it, and looks further;
* :meth:`unmask` only forgets the mask in the common case (no system call); if the inbox
  was taken out meanwhile it is put back, and since its counter is non-zero the port is
  reported again at once.

So the hot path is one ``epoll_wait`` plus one ``read`` per delivery and one ``write``
per notification.  The epoll fd may look readable while only masked ports were notified
(a spurious wake-up, harmless: :meth:`pending` then returns ``None``);
:meth:`wait` integrates with asyncio through ``loop.add_reader`` on the epoll fd.

Subclasses provide how ports are created and how a notification reaches the remote
inbox (in-process: through the hypervisor object; across processes: a cached outbox fd,
validated with the daemon's generation page).
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import time
from abc import ABC, abstractmethod

from xenpv.errors import LocalError
from xenpv.platforms.base import PortError

_ARM = select.EPOLLIN


async def wait_readable(fd: int, timeout: float | None = None) -> None:
    """Wait until ``fd`` is readable (``loop.add_reader``); :class:`TimeoutError` after
    ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def _ready() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, _ready)
    try:
        await asyncio.wait_for(ready, timeout)
    finally:
        loop.remove_reader(fd)


class EpollEvents(ABC):
    """Shared masking/pending/wait logic of the loopback event-channel handles."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._inbox: dict[int, int] = {}  # port -> inbox eventfd
        self._masked: set[int] = set()
        self._disarmed: set[int] = set()  # masked ports taken out of the epoll set
        self._port_of_fd: dict[int, int] = {}  # select.epoll reports fds, not cookies

    # -- subclass hooks
    @property
    @abstractmethod
    def domid(self) -> int:
        """The domain this handle acts as."""

    @abstractmethod
    def alloc_unbound(self, remote_domid: int) -> int:
        """A new local port that only ``remote_domid`` may bind."""

    @abstractmethod
    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """Connect to a port offered to us; the new local port is pending."""

    @abstractmethod
    def notify(self, port: int) -> None:
        """Signal the remote end of ``port``."""

    @abstractmethod
    def _release_port(self, port: int) -> None:
        """Close ``port`` at the platform (its inbox already left the epoll set and was
        closed)."""

    @abstractmethod
    def _release_all(self) -> None:
        """Close the platform side of the handle."""

    # -- shared logic
    def _register(self, port: int, inbox: int) -> None:
        """Take ownership of ``inbox`` (a descriptor of this process) for ``port``."""
        self._inbox[port] = inbox
        self._port_of_fd[inbox] = port
        self._epoll.register(inbox, _ARM)

    def _check_port(self, port: int) -> int:
        inbox = self._inbox.get(port)
        if inbox is None:
            raise PortError(f"port {port} is not bound by this handle", errno.EINVAL)
        return inbox

    def fileno(self) -> int:
        """The pollable fd: readable while some port is pending and unmasked."""
        if self._epoll.closed:
            raise LocalError("event-channel handle is closed")
        return self._epoll.fileno()

    def ports(self) -> list[int]:
        """The ports bound through this handle."""
        return sorted(self._inbox)

    def pending(self, timeout: float | None = 0.0) -> int | None:
        """A pending port (now masked), or ``None`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = -1.0 if timeout is None else timeout
        masked = self._masked
        while True:
            try:
                events = self._epoll.poll(wait, 1)
            except ValueError:  # closed epoll object
                raise LocalError("event-channel handle is closed") from None
            if not events:
                return None
            fd = events[0][0]
            port = self._port_of_fd[fd]
            if port not in masked:
                try:
                    os.read(fd, 8)  # drain: notifications coalesce
                except BlockingIOError:
                    pass
                masked.add(port)
                return port
            # notified while masked: disarm it now (lazily) and keep it pending
            self._epoll.modify(fd, 0)
            self._disarmed.add(port)
            if deadline is not None:
                wait = max(0.0, deadline - time.monotonic())

    def unmask(self, port: int) -> None:
        """Re-enable delivery of ``port``; fires at once if notified meanwhile."""
        inbox = self._inbox.get(port)
        if inbox is None:
            raise PortError(f"port {port} is not bound by this handle", errno.EINVAL)
        self._masked.discard(port)
        if port in self._disarmed:
            self._disarmed.discard(port)
            self._epoll.modify(inbox, _ARM)

    async def wait(self, timeout: float | None = None) -> int:
        """Await a pending port (masked on return)."""
        port = self.pending(0)
        if port is not None:
            return port
        fd = self.fileno()
        while True:
            await wait_readable(fd, timeout)
            port = self.pending(0)
            if port is not None:
                return port

    def reset(self) -> None:
        """Drain every inbox and unmask every port (IOCTL_EVTCHN_RESET)."""
        for port, inbox in self._inbox.items():
            try:
                os.eventfd_read(inbox)
            except BlockingIOError:
                pass
            self._masked.discard(port)
            if port in self._disarmed:
                self._disarmed.discard(port)
                self._epoll.modify(inbox, _ARM)

    def unbind(self, port: int) -> None:
        """Close ``port``; the remote end goes back to unbound."""
        inbox = self._check_port(port)
        self._epoll.unregister(inbox)
        del self._inbox[port]
        del self._port_of_fd[inbox]
        self._masked.discard(port)
        self._disarmed.discard(port)
        os.close(inbox)
        self._release_port(port)

    def close(self) -> None:
        """Close every port and the handle (idempotent)."""
        if self._epoll.closed:
            return
        for port in list(self._inbox):
            self.unbind(port)
        self._epoll.close()
        self._release_all()

    def __enter__(self) -> EpollEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

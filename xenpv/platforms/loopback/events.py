"""``/dev/xen/evtchn`` masking semantics over per-port inbox eventfds (client side).

Theory of operation
-------------------
Every port has an inbox eventfd; whoever signals the port writes 1 to it, so
notifications coalesce in the eventfd counter.  A handle keeps one ``epoll`` instance
(its pollable :meth:`EpollEvents.fileno`, the equivalent of ``xenevtchn_fd``) in which
each inbox is registered edge-triggered (``EPOLLIN | EPOLLET``): every write to the inbox
queues the port once in the epoll instance, and ``epoll_wait`` hands it out once, whatever
the counter holds.  So the counter is never drained on the hot path:

* :meth:`pending` takes one queued port; if it is not masked, it is now *masked*
  (``/dev/xen/evtchn``: a delivered port stays masked until re-enabled) and returned;
* a notification that arrives while the port is masked queues it again; the next
  :meth:`pending` sees the port is masked and only remembers it as *deferred* (no system
  call), and looks further;
* :meth:`unmask` only forgets the mask in the common case (no system call); if the port
  was deferred meanwhile, it writes 1 to the port's own inbox, which queues it again, so
  the port is reported at once (through :meth:`fileno` as well);
* :meth:`reset` drains every counter: the kernel re-checks readiness when it hands out a
  queued port, so notifications queued before the reset are not reported.

So the hot path is one ``epoll_wait`` per delivery and one ``write`` per notification:
as many system calls as a raw eventfd ping-pong that blocks in ``read``.  The epoll fd
may look readable while only masked ports were notified (a spurious wake-up, harmless:
:meth:`pending` then returns ``None``); :meth:`wait` integrates with asyncio through
``loop.add_reader`` on the epoll fd.  A counter a hostile peer saturated takes no more
writes, so that port (and only that port) stops being notified.

Subclasses provide how ports are created and how a notification reaches the remote
inbox (in-process: through the hypervisor object; across processes: a cached outbox fd,
validated with the daemon's generation page).
"""

from __future__ import annotations

import errno
import os
import select
import time
from abc import ABC, abstractmethod

from xenpv.errors import LocalError
from xenpv.platforms.base import PortError
from xenpv.platforms.dispatch import DispatchedEvents
from xenpv.platforms.fdwait import wait_readable

_ARM = select.EPOLLIN | select.EPOLLET


def _requeue(inbox: int) -> None:
    """Queue the port of ``inbox`` in the epoll instance again (a write is an edge); a
    saturated counter takes no write, so drain it first then."""
    try:
        os.eventfd_write(inbox, 1)
        return
    except BlockingIOError:
        pass
    try:
        os.eventfd_read(inbox)
        os.eventfd_write(inbox, 1)
    except BlockingIOError:  # saturated again at once: that peer silences its own port
        pass


class EpollEvents(DispatchedEvents, ABC):
    """Shared masking/pending/wait logic of the loopback event-channel handles."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._inbox: dict[int, int] = {}  # port -> inbox eventfd
        self._masked: set[int] = set()
        self._deferred: set[int] = set()  # masked ports notified meanwhile
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
            port = self._port_of_fd[events[0][0]]
            if port not in masked:
                masked.add(port)
                return port
            # notified while masked: keep it pending until unmask
            self._deferred.add(port)
            if deadline is not None:
                wait = max(0.0, deadline - time.monotonic())

    def unmask(self, port: int) -> None:
        """Re-enable delivery of ``port``; fires at once if notified meanwhile."""
        inbox = self._inbox.get(port)
        if inbox is None:
            raise PortError(f"port {port} is not bound by this handle", errno.EINVAL)
        self._masked.discard(port)
        if port in self._deferred:
            self._deferred.discard(port)
            _requeue(inbox)

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
        for inbox in self._inbox.values():
            try:
                os.eventfd_read(inbox)
            except BlockingIOError:
                pass
        self._masked.clear()
        self._deferred.clear()

    def unbind(self, port: int) -> None:
        """Close ``port``; the remote end goes back to unbound."""
        inbox = self._check_port(port)
        self._epoll.unregister(inbox)
        del self._inbox[port]
        del self._port_of_fd[inbox]
        self._masked.discard(port)
        self._deferred.discard(port)
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

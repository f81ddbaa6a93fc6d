"""The xenbus state machine as data: transition tables and a sans-IO machine that runs them.

Theory of operation
-------------------
Each end of a xenbus device owns one ``state`` node and watches the other end's
(xen-protocols.md §5).  What an end must do next depends only on its own state and on
the state the peer shows *now*: watch events coalesce and arrive late, so an end never
reacts to "the peer went from A to B", it reacts to "I am in X and the peer is in Y".
The tables below are therefore keyed by ``(own state, input)`` where the input is

* a peer state (:class:`~xenpv.xenbus.states.XenbusState`), *level-triggered*: the machine
  re-evaluates the row for the current peer state after every transition ("settling"), so
  a skipped or coalesced step is done when the later state is seen, and a row whose next
  state equals the own state never carries actions (feeding the same peer state twice is
  a no-op); or
* a local event (:class:`Local`): start, close, forced close, reconnect, errors, the
  toolstack's ``online = 0``, the own directory vanishing.

A key maps to one or more :class:`Row` objects, each with an optional :class:`Guard` on
the machine's flags (``online``, ``ready``, "reconnect requested"); the first row whose
guard holds is taken.  A row lists :mod:`actions <xenpv.xenbus.machine>` for the driver to
execute in order (:class:`WriteState`, :class:`PublishFeatures`, :class:`Publish`,
:class:`Connect`, :class:`Disconnect`, :class:`WriteError`, :class:`Destroy`) and the next
own state.  :attr:`XenbusState.Unknown` as own state means "destroyed": the machine is
then inert.

A peer state with no row for the current own state is a peer error (design.md rule 4):
the machine marks the peer misbehaving and takes the ``PEER_ERROR`` row (record the error
node, go to Closing).  Closing and Closed have a row for every peer state, so errors are
never repeated and settling always ends (the unit tests check both properties for every
table).  A local event with no row is misuse of the API (:class:`~xenpv.errors.LocalError`).

The machine does no I/O.  If executing an action fails, the driver stops executing that
list and feeds :meth:`XenbusMachine.local_error` or :meth:`XenbusMachine.peer_error`; rows
out of Connected start with :class:`Disconnect`, so a half-done connect is undone.

Reference: xen-protocols.md §5.3 (negotiation and its tolerated shortcuts) and §5.4
(closing, removal, reconnection).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from xenpv.errors import LocalError, PeerError
from xenpv.xenbus.states import (
    InvalidStateError,
    InvalidTransitionError,
    XenbusPeerError,
    XenbusState,
    parse_state,
)

__all__ = [
    "BACKEND_TABLE",
    "FRONTEND_DIRECT_TABLE",
    "FRONTEND_EARLY_TABLE",
    "FRONTEND_TABLE",
    "Action",
    "BackendMachine",
    "Connect",
    "Destroy",
    "Disconnect",
    "FrontendMachine",
    "FrontendStyle",
    "Guard",
    "Input",
    "Local",
    "Publish",
    "PublishFeatures",
    "Role",
    "Row",
    "Table",
    "WriteError",
    "WriteState",
    "XenbusMachine",
]

S = XenbusState


class Role(enum.Enum):
    """Which end of the device a machine drives."""

    FRONTEND = "frontend"
    BACKEND = "backend"


class Local(enum.Enum):
    """Inputs that come from this side rather than from the peer's ``state`` node."""

    START = "start"
    CLOSE = "close"
    FORCE_CLOSE = "force-close"
    RECONNECT = "reconnect"
    LOCAL_ERROR = "local-error"
    PEER_ERROR = "peer-error"
    OFFLINE = "offline"
    REMOVED = "removed"


Input = XenbusState | Local


class Guard(enum.Enum):
    """A condition on the machine's flags that selects between rows of one key."""

    #: ``online`` reads 1 and no local close was requested: the device is to stay.
    ONLINE = "online"
    #: ``online`` reads 0 (the toolstack removes the device) or a local close was requested.
    OFFLINE = "offline"
    READY = "ready"
    NOT_READY = "not ready"
    RECONNECT = "reconnect requested"


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class WriteState:
    """Write the own ``state`` node (only if it still exists; only if it changes)."""

    state: XenbusState

    def __str__(self) -> str:
        return f"write {self.state.name}"


@dataclass(frozen=True, slots=True)
class PublishFeatures:
    """Backend: publish what the frontend needs before it builds rings (§5.3 step 1)."""

    def __str__(self) -> str:
        return "publish features"


@dataclass(frozen=True, slots=True)
class Publish:
    """Frontend: read the backend's features, set up rings and ports, write the keys."""

    def __str__(self) -> str:
        return "publish rings"


@dataclass(frozen=True, slots=True)
class Connect:
    """Read the peer's connect-time keys and start the device (§5.3 steps 3-4)."""

    def __str__(self) -> str:
        return "connect"


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Stop I/O and release what :class:`Publish`/:class:`Connect` set up (idempotent)."""

    def __str__(self) -> str:
        return "disconnect"


@dataclass(frozen=True, slots=True)
class WriteError:
    """Record ``"<errno> <message>"`` in the device's ``error`` node (§5.2)."""

    errno: int = 0
    message: str = ""

    def __str__(self) -> str:
        return "write error"


@dataclass(frozen=True, slots=True)
class Destroy:
    """The device is gone for this side: stop watching; the driver instance ends."""

    def __str__(self) -> str:
        return "destroy"


Action = WriteState | PublishFeatures | Publish | Connect | Disconnect | WriteError | Destroy

PUBLISH_FEATURES = PublishFeatures()
PUBLISH = Publish()
CONNECT = Connect()
DISCONNECT = Disconnect()
WRITE_ERROR = WriteError()  # template: errno and message are filled in when taken
DESTROY = Destroy()


@dataclass(frozen=True, slots=True)
class Row:
    """One transition: ``actions`` in order, then own state ``next`` (None: unchanged)."""

    actions: tuple[Action, ...]
    next: XenbusState | None = None
    guard: Guard | None = None


Table = Mapping[tuple[XenbusState, Input], tuple[Row, ...]]


class _Builder:
    """Collects rows; ``add`` expands "any of these own states x any of these inputs"."""

    def __init__(self, base: Table | None = None) -> None:
        self.rows: dict[tuple[XenbusState, Input], tuple[Row, ...]] = dict(base or {})

    def add(
        self,
        owns: Iterable[XenbusState],
        inputs: Iterable[Input],
        actions: Sequence[Action] = (),
        next: XenbusState | None = None,
        guard: Guard | None = None,
        *,
        replace: bool = False,
    ) -> None:
        inputs = tuple(inputs)
        for own in owns:
            for inp in inputs:
                row = Row(tuple(actions), None if next == own else next, guard)
                old = () if replace else self.rows.get((own, inp), ())
                self.rows[(own, inp)] = (*old, row)

    def table(self) -> Table:
        return dict(self.rows)


def _w(state: XenbusState) -> WriteState:
    return WriteState(state)


# ----------------------------------------------------------------------------- backend

_b = _Builder()
_B_ALL = (S.Initialising, S.InitWait, S.Connected, S.Closing, S.Closed)
_B_EARLY = (S.Initialising, S.InitWait)  # nothing connected yet
_RECONF = (S.Reconfiguring, S.Reconfigured)
# Local events.  A (re)started backend always probes again: stale own state is ignored.
_b.add(_B_ALL, [Local.START], [PUBLISH_FEATURES, _w(S.InitWait)], S.InitWait, Guard.ONLINE)
_b.add(_B_ALL, [Local.START], [_w(S.Closing)], S.Closing, Guard.OFFLINE)
_b.add(_B_EARLY, [Local.CLOSE, Local.OFFLINE], [_w(S.Closing)], S.Closing)
_b.add([S.Connected], [Local.CLOSE, Local.OFFLINE], [DISCONNECT, _w(S.Closing)], S.Closing)
_b.add([S.Closing, S.Closed], [Local.CLOSE, Local.OFFLINE])
_b.add([*_B_EARLY, S.Closing], [Local.FORCE_CLOSE], [_w(S.Closed)], S.Closed)
_b.add([S.Connected], [Local.FORCE_CLOSE], [DISCONNECT, _w(S.Closed)], S.Closed)
_b.add([S.Closed], [Local.FORCE_CLOSE])
_b.add(_B_EARLY, [Local.LOCAL_ERROR, Local.PEER_ERROR], [WRITE_ERROR, _w(S.Closing)], S.Closing)
_b.add(
    [S.Connected],
    [Local.LOCAL_ERROR, Local.PEER_ERROR],
    [DISCONNECT, WRITE_ERROR, _w(S.Closing)],
    S.Closing,
)
_b.add([S.Closing, S.Closed], [Local.LOCAL_ERROR], [WRITE_ERROR])
_b.add([S.Closing, S.Closed], [Local.PEER_ERROR])  # already failing: counted, not rewritten
_b.add([*_B_EARLY, S.Closing, S.Closed], [Local.REMOVED], [DESTROY], S.Unknown)
_b.add([S.Connected], [Local.REMOVED], [DISCONNECT, DESTROY], S.Unknown)
# Peer (frontend) states.  §5.4 step 5: frontend gone -> destroy.
_b.add([S.InitWait, S.Closing, S.Closed], [S.Unknown], [DESTROY], S.Unknown)
_b.add([S.Connected], [S.Unknown], [DISCONNECT, DESTROY], S.Unknown)
# InitWait: wait for the frontend; "frontend 3 or 4 triggers connect" (§5.3).
_b.add([S.InitWait], [S.Initialising])
_b.add(
    [S.InitWait], [S.Initialised, S.Connected], [CONNECT, _w(S.Connected)], S.Connected, Guard.READY
)
_b.add([S.InitWait], [S.Initialised, S.Connected], [], None, Guard.NOT_READY)
_b.add([S.InitWait], [S.Closing], [_w(S.Closing)], S.Closing)
_b.add([S.InitWait], [S.Closed], [_w(S.Closed)], S.Closed)
# Connected.
_b.add([S.Connected], [S.Initialised, S.Connected])
_b.add([S.Connected], [S.Initialising], [DISCONNECT, _w(S.Closed)], S.Closed)  # frontend restarted
_b.add([S.Connected], [S.Closing], [DISCONNECT, _w(S.Closing)], S.Closing)
_b.add([S.Connected], [S.Closed], [DISCONNECT, _w(S.Closed)], S.Closed)
# Closing: wait for the frontend to close; anything else is ignored.  A frontend still
# (or again) at Initialising is not taken as a reconnect here: after an error it may
# simply never have started, and answering it would retry the failed step at once.
# The close timeout moves the backend to Closed, where Initialising means reconnect.
_b.add(
    [S.Closing],
    [S.Initialising, S.InitWait, S.Initialised, S.Connected, S.Closing, *_RECONF],
)
_b.add([S.Closing], [S.Closed], [_w(S.Closed)], S.Closed)
# Closed: a frontend back at Initialising (or already Initialised: coalesced 1->3) means
# reconnect (§5.4); with online = 0 the device is being removed instead.
_b.add(
    [S.Closed],
    [S.Initialising, S.Initialised],
    [PUBLISH_FEATURES, _w(S.InitWait)],
    S.InitWait,
    Guard.ONLINE,
)
_b.add([S.Closed], [S.Initialising, S.Initialised], [], None, Guard.OFFLINE)
_b.add([S.Closed], [S.InitWait, S.Connected, S.Closing, S.Reconfiguring, S.Reconfigured])
_b.add([S.Closed], [S.Closed], [], None, Guard.ONLINE)
_b.add([S.Closed], [S.Closed], [DESTROY], S.Unknown, Guard.OFFLINE)

#: Backend transitions (own state, input) -> rows.
BACKEND_TABLE: Table = _b.table()

# ---------------------------------------------------------------------------- frontend

_f = _Builder()
_F_OPEN = (S.Initialising, S.Initialised, S.Connected)
_F_HELD = (S.Initialised, S.Connected, S.Closing)  # rings/grants may be published
_f.add([S.Initialising], [Local.START])
_f.add([S.Initialised, S.Connected], [Local.START], [_w(S.Closing)], S.Closing)  # stale
_f.add([S.Closing, S.Closed], [Local.START])
_f.add(_F_OPEN, [Local.CLOSE], [_w(S.Closing)], S.Closing)
_f.add([S.Closing, S.Closed], [Local.CLOSE])
_f.add([S.Initialising], [Local.FORCE_CLOSE], [_w(S.Closed)], S.Closed)
_f.add(_F_HELD, [Local.FORCE_CLOSE], [DISCONNECT, _w(S.Closed)], S.Closed)
_f.add([S.Closed], [Local.FORCE_CLOSE])
_f.add(_F_OPEN, [Local.LOCAL_ERROR, Local.PEER_ERROR], [WRITE_ERROR, _w(S.Closing)], S.Closing)
_f.add([S.Closing, S.Closed], [Local.LOCAL_ERROR], [WRITE_ERROR])
_f.add([S.Closing, S.Closed], [Local.PEER_ERROR])
_f.add([S.Initialising, S.Closed], [Local.REMOVED], [DESTROY], S.Unknown)
_f.add(_F_HELD, [Local.REMOVED], [DISCONNECT, DESTROY], S.Unknown)
_f.add([S.Initialising, S.Closing, S.Closed], [Local.RECONNECT])
_f.add([S.Initialised, S.Connected], [Local.RECONNECT], [_w(S.Closing)], S.Closing)
# Peer (backend) states.  Backend gone, closing or closed -> Closed (grants ended).
_f.add([S.Initialising], [S.Unknown, S.Closing], [_w(S.Closed)], S.Closed)
_f.add(_F_HELD, [S.Unknown, S.Closing, S.Closed], [DISCONNECT, _w(S.Closed)], S.Closed)
# Initialising: publish on InitWait; a backend that skipped InitWait (seen Connected) gets
# the skipped step done first (§5.3).  Backend Closed: it will answer our 1 with InitWait.
_f.add([S.Initialising], [S.Initialising, S.Closed])
_f.add([S.Initialising], [S.InitWait, S.Connected], [PUBLISH, _w(S.Initialised)], S.Initialised)
_f.add([S.Initialised], [S.Initialising, S.InitWait])
_f.add([S.Initialised], [S.Connected], [CONNECT, _w(S.Connected)], S.Connected)
_f.add([S.Connected], [S.Initialising, S.InitWait, S.Connected])
_f.add(
    [S.Closing],
    [S.Initialising, S.InitWait, S.Initialised, S.Connected, S.Reconfiguring, S.Reconfigured],
)
_f.add([S.Closed], [S.Unknown, S.Initialised, S.Connected, S.Closing])
_f.add([S.Closed], [S.Reconfiguring, S.Reconfigured])
# Closed + reconnect requested: re-initialise once the backend is not (still) connected.
_f.add(
    [S.Closed], [S.Initialising, S.InitWait, S.Closed], [_w(S.Initialising)], S.Initialising,
    Guard.RECONNECT,
)  # fmt: skip
_f.add([S.Closed], [S.Initialising, S.InitWait, S.Closed])

#: Frontend transitions, standard style (block: publish on backend InitWait, §5.3).
FRONTEND_TABLE: Table = _f.table()

_d = _Builder(FRONTEND_TABLE)
_d.add(
    [S.Initialising], [S.InitWait, S.Connected], [PUBLISH, CONNECT, _w(S.Connected)],
    S.Connected, replace=True,
)  # fmt: skip
#: Frontend transitions, direct style (net: on backend InitWait write everything and
#: go straight from Initialising to Connected, §5.3 "Net").
FRONTEND_DIRECT_TABLE: Table = _d.table()

_e = _Builder(FRONTEND_TABLE)
_e.add(
    [S.Initialising], [S.Initialising], [PUBLISH, _w(S.Initialised)], S.Initialised, replace=True
)
#: Frontend transitions, early style (a frontend that negotiates nothing publishes
#: without waiting for InitWait, which also copes with backends that skip InitWait).
FRONTEND_EARLY_TABLE: Table = _e.table()


class FrontendStyle(enum.Enum):
    """Which frontend table to run (§5.3 and its variants)."""

    STANDARD = "standard"
    DIRECT = "direct"
    EARLY = "early"


_FRONTEND_TABLES = {
    FrontendStyle.STANDARD: FRONTEND_TABLE,
    FrontendStyle.DIRECT: FRONTEND_DIRECT_TABLE,
    FrontendStyle.EARLY: FRONTEND_EARLY_TABLE,
}

#: Settling steps after one input; the tables need at most three (checked by the tests).
MAX_SETTLE = 8


# ----------------------------------------------------------------------------- machine


@dataclass(slots=True)
class _Flags:
    online: bool = True
    ready: bool = True
    reconnect: bool = False
    closing: bool = False


@dataclass
class XenbusMachine:
    """Runs one transition table for one end of a device (see the module docstring).

    Every input method returns the list of actions to execute, in order.  The machine
    never raises for anything the peer did; it raises :class:`~xenpv.errors.LocalError`
    only for a local event that its table does not allow (API misuse).
    """

    table: Table
    role: Role
    state: XenbusState = XenbusState.Initialising
    #: Last peer state seen (None: unparseable or not seen yet).
    peer: XenbusState | None = None
    started: bool = False
    #: Set by a peer error; cleared when the device re-initialises (reconnect).
    misbehaving: bool = False
    #: Peer errors seen over the machine's life.
    peer_errors: int = 0
    last_error: str | None = None
    flags: _Flags = field(default_factory=_Flags)

    # -- inputs ----------------------------------------------------------------------
    def start(self) -> list[Action]:
        """Begin driving the device (the own state is the one given at construction)."""
        if self.started:
            raise LocalError("xenbus machine already started")
        self.started = True
        if self.role is Role.FRONTEND and self.state is not S.Initialising:
            # Left behind by an earlier instance: close the old connection, then start over.
            self.flags.reconnect = True
        return self._feed(Local.START)

    def peer_state_changed(self, state: XenbusState) -> list[Action]:
        """The peer's ``state`` node now reads ``state`` (Unknown: missing/removed)."""
        self.peer = XenbusState(state)
        if not self.started:
            return []
        return self._feed(self.peer)

    def peer_state_raw(self, raw: bytes | str | None) -> list[Action]:
        """Like :meth:`peer_state_changed` with the raw node value (None: node missing).

        A malformed value is a peer error (the peer is marked misbehaving).
        """
        try:
            state = parse_state(raw)
        except InvalidStateError as exc:
            self.peer = None
            return self.peer_error(exc)
        return self.peer_state_changed(state)

    def peer_error(self, exc: PeerError) -> list[Action]:
        """Something the peer wrote broke the protocol: mark it, record the error, close."""
        self._mark(exc)
        errno = exc.errno if isinstance(exc, XenbusPeerError) else XenbusPeerError.errno
        return self._feed(Local.PEER_ERROR, (errno, str(exc)))

    def local_error(self, errno: int, message: str) -> list[Action]:
        """This side failed (errno, message): record the error and close."""
        return self._feed(Local.LOCAL_ERROR, (errno, message))

    def close(self) -> list[Action]:
        """Begin an orderly close (the Closing/Closed handshake of §5.4); final."""
        self.flags.reconnect = False
        self.flags.closing = True
        return self._feed(Local.CLOSE)

    def force_close(self) -> list[Action]:
        """The peer did not answer the close handshake in time: go Closed without it."""
        self.flags.reconnect = False
        return self._feed(Local.FORCE_CLOSE)

    def reconnect(self) -> list[Action]:
        """Frontend: close if needed, then re-initialise once the backend is Closed."""
        if self.role is not Role.FRONTEND:
            raise LocalError("only a frontend re-initialises a device")
        self.flags.reconnect = True
        return self._feed(Local.RECONNECT)

    def online_changed(self, online: bool) -> list[Action]:
        """Backend: the toolstack's ``online`` node changed (0: the device is being removed)."""
        if online == self.flags.online:
            return []
        self.flags.online = online
        if not self.started:
            return []
        return self._feed(Local.OFFLINE) if not online else self._settle([])

    def local_ready(self, ready: bool = True) -> list[Action]:
        """Backend: the local device is (or is no longer) ready to connect (e.g. hotplug)."""
        self.flags.ready = ready
        return self._settle([]) if self.started else []

    def removed(self) -> list[Action]:
        """The own ``state`` node (the device directory) was removed by the toolstack."""
        return self._feed(Local.REMOVED)

    def step(self, inp: Input, error: tuple[int, str] | None = None) -> list[Action]:
        """Apply exactly one row for ``inp`` without settling (for tests and tools).

        A peer-state input also updates :attr:`peer`.
        """
        if isinstance(inp, XenbusState):
            self.peer = inp
        out: list[Action] = []
        self._apply(inp, error, out)
        return out

    # -- queries ---------------------------------------------------------------------
    @property
    def destroyed(self) -> bool:
        """True once a :class:`Destroy` action was returned."""
        return self.state is S.Unknown

    @property
    def online(self) -> bool:
        """The backend's view of its ``online`` node."""
        return self.flags.online

    @property
    def reconnect_requested(self) -> bool:
        """True while a frontend waits to re-initialise."""
        return self.flags.reconnect

    # -- engine ----------------------------------------------------------------------
    def _mark(self, exc: BaseException) -> None:
        self.misbehaving = True
        self.peer_errors += 1
        self.last_error = str(exc)

    def _guard(self, guard: Guard | None) -> bool:
        f = self.flags
        return {
            None: True,
            Guard.ONLINE: f.online and not f.closing,
            Guard.OFFLINE: not f.online or f.closing,
            Guard.READY: f.ready,
            Guard.NOT_READY: not f.ready,
            Guard.RECONNECT: f.reconnect,
        }[guard]

    def lookup(self, own: XenbusState, inp: Input) -> Row | None:
        """The row taken for ``(own, inp)`` under the current flags (None: no row)."""
        for row in self.table.get((own, inp), ()):
            if self._guard(row.guard):
                return row
        return None

    def _feed(self, inp: Input, error: tuple[int, str] | None = None) -> list[Action]:
        out: list[Action] = []
        self._apply(inp, error, out)
        return self._settle(out)

    def _settle(self, out: list[Action]) -> list[Action]:
        for _ in range(MAX_SETTLE):
            if self.peer is None or self.destroyed or not self.started:
                break
            before, count = self.state, len(out)
            self._apply(self.peer, None, out)
            if self.state is before and len(out) == count:
                break
        return out

    def _apply(self, inp: Input, error: tuple[int, str] | None, out: list[Action]) -> None:
        if self.destroyed:
            return
        row = self.lookup(self.state, inp)
        if row is None:
            if not isinstance(inp, XenbusState):
                raise LocalError(f"{inp.value} is not allowed in state {self.state.name}")
            exc = InvalidTransitionError(
                f"{self._peer_role} state {inp.name} not allowed while {self.state.name}"
            )
            self._mark(exc)
            error = (exc.errno, str(exc))
            row = self.lookup(self.state, Local.PEER_ERROR)
            if row is None:  # every table has PEER_ERROR rows for all own states
                return
        for action in row.actions:
            if isinstance(action, WriteError):
                errno, message = error if error is not None else (0, "")
                action = WriteError(errno, message)
            out.append(action)
        if row.next is not None:
            self.state = row.next
        if self.state is S.Initialising and self.role is Role.FRONTEND and self.flags.reconnect:
            self.flags.reconnect = False
            self.misbehaving = False
        if self.state is S.InitWait and self.role is Role.BACKEND:
            self.misbehaving = False

    @property
    def _peer_role(self) -> str:
        return "backend" if self.role is Role.FRONTEND else "frontend"


class FrontendMachine(XenbusMachine):
    """A :class:`XenbusMachine` running a frontend table."""

    def __init__(
        self,
        style: FrontendStyle = FrontendStyle.STANDARD,
        *,
        initial: XenbusState = XenbusState.Initialising,
    ) -> None:
        """Create a frontend machine whose own node currently reads ``initial``."""
        super().__init__(_FRONTEND_TABLES[style], Role.FRONTEND, initial)
        self.style = style


class BackendMachine(XenbusMachine):
    """A :class:`XenbusMachine` running :data:`BACKEND_TABLE`."""

    def __init__(
        self,
        *,
        initial: XenbusState = XenbusState.Initialising,
        online: bool = True,
        ready: bool = True,
    ) -> None:
        """Create a backend machine; ``ready=False`` holds Connect until :meth:`local_ready`."""
        super().__init__(BACKEND_TABLE, Role.BACKEND, initial, flags=_Flags(online, ready))

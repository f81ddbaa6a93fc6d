"""The xenbus transition tables, row by row, and the machine's engine rules.

``BACKEND_ROWS`` / ``FRONTEND_ROWS`` below are the specification written out by hand from
xen-protocols.md §5.3-5.4 (own state, input, guard, actions, next state); the tests check
that the tables hold exactly these rows and that the machine executes each of them.
"""

from __future__ import annotations

import errno
import itertools

import pytest

from xenpv.errors import LocalError
from xenpv.xenbus.diagram import TABLES, edges, render_dot, render_mermaid
from xenpv.xenbus.machine import (
    BACKEND_TABLE,
    FRONTEND_DIRECT_TABLE,
    FRONTEND_EARLY_TABLE,
    FRONTEND_TABLE,
    MAX_SETTLE,
    BackendMachine,
    Connect,
    Destroy,
    Disconnect,
    FrontendMachine,
    FrontendStyle,
    Guard,
    Input,
    Local,
    Publish,
    PublishFeatures,
    Table,
    WriteError,
    WriteState,
    XenbusMachine,
)
from xenpv.xenbus.states import InvalidStateError, XenbusState

S = XenbusState

BACKEND_ROWS = [
    ("Initialising", "start", "online", "publish features, write InitWait", "InitWait"),
    ("Initialising", "start", "offline", "write Closing", "Closing"),
    ("InitWait", "start", "online", "publish features, write InitWait", "InitWait"),
    ("InitWait", "start", "offline", "write Closing", "Closing"),
    ("Connected", "start", "online", "publish features, write InitWait", "InitWait"),
    ("Connected", "start", "offline", "write Closing", "Closing"),
    ("Closing", "start", "online", "publish features, write InitWait", "InitWait"),
    ("Closing", "start", "offline", "write Closing", "Closing"),
    ("Closed", "start", "online", "publish features, write InitWait", "InitWait"),
    ("Closed", "start", "offline", "write Closing", "Closing"),
    ("Initialising", "close", "", "write Closing", "Closing"),
    ("Initialising", "offline", "", "write Closing", "Closing"),
    ("InitWait", "close", "", "write Closing", "Closing"),
    ("InitWait", "offline", "", "write Closing", "Closing"),
    ("Connected", "close", "", "disconnect, write Closing", "Closing"),
    ("Connected", "offline", "", "disconnect, write Closing", "Closing"),
    ("Closing", "close", "", "", "Closing"),
    ("Closing", "offline", "", "", "Closing"),
    ("Closed", "close", "", "", "Closed"),
    ("Closed", "offline", "", "", "Closed"),
    ("Initialising", "force-close", "", "write Closed", "Closed"),
    ("InitWait", "force-close", "", "write Closed", "Closed"),
    ("Closing", "force-close", "", "write Closed", "Closed"),
    ("Connected", "force-close", "", "disconnect, write Closed", "Closed"),
    ("Closed", "force-close", "", "", "Closed"),
    ("Initialising", "local-error", "", "write error, write Closing", "Closing"),
    ("Initialising", "peer-error", "", "write error, write Closing", "Closing"),
    ("InitWait", "local-error", "", "write error, write Closing", "Closing"),
    ("InitWait", "peer-error", "", "write error, write Closing", "Closing"),
    ("Connected", "local-error", "", "disconnect, write error, write Closing", "Closing"),
    ("Connected", "peer-error", "", "disconnect, write error, write Closing", "Closing"),
    ("Closing", "local-error", "", "write error", "Closing"),
    ("Closed", "local-error", "", "write error", "Closed"),
    ("Closing", "peer-error", "", "", "Closing"),
    ("Closed", "peer-error", "", "", "Closed"),
    ("Initialising", "removed", "", "destroy", "Unknown"),
    ("InitWait", "removed", "", "destroy", "Unknown"),
    ("Closing", "removed", "", "destroy", "Unknown"),
    ("Closed", "removed", "", "destroy", "Unknown"),
    ("Connected", "removed", "", "disconnect, destroy", "Unknown"),
    ("InitWait", "fe=Unknown", "", "destroy", "Unknown"),
    ("Closing", "fe=Unknown", "", "destroy", "Unknown"),
    ("Closed", "fe=Unknown", "", "destroy", "Unknown"),
    ("Connected", "fe=Unknown", "", "disconnect, destroy", "Unknown"),
    ("InitWait", "fe=Initialising", "", "", "InitWait"),
    ("InitWait", "fe=Initialised", "ready", "connect, write Connected", "Connected"),
    ("InitWait", "fe=Initialised", "not ready", "", "InitWait"),
    ("InitWait", "fe=Connected", "ready", "connect, write Connected", "Connected"),
    ("InitWait", "fe=Connected", "not ready", "", "InitWait"),
    ("InitWait", "fe=Closing", "", "write Closing", "Closing"),
    ("InitWait", "fe=Closed", "", "write Closed", "Closed"),
    ("Connected", "fe=Initialised", "", "", "Connected"),
    ("Connected", "fe=Connected", "", "", "Connected"),
    ("Connected", "fe=Initialising", "", "disconnect, write Closed", "Closed"),
    ("Connected", "fe=Closing", "", "disconnect, write Closing", "Closing"),
    ("Connected", "fe=Closed", "", "disconnect, write Closed", "Closed"),
    ("Closing", "fe=Initialising", "", "", "Closing"),
    ("Closing", "fe=InitWait", "", "", "Closing"),
    ("Closing", "fe=Initialised", "", "", "Closing"),
    ("Closing", "fe=Connected", "", "", "Closing"),
    ("Closing", "fe=Closing", "", "", "Closing"),
    ("Closing", "fe=Reconfiguring", "", "", "Closing"),
    ("Closing", "fe=Reconfigured", "", "", "Closing"),
    ("Closing", "fe=Closed", "", "write Closed", "Closed"),
    ("Closed", "fe=Initialising", "online", "publish features, write InitWait", "InitWait"),
    ("Closed", "fe=Initialising", "offline", "", "Closed"),
    ("Closed", "fe=Initialised", "online", "publish features, write InitWait", "InitWait"),
    ("Closed", "fe=Initialised", "offline", "", "Closed"),
    ("Closed", "fe=InitWait", "", "", "Closed"),
    ("Closed", "fe=Connected", "", "", "Closed"),
    ("Closed", "fe=Closing", "", "", "Closed"),
    ("Closed", "fe=Reconfiguring", "", "", "Closed"),
    ("Closed", "fe=Reconfigured", "", "", "Closed"),
    ("Closed", "fe=Closed", "online", "", "Closed"),
    ("Closed", "fe=Closed", "offline", "destroy", "Unknown"),
]  # fmt: skip

FRONTEND_ROWS = [
    ("Initialising", "start", "", "", "Initialising"),
    ("Initialised", "start", "", "write Closing", "Closing"),
    ("Connected", "start", "", "write Closing", "Closing"),
    ("Closing", "start", "", "", "Closing"),
    ("Closed", "start", "", "", "Closed"),
    ("Initialising", "close", "", "write Closing", "Closing"),
    ("Initialised", "close", "", "write Closing", "Closing"),
    ("Connected", "close", "", "write Closing", "Closing"),
    ("Closing", "close", "", "", "Closing"),
    ("Closed", "close", "", "", "Closed"),
    ("Initialising", "force-close", "", "write Closed", "Closed"),
    ("Initialised", "force-close", "", "disconnect, write Closed", "Closed"),
    ("Connected", "force-close", "", "disconnect, write Closed", "Closed"),
    ("Closing", "force-close", "", "disconnect, write Closed", "Closed"),
    ("Closed", "force-close", "", "", "Closed"),
    ("Initialising", "local-error", "", "write error, write Closing", "Closing"),
    ("Initialising", "peer-error", "", "write error, write Closing", "Closing"),
    ("Initialised", "local-error", "", "write error, write Closing", "Closing"),
    ("Initialised", "peer-error", "", "write error, write Closing", "Closing"),
    ("Connected", "local-error", "", "write error, write Closing", "Closing"),
    ("Connected", "peer-error", "", "write error, write Closing", "Closing"),
    ("Closing", "local-error", "", "write error", "Closing"),
    ("Closed", "local-error", "", "write error", "Closed"),
    ("Closing", "peer-error", "", "", "Closing"),
    ("Closed", "peer-error", "", "", "Closed"),
    ("Initialising", "removed", "", "destroy", "Unknown"),
    ("Closed", "removed", "", "destroy", "Unknown"),
    ("Initialised", "removed", "", "disconnect, destroy", "Unknown"),
    ("Connected", "removed", "", "disconnect, destroy", "Unknown"),
    ("Closing", "removed", "", "disconnect, destroy", "Unknown"),
    ("Initialising", "reconnect", "", "", "Initialising"),
    ("Closing", "reconnect", "", "", "Closing"),
    ("Closed", "reconnect", "", "", "Closed"),
    ("Initialised", "reconnect", "", "write Closing", "Closing"),
    ("Connected", "reconnect", "", "write Closing", "Closing"),
    ("Initialising", "be=Unknown", "", "write Closed", "Closed"),
    ("Initialising", "be=Closing", "", "write Closed", "Closed"),
    ("Initialised", "be=Unknown", "", "disconnect, write Closed", "Closed"),
    ("Initialised", "be=Closing", "", "disconnect, write Closed", "Closed"),
    ("Initialised", "be=Closed", "", "disconnect, write Closed", "Closed"),
    ("Connected", "be=Unknown", "", "disconnect, write Closed", "Closed"),
    ("Connected", "be=Closing", "", "disconnect, write Closed", "Closed"),
    ("Connected", "be=Closed", "", "disconnect, write Closed", "Closed"),
    ("Closing", "be=Unknown", "", "disconnect, write Closed", "Closed"),
    ("Closing", "be=Closing", "", "disconnect, write Closed", "Closed"),
    ("Closing", "be=Closed", "", "disconnect, write Closed", "Closed"),
    ("Initialising", "be=Initialising", "", "", "Initialising"),
    ("Initialising", "be=Closed", "", "", "Initialising"),
    ("Initialising", "be=InitWait", "", "publish rings, write Initialised", "Initialised"),
    ("Initialising", "be=Connected", "", "publish rings, write Initialised", "Initialised"),
    ("Initialised", "be=Initialising", "", "", "Initialised"),
    ("Initialised", "be=InitWait", "", "", "Initialised"),
    ("Initialised", "be=Connected", "", "connect, write Connected", "Connected"),
    ("Connected", "be=Initialising", "", "", "Connected"),
    ("Connected", "be=InitWait", "", "", "Connected"),
    ("Connected", "be=Connected", "", "", "Connected"),
    ("Closing", "be=Initialising", "", "", "Closing"),
    ("Closing", "be=InitWait", "", "", "Closing"),
    ("Closing", "be=Initialised", "", "", "Closing"),
    ("Closing", "be=Connected", "", "", "Closing"),
    ("Closing", "be=Reconfiguring", "", "", "Closing"),
    ("Closing", "be=Reconfigured", "", "", "Closing"),
    ("Closed", "be=Unknown", "", "", "Closed"),
    ("Closed", "be=Initialised", "", "", "Closed"),
    ("Closed", "be=Connected", "", "", "Closed"),
    ("Closed", "be=Closing", "", "", "Closed"),
    ("Closed", "be=Reconfiguring", "", "", "Closed"),
    ("Closed", "be=Reconfigured", "", "", "Closed"),
    ("Closed", "be=Initialising", "reconnect requested", "write Initialising", "Initialising"),
    ("Closed", "be=Initialising", "", "", "Closed"),
    ("Closed", "be=InitWait", "reconnect requested", "write Initialising", "Initialising"),
    ("Closed", "be=InitWait", "", "", "Closed"),
    ("Closed", "be=Closed", "reconnect requested", "write Initialising", "Initialising"),
    ("Closed", "be=Closed", "", "", "Closed"),
]  # fmt: skip
_GUARD_FLAGS = {
    "": {},
    "online": {"online": True},
    "offline": {"online": False},
    "ready": {"ready": True},
    "not ready": {"ready": False},
    "reconnect requested": {"reconnect": True},
}


def _parse_input(text: str) -> Input:
    if "=" in text:
        return S[text.split("=", 1)[1]]
    return Local(text)


def _machine(role: str, own: str, guard: str) -> XenbusMachine:
    m: XenbusMachine
    m = BackendMachine(initial=S[own]) if role == "backend" else FrontendMachine(initial=S[own])
    m.started = True
    for flag, value in _GUARD_FLAGS[guard].items():
        setattr(m.flags, flag, value)
    if role == "frontend" and guard == "":
        m.flags.reconnect = False
    return m


def _spec(table: Table, peer: str) -> set[tuple[str, str, str, str, str]]:
    out = set()
    for (own, inp), rows in table.items():
        for r in rows:
            nxt = r.next if r.next is not None else own
            out.add(
                (
                    own.name,
                    inp.value if isinstance(inp, Local) else f"{peer}={inp.name}",
                    r.guard.value if r.guard else "",
                    ", ".join(str(a) for a in r.actions),
                    nxt.name,
                )
            )
    return out


def test_the_tables_hold_exactly_the_specified_rows() -> None:
    assert _spec(BACKEND_TABLE, "fe") == set(BACKEND_ROWS)
    assert _spec(FRONTEND_TABLE, "be") == set(FRONTEND_ROWS)
    assert len(BACKEND_ROWS) == len(set(BACKEND_ROWS))
    assert len(FRONTEND_ROWS) == len(set(FRONTEND_ROWS))


@pytest.mark.parametrize(
    ("role", "row"),
    [("backend", r) for r in BACKEND_ROWS] + [("frontend", r) for r in FRONTEND_ROWS],
    ids=lambda v: v if isinstance(v, str) else "|".join(v),
)
def test_every_row_executes_as_specified(role: str, row: tuple[str, ...]) -> None:
    own, inp_text, guard, actions, nxt = row
    m = _machine(role, own, guard)
    inp = _parse_input(inp_text)
    out = m.step(inp, (errno.EIO, "boom"))
    assert ", ".join(str(a) for a in out) == actions
    assert m.state is S[nxt]
    for a in out:
        if isinstance(a, WriteError):
            assert (a.errno, a.message) == (errno.EIO, "boom")


ALL_TABLES = {
    "backend": BACKEND_TABLE,
    "frontend": FRONTEND_TABLE,
    "frontend-direct": FRONTEND_DIRECT_TABLE,
    "frontend-early": FRONTEND_EARLY_TABLE,
}


@pytest.mark.parametrize("name", ALL_TABLES)
def test_rows_that_keep_the_state_on_a_peer_state_have_no_actions(name: str) -> None:
    # level-triggered rule: feeding the same peer state twice must be a no-op
    for (own, inp), rows in ALL_TABLES[name].items():
        if isinstance(inp, XenbusState):
            for r in rows:
                if r.next is None:
                    assert r.actions == (), (own, inp, r)


@pytest.mark.parametrize("name", ALL_TABLES)
def test_every_own_state_reachable_has_error_rows_and_settling_ends(name: str) -> None:
    table = ALL_TABLES[name]
    owns = {own for own, _ in table}
    for own in owns:
        assert (own, Local.PEER_ERROR) in table, own
        assert (own, Local.LOCAL_ERROR) in table, own
    # Closing and Closed accept every peer state (errors are never repeated)
    for own in (S.Closing, S.Closed):
        for peer in S:
            assert (own, peer) in table, (own, peer)
    # for any own state, peer state and flags, settling reaches a fixed point quickly
    role = "backend" if name == "backend" else "frontend"
    for own, peer, online, ready, reconnect in itertools.product(
        owns, S, (True, False), (True, False), (True, False)
    ):
        m = _machine(role, own.name, "")
        m.table = table
        m.flags.online, m.flags.ready, m.flags.reconnect = online, ready, reconnect
        m.peer = peer
        m.step(peer)
        steps = 0
        while not m.destroyed:
            before = m.state
            if m.step(peer) == [] and m.state is before:
                break
            steps += 1
            assert steps < MAX_SETTLE // 2, (own, peer)


def test_standard_handshake_from_both_sides() -> None:
    fe, be = FrontendMachine(), BackendMachine()
    assert be.start() == [PublishFeatures(), WriteState(S.InitWait)]
    assert fe.start() == []
    assert fe.peer_state_changed(S.InitWait) == [Publish(), WriteState(S.Initialised)]
    assert be.peer_state_changed(S.Initialised) == [Connect(), WriteState(S.Connected)]
    assert fe.peer_state_changed(S.Connected) == [Connect(), WriteState(S.Connected)]
    assert be.peer_state_changed(S.Connected) == []
    assert (fe.state, be.state) == (S.Connected, S.Connected)


def test_backend_skipping_initwait_gets_the_skipped_step_done() -> None:
    fe = FrontendMachine()
    fe.start()
    out = fe.peer_state_changed(S.Connected)
    assert out == [Publish(), WriteState(S.Initialised), Connect(), WriteState(S.Connected)]


def test_direct_style_jumps_from_initialising_to_connected() -> None:
    fe = FrontendMachine(FrontendStyle.DIRECT)
    fe.start()
    assert fe.peer_state_changed(S.InitWait) == [Publish(), Connect(), WriteState(S.Connected)]
    assert fe.peer_state_changed(S.Connected) == []
    be = BackendMachine()
    be.start()
    assert be.peer_state_changed(S.Connected) == [Connect(), WriteState(S.Connected)]


def test_early_style_publishes_without_waiting_for_initwait() -> None:
    fe = FrontendMachine(FrontendStyle.EARLY)
    fe.start()
    assert fe.peer_state_changed(S.Initialising) == [Publish(), WriteState(S.Initialised)]


def test_coalesced_events_frontend_seen_already_closed_from_connected() -> None:
    be = BackendMachine()
    be.start()
    be.peer_state_changed(S.Initialised)
    # fe went 5 then 6 between two reads: the backend only sees 6
    assert be.peer_state_changed(S.Closed) == [Disconnect(), WriteState(S.Closed)]


def test_backend_reconnect_walks_closed_then_initwait() -> None:
    be = BackendMachine()
    be.start()
    be.peer_state_changed(S.Initialised)
    assert be.peer_state_changed(S.Initialising) == [
        Disconnect(),
        WriteState(S.Closed),
        PublishFeatures(),
        WriteState(S.InitWait),
    ]
    assert be.state is S.InitWait


def test_removal_offline_then_frontend_closed_destroys_the_backend() -> None:
    be = BackendMachine()
    be.start()
    be.peer_state_changed(S.Connected)
    assert be.online_changed(False) == [Disconnect(), WriteState(S.Closing)]
    assert be.peer_state_changed(S.Closed) == [WriteState(S.Closed), Destroy()]
    assert be.destroyed
    assert be.peer_state_changed(S.Initialising) == []  # inert once destroyed


def test_frontend_gone_destroys_the_backend() -> None:
    be = BackendMachine()
    be.start()
    assert be.peer_state_raw(None) == [Destroy()]


def test_frontend_reconnect_waits_for_the_backend_to_close() -> None:
    fe = FrontendMachine()
    fe.start()
    fe.peer_state_changed(S.InitWait)
    fe.peer_state_changed(S.Connected)
    assert fe.reconnect() == [WriteState(S.Closing)]
    assert fe.peer_state_changed(S.Closing) == [Disconnect(), WriteState(S.Closed)]
    assert fe.reconnect_requested
    assert fe.peer_state_changed(S.Closed) == [WriteState(S.Initialising)]
    assert not fe.reconnect_requested
    assert fe.peer_state_changed(S.InitWait) == [Publish(), WriteState(S.Initialised)]


def test_a_stale_frontend_state_closes_then_reinitialises() -> None:
    fe = FrontendMachine(initial=S.Connected)
    assert fe.start() == [WriteState(S.Closing)]
    assert fe.peer_state_changed(S.Connected) == []
    assert fe.peer_state_changed(S.Closed) == [
        Disconnect(),
        WriteState(S.Closed),
        WriteState(S.Initialising),
    ]


@pytest.mark.parametrize("raw", [b"99", b"-1", b"", b"4 ", b"04", b"1" * 5000, b"\xff", b"+4"])
def test_garbage_peer_state_is_a_peer_error_and_closes_once(raw: bytes) -> None:
    be = BackendMachine()
    be.start()
    out = be.peer_state_raw(raw)
    assert out[0] == WriteError(
        errno.EINVAL, str(InvalidStateError(f"invalid xenbus state {raw[:32]!r}"))
    )
    assert out[1:] == [WriteState(S.Closing)]
    assert be.misbehaving and be.peer_errors == 1
    assert be.peer_state_raw(raw) == []  # already failing: not rewritten
    assert be.peer_errors == 2


@pytest.mark.parametrize(
    ("own", "peer"),
    [(S.InitWait, S.InitWait), (S.InitWait, S.Reconfiguring), (S.Connected, S.Reconfigured)],
)
def test_unknown_backend_pair_is_a_peer_error(own: XenbusState, peer: XenbusState) -> None:
    be = BackendMachine()
    be.start()
    if own is S.Connected:
        be.peer_state_changed(S.Initialised)
    out = be.peer_state_changed(peer)
    assert isinstance(out[-2], WriteError) and out[-1] == WriteState(S.Closing)
    assert "frontend state" in out[-2].message
    assert be.misbehaving


def test_unknown_frontend_pair_is_a_peer_error() -> None:
    fe = FrontendMachine()
    fe.start()
    out = fe.peer_state_changed(S.Initialised)  # a backend never shows Initialised
    assert out[-1] == WriteState(S.Closing) and fe.misbehaving


def test_misuse_is_a_local_error() -> None:
    be = BackendMachine()
    with pytest.raises(LocalError):
        be.reconnect()
    be.start()
    with pytest.raises(LocalError):
        be.start()
    fe = FrontendMachine()
    fe.start()
    with pytest.raises(LocalError):
        fe.step(Local.OFFLINE)


def test_hotplug_not_ready_holds_connect_until_ready() -> None:
    be = BackendMachine(ready=False)
    be.start()
    assert be.peer_state_changed(S.Initialised) == []
    assert be.local_ready() == [Connect(), WriteState(S.Connected)]


def test_reconnect_after_a_peer_error_clears_misbehaving() -> None:
    be = BackendMachine()
    be.start()
    be.peer_state_raw(b"junk")
    assert be.misbehaving
    be.peer_state_changed(S.Closed)
    assert be.peer_state_changed(S.Initialising)[-1] == WriteState(S.InitWait)
    assert not be.misbehaving


def test_guards_are_all_used() -> None:
    used = {r.guard for t in ALL_TABLES.values() for rows in t.values() for r in rows}
    assert used >= set(Guard)


@pytest.mark.parametrize("name", TABLES)
def test_diagram_shows_every_effective_row(name: str) -> None:
    table, peer = TABLES[name]
    mermaid, dot = render_mermaid(name), render_dot(name)
    assert mermaid.startswith("stateDiagram-v2\n")
    assert dot.startswith(f'digraph "{name}"')
    labels = [label for _, _, label in edges(table, peer)]
    for (own, inp), rows in table.items():
        for r in rows:
            if r.next is None and not r.actions:
                continue
            text = inp.value if isinstance(inp, Local) else f"{peer}={inp.name}"
            assert any(text in label for label in labels), (own, inp)
    assert mermaid.count("-->") == len(labels) + 1
    assert dot.count("->") == len(labels)


def test_the_user_guide_diagrams_are_current() -> None:
    from pathlib import Path

    from xenpv.xenbus.diagram import update_generated

    doc = (Path(__file__).resolve().parents[2] / "docs" / "xenbus.md").read_text()
    assert "<!-- generated: xenbus diagram backend -->" in doc
    assert update_generated(doc) == doc, "run: python -m xenpv.xenbus.diagram docs/xenbus.md"

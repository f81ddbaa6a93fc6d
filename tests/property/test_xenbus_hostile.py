"""Fuzz invariant for the xenbus machines: any sequence a hostile peer can produce is safe.

Whatever the peer writes to its ``state`` node (valid states in any order, garbage, the
node vanishing) and whatever local events interleave, the machine never raises, returns
a bounded number of actions per input, only ever asks to write real states, and a peer
that broke the protocol is answered with the error node and Closing.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.xenbus.machine import (
    MAX_SETTLE,
    BackendMachine,
    Destroy,
    FrontendMachine,
    FrontendStyle,
    WriteError,
    WriteState,
    XenbusMachine,
)
from xenpv.xenbus.states import XenbusState

S = XenbusState
PEER_VALUES = st.one_of(
    st.sampled_from([str(i).encode() for i in range(9)]),
    st.none(),
    st.binary(max_size=12),
    st.sampled_from([b"99", b"-1", b"04", b" 4", b"4\0", str(2**40).encode()]),
)
LOCAL = st.sampled_from(["close", "force_close", "local_error", "offline", "online", "ready"])
STEP = st.one_of(PEER_VALUES.map(lambda v: ("peer", v)), LOCAL.map(lambda v: ("local", v)))


def _drive(m: XenbusMachine, steps: list[tuple[str, object]]) -> None:
    m.start()
    for kind, value in steps:
        destroyed, errors = m.destroyed, m.peer_errors
        if kind == "peer":
            assert value is None or isinstance(value, bytes)
            actions = m.peer_state_raw(value)
        elif value == "local_error":
            actions = m.local_error(5, "io")
        elif value in ("offline", "online"):
            actions = m.online_changed(value == "online") if isinstance(m, BackendMachine) else []
        elif value == "ready":
            actions = m.local_ready() if isinstance(m, BackendMachine) else m.reconnect()
        else:
            actions = getattr(m, str(value))()
        assert len(actions) <= 4 * MAX_SETTLE
        if destroyed:
            assert actions == []
        for a in actions:
            if isinstance(a, WriteState):
                assert a.state in S and a.state is not S.Unknown
            if isinstance(a, WriteError) and kind == "peer":
                assert a.errno == 22 or a.message
        if any(isinstance(a, Destroy) for a in actions):
            assert m.destroyed
        if m.peer_errors > errors and not m.destroyed:
            assert m.state in (S.Closing, S.Closed)  # answered with Closing (R4)
            assert m.misbehaving


@settings(max_examples=300, deadline=None)
@given(st.lists(STEP, max_size=40))
def test_backend_machine_survives_any_peer(steps: list[tuple[str, object]]) -> None:
    _drive(BackendMachine(), steps)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(FrontendStyle)), st.lists(STEP, max_size=40))
def test_frontend_machine_survives_any_peer(
    style: FrontendStyle, steps: list[tuple[str, object]]
) -> None:
    _drive(FrontendMachine(style), steps)


@settings(max_examples=200, deadline=None)
@given(PEER_VALUES.filter(lambda v: v not in [str(i).encode() for i in range(9)] + [None]))
def test_garbage_closes_with_an_error_node_from_any_open_state(raw: bytes) -> None:
    for start_peer in (S.Initialising, S.Initialised, S.Connected):
        be = BackendMachine()
        be.start()
        be.peer_state_changed(start_peer)
        actions = be.peer_state_raw(raw)
        assert any(isinstance(a, WriteError) for a in actions)
        assert be.state is S.Closing and be.misbehaving

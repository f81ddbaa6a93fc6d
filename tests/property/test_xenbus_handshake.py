"""Both ends of the xenbus handshake under random interleavings (Hypothesis state machine).

A frontend and a backend machine share a model of the two ``state`` nodes.  Each side
works like the driver: it executes the actions of its last input one at a time (so the
other side can move in between), and reads the peer's *current* state when it runs again,
which is what coalesced watch events amount to.  Rules add local closes, reconnects,
failing hooks, forced closes and the toolstack's removal; at the end the driver's
connect and close timeouts are applied to a side that still waits.  Invariants: no exception ever;
a side never writes its state node after the toolstack deleted it; and once everything
settles, the two ends agree: both Connected, or both closed (Closed, or gone).
"""

from __future__ import annotations

import errno
from collections import deque

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from xenpv.xenbus.machine import (
    Action,
    BackendMachine,
    Connect,
    Destroy,
    FrontendMachine,
    FrontendStyle,
    Publish,
    PublishFeatures,
    WriteState,
    XenbusMachine,
)
from xenpv.xenbus.states import XenbusState

S = XenbusState
SIDES = ("fe", "be")
OTHER = {"fe": "be", "be": "fe"}


class Handshake(RuleBasedStateMachine):
    """Two machines, two state nodes, one toolstack."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, bytes | None] = {"fe": b"1", "be": b"1"}
        self.online = True
        self.m: dict[str, XenbusMachine] = {}
        self.queue: dict[str, deque[Action]] = {"fe": deque(), "be": deque()}
        self.fail_next: dict[str, bool] = {"fe": False, "be": False}
        self.started = False
        self.connected = {"fe": False, "be": False}

    # -- plumbing --------------------------------------------------------------------
    def _feed(self, side: str, actions: list[Action]) -> None:
        self.queue[side].extend(actions)

    def _idle(self, side: str) -> bool:
        return self.started and not self.queue[side] and not self.m[side].destroyed

    def _run_one(self, side: str) -> None:
        m = self.m[side]
        action = self.queue[side].popleft()
        if isinstance(action, WriteState):
            # the driver writes only if the node still exists (never re-creates it)
            if self.nodes[side] is not None:
                self.nodes[side] = action.state.encode()
        elif isinstance(action, Publish | Connect | PublishFeatures) and self.fail_next[side]:
            self.fail_next[side] = False
            self.queue[side].clear()
            self._feed(side, m.local_error(errno.EIO, "hook failed"))
        elif isinstance(action, Connect):
            self.connected[side] = True
        elif isinstance(action, Destroy):
            assert m.destroyed

    def _sync(self, side: str) -> None:
        m = self.m[side]
        if self.nodes[side] is None:
            self._feed(side, m.removed())
            return
        if side == "be":
            self._feed(side, m.online_changed(self.online))
            if m.destroyed:
                return
        self._feed(side, m.peer_state_raw(self.nodes[OTHER[side]]))

    # -- rules -----------------------------------------------------------------------
    @precondition(lambda self: not self.started)
    @rule(style=st.sampled_from(list(FrontendStyle)), be_first=st.booleans())
    def start(self, style: FrontendStyle, be_first: bool) -> None:
        self.m = {"fe": FrontendMachine(style), "be": BackendMachine()}
        self.started = True
        for side in ("be", "fe") if be_first else ("fe", "be"):
            self._feed(side, self.m[side].start())

    @precondition(lambda self: self.started)
    @rule(side=st.sampled_from(SIDES))
    def step(self, side: str) -> None:
        if self.queue[side]:
            self._run_one(side)
        elif not self.m[side].destroyed:
            self._sync(side)

    @precondition(lambda self: self.started)
    @rule(side=st.sampled_from(SIDES))
    def hook_fails_next(self, side: str) -> None:
        self.fail_next[side] = True

    @precondition(lambda self: self._idle("fe"))
    @rule()
    def frontend_closes(self) -> None:
        self._feed("fe", self.m["fe"].close())

    @precondition(lambda self: self._idle("be"))
    @rule()
    def backend_closes(self) -> None:
        self._feed("be", self.m["be"].close())

    @precondition(lambda self: self._idle("fe"))
    @rule()
    def frontend_reconnects(self) -> None:
        self._feed("fe", self.m["fe"].reconnect())

    @precondition(lambda self: self.started)
    @rule(side=st.sampled_from(SIDES))
    def close_times_out(self, side: str) -> None:
        if self._idle(side) and self.m[side].state is S.Closing:
            self._feed(side, self.m[side].force_close())

    @precondition(lambda self: self.started and self.online and self.nodes["be"] is not None)
    @rule()
    def toolstack_starts_removal(self) -> None:
        self.online = False
        if self.nodes["be"] != b"6":
            self.nodes["be"] = b"5"

    @precondition(lambda self: not self.online and self.nodes["be"] in (b"6", None))
    @rule()
    def toolstack_deletes_directories(self) -> None:
        self.nodes["fe"] = self.nodes["be"] = None

    # -- invariants ------------------------------------------------------------------
    @invariant()
    def deleted_nodes_stay_deleted(self) -> None:
        if not self.online and self.nodes["fe"] is None:
            assert self.nodes["be"] is None

    def _settle(self) -> None:
        """Run both sides until nothing changes any more."""
        for _ in range(200):
            before = (dict(self.nodes), self.m["fe"].state, self.m["be"].state)
            for side in SIDES:
                while self.queue[side]:
                    self._run_one(side)
                if not self.m[side].destroyed:
                    self._sync(side)
                while self.queue[side]:
                    self._run_one(side)
            if (dict(self.nodes), self.m["fe"].state, self.m["be"].state) == before:
                break
        else:
            raise AssertionError(f"no quiescence: {self.nodes}")

    def _timeouts(self) -> None:
        """What the driver's deadlines do to a side still waiting (connect/close timeouts)."""
        for _ in range(4):
            for side in SIDES:
                m = self.m[side]
                if m.destroyed:
                    continue
                waiting = m.state is S.Closing or (
                    side == "fe"
                    and (m.state in (S.Initialising, S.Initialised) or m.reconnect_requested)
                )
                if not waiting:
                    continue
                if m.state in (S.Closing, S.Closed):
                    self._feed(side, m.force_close())
                else:
                    self._feed(side, m.local_error(errno.ETIMEDOUT, "connect timeout"))
            self._settle()

    def teardown(self) -> None:
        if not self.started:
            return
        self.fail_next = {"fe": False, "be": False}
        self._settle()
        self._timeouts()
        if not self.online:
            # the toolstack finishes the removal (forced if the backend is not Closed)
            self.nodes["fe"] = self.nodes["be"] = None
            self._settle()
        fe, be = self.m["fe"], self.m["be"]
        ends = {
            side: (self.m[side].state if not self.m[side].destroyed else S.Unknown)
            for side in SIDES
        }
        closed = {S.Closed, S.Unknown, S.InitWait}
        if ends["fe"] is S.Connected or ends["be"] is S.Connected:
            assert ends == {"fe": S.Connected, "be": S.Connected}, ends
        else:
            # both ends closed (a backend may be waiting in InitWait for a reconnect)
            assert ends["fe"] in {S.Closed, S.Unknown}, ends
            assert ends["be"] in closed, ends
        if ends["fe"] is S.Closed and ends["be"] is S.InitWait:
            assert self.online
        if not self.online and self.nodes["be"] is not None:
            assert ends["be"] in (S.Closing, S.Closed, S.Unknown), ends
        # the nodes show what the machines believe (unless deleted)
        for side in SIDES:
            if self.nodes[side] is not None and not self.m[side].destroyed:
                if not (side == "be" and not self.online):
                    assert self.nodes[side] == self.m[side].state.encode(), (side, self.nodes)
        assert fe.peer_errors == 0 and be.peer_errors == 0


TestHandshake = Handshake.TestCase
TestHandshake.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)

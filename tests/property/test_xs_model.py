"""The store against a naive reference model (hostile-inputs scenario 30, xenstore part).

The model and the harness that drives the store and the model side by side live in
:mod:`xenpv.fuzz.xsmodel` (the ``xenstore:model`` fuzz target uses them too).  The model
keeps whole-node copies in plain dicts and lists, recounts quotas by scanning, and
implements C xenstored's transaction rule directly.  After every step the store's reply,
the watch events of every connection, the per-domain node counts and the store's own
consistency check must match, and a serialise/restore round trip must reproduce the tree.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from xenpv.fuzz.xsmodel import CONNS, PATHS, PERM_SETS, WATCH_PATHS, XsHarness


class XenstoreModelMachine(RuleBasedStateMachine):
    """Random request sequences from four connections (two of dom0, domains 5 and 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.h = XsHarness()

    @initialize()
    def homes(self) -> None:
        self.h.homes()

    @rule(conn=st.sampled_from(list(CONNS)), use_tx=st.booleans(), path=st.sampled_from(PATHS),
          value=st.binary(max_size=6))  # fmt: skip
    def write(self, conn: str, use_tx: bool, path: str, value: bytes) -> None:
        self.h.op(conn, use_tx, "write", path, value)

    @rule(conn=st.sampled_from(["c0", "c0b"]), use_tx=st.booleans(),
          path=st.sampled_from(["/a", "/a/b", "/local/domain/5/x"]), value=st.binary(max_size=2))  # fmt: skip
    def dom0_write_hot(self, conn: str, use_tx: bool, path: str, value: bytes) -> None:
        """Frequent dom0 writes to a few nodes: conflicts with what open transactions touched."""
        self.h.op(conn, use_tx, "write", path, value)

    @rule(conn=st.sampled_from(list(CONNS)), use_tx=st.booleans(), path=st.sampled_from(PATHS),
          op=st.sampled_from(["read", "dir", "getperms", "mkdir", "rm"]))  # fmt: skip
    def simple(self, conn: str, use_tx: bool, path: str, op: str) -> None:
        self.h.op(conn, use_tx, op, path)

    @rule(conn=st.sampled_from(list(CONNS)), use_tx=st.booleans(), path=st.sampled_from(PATHS),
          perms=st.sampled_from(PERM_SETS))  # fmt: skip
    def set_perms(self, conn: str, use_tx: bool, path: str, perms: tuple[str, ...]) -> None:
        self.h.op(conn, use_tx, "setperms", path, perms)

    @rule(conn=st.sampled_from(list(CONNS)), path=st.sampled_from(WATCH_PATHS),
          token=st.sampled_from(["t1", "t2"]))  # fmt: skip
    def watch(self, conn: str, path: str, token: str) -> None:
        self.h.watch(conn, path, token)

    @rule(conn=st.sampled_from(list(CONNS)), path=st.sampled_from(WATCH_PATHS),
          token=st.sampled_from(["t1", "t2"]))  # fmt: skip
    def unwatch(self, conn: str, path: str, token: str) -> None:
        self.h.unwatch(conn, path, token)

    @rule(conn=st.sampled_from(list(CONNS)))
    def start(self, conn: str) -> None:
        self.h.start(conn)

    @precondition(lambda self: bool(self.h.txs))
    @rule(data=st.data(), commit=st.booleans())
    def end(self, data: st.DataObject, commit: bool) -> None:
        self.h.end(data.draw(st.sampled_from(sorted(self.h.txs))), commit)

    @rule()
    def serialise_round_trip(self) -> None:
        self.h.round_trip()

    @invariant()
    def same_tree_and_counts(self) -> None:
        self.h.same_tree_and_counts()


XenstoreModelMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_xenstore_model = XenstoreModelMachine.TestCase

"""The xenstore model state machine, longer runs with rules aimed at open transactions.

:class:`XenstoreLongMachine` extends the short machine of ``test_xs_model.py`` with rules
that act from *outside* a transaction on exactly the nodes an open transaction touched:
writes, removals (of the node or of its parent) and permission changes, including the
removal of an existing node the transaction wrote (the commit then fails with EAGAIN: the
write looked at the node first, as C xenstored's does).  It also adds watches under
mixed permissions (a node unreadable to a domain under a readable parent, and a readable
node under an unreadable parent).  Runs of 80 steps; the example count keeps the test
under about a minute on two loaded CPUs.  ``XS_LONG_EXAMPLES`` raises it for a campaign
(docs/testing.md).
"""

from __future__ import annotations

import os

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule
from test_xs_model import XenstoreModelMachine

from xenpv.fuzz.xsmodel import PERM_SETS, XsHarness

#: Permission sets that make a node readable to one guest and not the other.
MIXED = [("n0", "r5"), ("n0", "r6"), ("r0",), ("n5", "r6"), ("b6", "n5")]


class XenstoreLongMachine(XenstoreModelMachine):
    """The short machine plus outside actions on the nodes of open transactions."""

    def _tx_path(self, data: st.DataObject, changed_only: bool) -> tuple[str, str] | None:
        owners = [
            c
            for c in sorted(self.h.txs)
            if (self.h.rewritten(c) if changed_only else self.h.touched(c))
        ]
        if not owners:
            return None
        owner = data.draw(st.sampled_from(owners), label="tx owner")
        choices = self.h.rewritten(owner) if changed_only else self.h.touched(owner)
        return owner, data.draw(st.sampled_from(choices), label="touched path")

    @precondition(lambda self: any(self.h.touched(c) for c in self.h.txs))
    @rule(data=st.data(), op=st.sampled_from(["write", "rm", "rm-parent", "setperms", "mkdir"]),
          value=st.binary(max_size=2), perms=st.sampled_from(PERM_SETS + MIXED))  # fmt: skip
    def outside_on_touched(
        self, data: st.DataObject, op: str, value: bytes, perms: tuple[str, ...]
    ) -> None:
        """Another connection, outside any transaction, changes a node a transaction touched."""
        picked = self._tx_path(data, changed_only=False)
        assert picked is not None
        _owner, path = picked
        actor = data.draw(st.sampled_from(["c0b", "c0", "c5", "c6"]), label="actor")
        if op == "write":
            self.h.op(actor, False, "write", path, value)
        elif op == "rm":
            self.h.op(actor, False, "rm", path)
        elif op == "rm-parent":
            self.h.op(actor, False, "rm", path.rsplit("/", 1)[0] or "/")
        elif op == "mkdir":
            self.h.op(actor, False, "mkdir", path)
        else:
            self.h.op(actor, False, "setperms", path, perms)

    @precondition(lambda self: any(self.h.rewritten(c) for c in self.h.txs))
    @rule(data=st.data(), parent=st.booleans(), commit=st.booleans())
    def remove_changed_then_end(self, data: st.DataObject, parent: bool, commit: bool) -> None:
        """Dom0 removes, outside, a node (or its parent) a transaction changed; then it ends."""
        picked = self._tx_path(data, changed_only=True)
        assert picked is not None
        owner, path = picked
        actor = "c0" if owner != "c0" else "c0b"
        target = path.rsplit("/", 1)[0] or "/" if parent else path
        if target != "/":
            self.h.op(actor, False, "rm", target)
        self.h.end(owner, commit)

    @rule(conn=st.sampled_from(["c0", "c0b"]), use_tx=st.booleans(),
          path=st.sampled_from(["/a", "/a/b", "/a/b/c", "/local/domain/5/x", "/local/domain/6/z"]),
          perms=st.sampled_from(MIXED))  # fmt: skip
    def dom0_mixed_perms(self, conn: str, use_tx: bool, path: str, perms: tuple[str, ...]) -> None:
        """Dom0 makes a node readable to one guest only (watch visibility under mixed permissions)."""
        self.h.op(conn, use_tx, "setperms", path, perms)

    @rule(conn=st.sampled_from(["c5", "c6"]), path=st.sampled_from(["/a", "/a/b", "/a/b/c", "/"]),
          token=st.sampled_from(["t1", "t2"]))  # fmt: skip
    def guest_watch_mixed(self, conn: str, path: str, token: str) -> None:
        """A guest watches a subtree whose nodes it may or may not read."""
        self.h.watch(conn, path, token)


XenstoreLongMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("XS_LONG_EXAMPLES", "250")),
    stateful_step_count=int(os.environ.get("XS_LONG_STEPS", "80")),
    deadline=None,
)
test_xenstore_model_long = XenstoreLongMachine.TestCase


def test_model_agrees_that_dom0_cannot_remove_the_root() -> None:
    """Found by the long machine: the model removed "/" (a KeyError); the store says EINVAL."""
    h = XsHarness()
    h.homes()
    h.op("c0", False, "rm", "/")
    h.start("c0b")
    h.op("c0b", True, "rm", "/")
    h.end("c0b", True)
    h.same_tree_and_counts()

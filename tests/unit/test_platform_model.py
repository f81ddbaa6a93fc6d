"""The in-process loopback platform against a simple model (Hypothesis state machine).

Two domains grant, map, unmap and end access in random order; event channels are
allocated, bound, notified and closed.  After every step the hypervisor's accounting must
equal the model's, strict end of access must fail exactly while a page is mapped, and
closing everything must release everything.
"""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from xenpv.errors import PlatformError
from xenpv.platforms.base import GrantInUse
from xenpv.platforms.loopback.core import Hypervisor
from xenpv.platforms.loopback.inprocess import InProcessPlatform

MAX_GRANTS = 24
MAX_PORTS = 8


class LoopbackModel(RuleBasedStateMachine):
    """Random grant and event-channel traffic between dom0 and dom1."""

    shares = Bundle("shares")
    mappings = Bundle("mappings")

    def __init__(self) -> None:
        super().__init__()
        self.hv = Hypervisor(max_grants=MAX_GRANTS, max_ports=MAX_PORTS)
        self.hv.create_domain(1)
        self.dom = {0: InProcessPlatform(self.hv, 0), 1: InProcessPlatform(self.hv, 1)}
        self.live_pages: dict[int, int] = {0: 0, 1: 0}  # granted pages per granter
        self.mapped: dict[tuple[int, int], int] = {}  # (granter, ref) -> map count
        self.ports: dict[int, list[int]] = {0: [], 1: []}
        self.offered: list[tuple[int, int]] = []  # (domain, port) unbound for the other

    # -- grants
    @rule(target=shares, granter=st.sampled_from([0, 1]), count=st.integers(1, 4), writable=st.booleans())
    def grant(self, granter: int, count: int, writable: bool) -> Any:
        free = MAX_GRANTS - 8 - self.live_pages[granter]
        try:
            pages = self.dom[granter].grants.grant(1 - granter, count, writable=writable)
        except PlatformError:
            assert count > free
            return None
        assert count <= free
        self.live_pages[granter] += count
        return (granter, pages)

    @rule(target=mappings, share=shares, writable=st.booleans())
    def map(self, share: Any, writable: bool) -> Any:
        if share is None:
            return None
        granter, pages = share
        if pages.handle_id not in self.dom[granter].grants._live:
            return None
        mapper = self.dom[1 - granter]
        try:
            m = mapper.grants.map(granter, pages.refs, writable=writable)
        except PlatformError:
            assert writable and not pages.writable
            return None
        for r in pages.refs:
            self.mapped[(granter, r)] = self.mapped.get((granter, r), 0) + 1
        if writable:
            m.mem[0:1] = b"m"
        else:
            assert len(bytes(m.mem[0:1])) == 1
        return (granter, m)

    @rule(mapping=consumes(mappings))
    def unmap(self, mapping: Any) -> None:
        if mapping is None:
            return
        granter, m = mapping
        self.dom[1 - granter].grants.unmap(m)
        for r in m.refs:
            self.mapped[(granter, r)] -= 1

    @rule(share=shares)
    def end_access(self, share: Any) -> None:
        if share is None:
            return
        granter, pages = share
        if pages.handle_id not in self.dom[granter].grants._live:
            return
        busy = any(self.mapped.get((granter, r), 0) for r in pages.refs)
        try:
            self.dom[granter].grants.end_access(pages)
        except GrantInUse:
            assert busy
            return
        assert not busy
        self.live_pages[granter] -= len(pages.refs)

    # -- event channels
    @rule(owner=st.sampled_from([0, 1]))
    def alloc(self, owner: int) -> None:
        try:
            port = self.dom[owner].events.alloc_unbound(1 - owner)
        except PlatformError:
            assert len(self.ports[owner]) == MAX_PORTS - 1
            return
        assert port not in self.ports[owner] and port != 0
        self.ports[owner].append(port)
        self.offered.append((owner, port))

    @rule(data=st.data())
    def bind(self, data: st.DataObject) -> None:
        if not self.offered:
            return
        owner, port = data.draw(st.sampled_from(self.offered))
        binder = 1 - owner
        try:
            local = self.dom[binder].events.bind_interdomain(owner, port)
        except PlatformError:
            assert len(self.ports[binder]) == MAX_PORTS - 1
            return
        self.offered.remove((owner, port))
        self.ports[binder].append(local)
        assert self.dom[binder].events.pending(1) == local
        self.dom[binder].events.unmask(local)
        self.dom[binder].events.notify(local)
        assert self.dom[owner].events.pending(1) == port
        self.dom[owner].events.unmask(port)

    @rule(data=st.data(), owner=st.sampled_from([0, 1]))
    def unbind(self, data: st.DataObject, owner: int) -> None:
        if not self.ports[owner]:
            return
        port = data.draw(st.sampled_from(self.ports[owner]))
        self.dom[owner].events.unbind(port)
        self.ports[owner].remove(port)
        if (owner, port) in self.offered:
            self.offered.remove((owner, port))
        # a peer bound to it is back to unbound: it may be bound again by us
        for peer_port in self.ports[1 - owner]:
            state = self.hv.status(self.dom[1 - owner].events._h, 1 - owner, peer_port)[0]
            if state == 1 and (1 - owner, peer_port) not in self.offered:
                self.offered.append((1 - owner, peer_port))

    # -- invariants
    @invariant()
    def accounting_matches(self) -> None:
        for d in (0, 1):
            st_ = self.hv.stats(d)
            assert st_.grants == self.live_pages[d]
            assert st_.ports == len(self.ports[d])
        mapped_pages = sum(self.mapped.values())
        assert self.hv.domain(0).maptrack + self.hv.domain(1).maptrack == mapped_pages

    def teardown(self) -> None:
        for p in self.dom.values():
            p.close()
        self.hv.assert_released()
        self.hv.close()


LoopbackModel.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_loopback_platform_matches_the_model = LoopbackModel.TestCase

"""A hostile guest sends arbitrary control requests: only clean errors, nothing leaks.

Every request a guest can send reaches :meth:`LoopbackDaemon.dispatch`; whatever the
bytes, the reply must be success or a plain ``-errno`` (never ``-EIO``, which marks an
exception inside the daemon), and closing the guest's handle must release everything.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.daemon import LoopbackDaemon, _Connection
from xenpv.platforms.loopback.proto import Op

u32 = st.integers(0, 2**32 - 1)
small = st.integers(0, 40)


def _payloads() -> st.SearchStrategy[tuple[int, bytes]]:
    refs = st.lists(st.tuples(st.sampled_from([0, 1, 2, 0x7FF0, 9]), small), max_size=6)
    return st.one_of(
        st.tuples(st.integers(0, 25), st.binary(max_size=64)),
        st.tuples(
            st.just(int(Op.GNT_SHARE)),
            st.builds(
                proto.SHARE_REQ.pack,
                st.sampled_from([0, 1, 2, 0x7FF0]),
                st.integers(0, 3),
                st.integers(0, 5),
            ),
        ),
        st.tuples(
            st.just(int(Op.GNT_MAP)),
            st.builds(
                lambda f, rs: (
                    proto.U32x2.pack(f, len(rs)) + b"".join(proto.U32x2.pack(*r) for r in rs)
                ),
                st.integers(0, 3),
                refs,
            ),
        ),
        st.tuples(
            st.just(int(Op.GNT_END)),
            st.builds(
                lambda f, rs: (
                    proto.U32x2.pack(f, len(rs)) + b"".join(proto.U32.pack(r) for r in rs)
                ),
                st.integers(0, 3),
                st.lists(small, max_size=5),
            ),
        ),
        st.tuples(
            st.sampled_from(
                [
                    int(Op.GNT_UNMAP),
                    int(Op.EVT_UNBIND),
                    int(Op.EVT_NOTIFY),
                    int(Op.EVT_ALLOC_UNBOUND),
                ]
            ),
            st.builds(proto.U32.pack, small),
        ),
        st.tuples(
            st.just(int(Op.GNT_SET_NOTIFY)),
            st.builds(proto.U32x4.pack, small, st.integers(0, 9000), small, st.integers(0, 7)),
        ),
        st.tuples(
            st.just(int(Op.EVT_BIND_INTERDOMAIN)),
            st.builds(proto.U32x2.pack, st.sampled_from([0, 1, 2, 0x7FF0]), small),
        ),
        st.tuples(
            st.just(int(Op.GNT_COPY)),
            st.builds(
                lambda segs, data: (
                    proto.U32x2.pack(len(segs), 0)
                    + b"".join(proto.COPY_SEG.pack(*s) for s in segs)
                    + data
                ),
                st.lists(
                    st.tuples(
                        small,
                        st.sampled_from([0, 1, 2]),
                        st.integers(0, 4200),
                        small,
                        st.sampled_from([0, 1, 2]),
                        st.integers(0, 4200),
                        st.integers(0, 5000),
                        # grant sides, own-page sides (ref: a share handle id), both
                        st.sampled_from([0, 1, 2, 3, 0x100, 0x200, 0x300, 0x101, 0x202,
                                         0x102, 0x201, 0xFFFF]),
                        st.just(0),
                    ),
                    max_size=4,
                ),
                st.binary(max_size=128),
            ),
        ),
        st.tuples(st.just(int(Op.FRAME_ALLOC)), st.builds(proto.U32.pack, st.integers(0, 3))),
        st.tuples(
            st.just(int(Op.FOREIGN_MAP)),
            st.builds(
                lambda d, f, gs: (
                    proto.U32x3.pack(d, f, len(gs)) + b"".join(proto.U32.pack(g) for g in gs)
                ),
                st.sampled_from([0, 1, 2]),
                st.integers(0, 1),
                st.lists(st.sampled_from([0, 0x10000, 0x10001, 0xFFFFFFFF]), max_size=3),
            ),
        ),
        st.tuples(
            st.just(int(Op.GNT_GRANT_FRAME)),
            st.builds(
                proto.GRANT_FRAME_REQ.pack,
                st.sampled_from([0, 0x10000, 0x10001, 0xFFFFFFFF]),
                st.sampled_from([0, 1, 2, 9, proto.ANY_REF]),
                st.sampled_from([0, 1, 2]),
                st.integers(0, 1),
            ),
        ),
        st.tuples(
            st.just(int(Op.GNT_SHARE_RESERVED)),
            st.builds(
                proto.SHARE_RESERVED_REQ.pack,
                st.integers(0, 9),
                st.sampled_from([0, 2]),
                st.integers(0, 1),
            ),
        ),
    )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(requests=st.lists(_payloads(), min_size=1, max_size=25))
def test_isolation_arbitrary_guest_requests_give_clean_errors_and_leak_nothing(
    tmp_path: Path, requests: list[tuple[int, bytes]]
) -> None:
    async def scenario() -> None:
        daemon = LoopbackDaemon(tmp_path / "run", max_grants=32, max_ports=8, xenstore=False)
        daemon.hv.create_domain(1)
        daemon.hv.create_domain(2)
        s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn = _Connection(daemon, s1, daemon.hv.open_handle(1))
        peer = daemon.hv.open_handle(0)
        # something to aim at: a share for dom1 and a port offered to dom1
        daemon.hv.share(peer, 1, 2, writable=True)
        daemon.hv.alloc_unbound(peer, 1)
        try:
            for op, payload in requests:
                status, _out, fds, to_close = await daemon.dispatch(conn, op, payload)
                for fd in to_close:
                    os.close(fd)
                assert status == 0 or (status < 0 and status != -errno.EIO), (op, status)
                assert len(fds) <= proto.MAX_FDS
                if status < 0:
                    assert not fds
        finally:
            conn.close()
            s2.close()
            daemon.hv.close_handle(peer)
        daemon.hv.assert_released()
        daemon.hv.close()

    asyncio.run(scenario())


def test_isolation_guest_cannot_reach_privileged_ops_through_dispatch(tmp_path: Path) -> None:
    async def scenario() -> None:
        daemon = LoopbackDaemon(tmp_path / "run", xenstore=False)
        daemon.hv.create_domain(1)
        s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn = _Connection(daemon, s1, daemon.hv.open_handle(1))
        try:
            for op, payload in (
                (Op.DOMAIN_CREATE, struct.pack("<I", 5) + b"x"),
                (Op.DOMAIN_DESTROY, struct.pack("<I", 1)),
                (Op.FAULT, proto.U32x4.pack(1, 0, 8, 0)),
            ):
                status, *_ = await daemon.dispatch(conn, op, payload)
                assert status == -errno.EPERM
        finally:
            conn.close()
            s2.close()
        daemon.hv.close()

    asyncio.run(scenario())

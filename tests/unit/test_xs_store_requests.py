"""The store's domain and listing requests at the edges of their arguments.

Each refusal is checked on the raw reply (the errno name exactly as sent, not read back
through a parser that maps unknown names to EINVAL), each acceptance by its effect.  The
rules, from xen-protocols.md §4.2 and the store's own bounds:

- a domid argument is 1-5 decimal digits worth at most 65535 (domids are 16 bits);
- the arguments are NUL-separated and the last NUL may be left out; fewer than the
  request's arguments is EINVAL;
- INTRODUCE and RELEASE never act on dom0 (EINVAL); SET_TARGET needs both domains
  introduced (ENOENT);
- DIRECTORY_PART's offset is decimal; a reply is ``<gen>\\0`` and whole names from the
  offset on, followed by one more NUL when it reaches the end of the list, never more
  than 4096 bytes, and a name is left for the next chunk only if it would not fit
  together with that final NUL; an offset at or past the end gives ``<gen>\\0\\0``.
"""

from __future__ import annotations

import pytest

from xenpv.xenstore import wire
from xenpv.xenstore.store import Quotas, Store
from xenpv.xenstore.wire import XsType as T

PAYLOAD_MAX = 4096  # xs_wire.h XENSTORE_PAYLOAD_MAX


def request(store: Store, conn: object, type_: int, payload: bytes) -> tuple[int, bytes]:
    """Send one request; returns the reply's type and payload (checking its header)."""
    reply = store.handle(conn, type_, 77, 0, payload)  # type: ignore[arg-type]
    rtype, rid, rtx, length = wire.HEADER.unpack_from(reply)
    assert (rid, rtx, length) == (77, 0, len(reply) - 16)
    assert rtype in (type_, T.ERROR)
    return rtype, reply[16:]


def refused(store: Store, conn: object, type_: int, payload: bytes) -> bytes:
    """The raw errno name of a refusal (the request must be refused)."""
    rtype, body = request(store, conn, type_, payload)
    assert rtype == T.ERROR, (type_, payload, body)
    return body


def accepted(store: Store, conn: object, type_: int, payload: bytes) -> bytes:
    """The reply payload of a request that must succeed."""
    rtype, body = request(store, conn, type_, payload)
    assert rtype == type_, (type_, payload, body)
    return body


@pytest.fixture
def store() -> Store:
    return Store(Quotas())


def test_domid_arguments_at_both_edges(store: Store) -> None:
    dom0 = store.connect(0)
    for raw, domid in [(b"0", 0), (b"65535", 65535), (b"00009", 9), (b"7", 7)]:
        for payload in (raw + b"\0", raw):  # the last NUL is optional
            assert accepted(store, dom0, T.GET_DOMAIN_PATH, payload) == (
                f"/local/domain/{domid}\0".encode()
            )
        introduced = b"T\0" if domid == 0 else b"F\0"  # dom0 is always there
        assert accepted(store, dom0, T.IS_DOMAIN_INTRODUCED, raw + b"\0") == introduced
    for raw in (b"65536", b"99999", b"000009", b"123456", b"", b"5x", b"-1", b" 5", b"0x10"):
        assert refused(store, dom0, T.GET_DOMAIN_PATH, raw + b"\0") == b"EINVAL\0", raw
        assert refused(store, dom0, T.IS_DOMAIN_INTRODUCED, raw + b"\0") == b"EINVAL\0", raw


def test_introduce_and_release_arguments(store: Store) -> None:
    dom0 = store.connect(0)
    # three arguments, the last NUL optional; domid 1 is an ordinary guest
    assert accepted(store, dom0, T.INTRODUCE, b"1\x001234\x003") == b"OK\0"
    assert store.domains[1].introduced
    assert accepted(store, dom0, T.INTRODUCE, b"65535\x000\x000\0") == b"OK\0"
    assert store.domains[65535].introduced
    for payload in (b"2\x001234", b"2\0", b"2", b""):  # fewer than three arguments
        assert refused(store, dom0, T.INTRODUCE, payload) == b"EINVAL\0", payload
    for payload in (b"0\x001\x002\0", b"65536\x001\x002\0", b"x\x001\x002\0"):
        assert refused(store, dom0, T.INTRODUCE, payload) == b"EINVAL\0", payload
    assert 2 not in store.domains or not store.domains[2].introduced
    assert refused(store, dom0, T.RELEASE, b"0\0") == b"EINVAL\0"
    assert refused(store, dom0, T.RELEASE, b"65536\0") == b"EINVAL\0"
    assert refused(store, dom0, T.RELEASE, b"3\0") == b"ENOENT\0"
    assert accepted(store, dom0, T.RELEASE, b"1") == b"OK\0"
    assert store.released == [1]
    assert accepted(store, dom0, T.IS_DOMAIN_INTRODUCED, b"1\0") == b"F\0"


def test_set_target_needs_two_introduced_domains(store: Store) -> None:
    dom0 = store.connect(0)
    for domid in (5, 6):
        store.introduce_domain(domid)
    store.connect(8)  # known (it has a connection) but never introduced
    for payload in (b"5", b"5\0", b""):
        assert refused(store, dom0, T.SET_TARGET, payload) == b"EINVAL\0", payload
    assert refused(store, dom0, T.SET_TARGET, b"65536\x005\0") == b"EINVAL\0"
    # either side unknown, or known but not introduced: ENOENT, nothing changed
    for a, b in [(5, 8), (8, 5), (5, 9), (9, 5), (8, 9), (9, 8), (9, 10)]:
        payload = f"{a}\0{b}\0".encode()
        assert refused(store, dom0, T.SET_TARGET, payload) == b"ENOENT\0", (a, b)
    assert store.domains[5].target is None and store.domains[8].target is None
    assert accepted(store, dom0, T.SET_TARGET, b"5\x006") == b"OK\0"  # last NUL optional
    assert store.domains[5].target == 6


def test_control_refusals_and_replies(store: Store) -> None:
    """CONTROL: the raw error names, the whole help text, print's joined arguments, the
    check report, and the last NUL dropped only when it ends the payload."""
    dom0 = store.connect(0)
    for payload in (b"", b"\0", b"frobnicate\0", b"\0help\0"):
        assert refused(store, dom0, T.CONTROL, payload) == b"EINVAL\0", payload
    assert refused(store, store.connect(5), T.CONTROL, b"help\0") == b"EACCES\0"
    help_text = accepted(store, dom0, T.CONTROL, b"help\0")
    assert help_text.endswith(b"\n\0") and b"\0" not in help_text[:-1]
    lines = help_text[:-1].decode().splitlines()
    assert [ln.split(" ", 1)[0] for ln in lines] == ["help", "print", "check", "quota"]
    assert accepted(store, dom0, T.CONTROL, b"print\0two\0words\0") == b"OK\0"
    assert store.log[-1] == "two words"
    assert accepted(store, dom0, T.CONTROL, b"print\0\0") == b"OK\0"
    assert store.log[-1] == ""  # one empty argument: the last NUL ends it
    assert accepted(store, dom0, T.CONTROL, b"print\0caf\xc3\xa9\0") == b"OK\0"
    assert store.log[-1] == "caf\ufffd\ufffd"  # non-ASCII bytes are replaced, one each
    assert accepted(store, dom0, T.CONTROL, b"check\0") == b"OK\0"
    # a broken tree: check lists every problem, one per line
    store.owned[0] = store.owned.get(0, 0) + 3
    store.memory[0] = store.memory.get(0, 0) + 1
    report = accepted(store, dom0, T.CONTROL, b"check\0")
    problems = store.check()
    assert len(problems) >= 2
    assert report == "\n".join(problems).encode() + b"\0"


def test_directory_part_chunks_at_every_offset(store: Store) -> None:
    """Every offset at a name's start, over a list whose names (1..40 bytes) make the
    chunks end at every alignment, checked against the rules in the module docstring."""
    dom0 = store.connect(0)
    names = [f"{i:03d}" + "x" * (i * 7 % 38) for i in range(400)]  # 3..40 bytes
    for name in names:
        accepted(store, dom0, T.WRITE, f"/big/{name}\0".encode())
    listing = b"".join(n.encode() + b"\0" for n in sorted(names))
    starts = [0] + [i + 1 for i, b in enumerate(listing) if b == 0]
    assert starts[-1] == len(listing) and len(listing) > 2 * PAYLOAD_MAX
    gens = set()
    full_chunks = 0
    for offset in [*starts, len(listing) + 1, len(listing) + 1000]:
        for payload in (f"/big\0{offset}\0".encode(), f"/big\0{offset}".encode()):
            reply = accepted(store, dom0, T.DIRECTORY_PART, payload)
            assert len(reply) <= PAYLOAD_MAX
            gen, _, rest = reply.partition(b"\0")
            assert gen.isdigit()
            gens.add(gen)
            if offset >= len(listing):
                assert rest == b"\0", offset
            elif rest != listing[offset:] + b"\0":  # not the final chunk: whole names
                end = offset + len(rest)
                assert rest and listing[offset:end] == rest and end in starts, offset
                nxt = listing.index(b"\0", end) + 1 - end  # the next name with its NUL
                assert len(gen) + 1 + len(rest) + nxt + 1 > PAYLOAD_MAX, offset
                full_chunks += 1
            else:  # the final chunk fits whole, with the extra NUL
                assert len(reply) <= PAYLOAD_MAX
    assert len(gens) == 1 and full_chunks > 100
    for payload in (b"/big", b"/big\0x\0", b"/big\0-1\0", b"/big\0\0", b"/big\x001 \0"):
        assert refused(store, dom0, T.DIRECTORY_PART, payload) == b"EINVAL\0", payload


def test_introduce_hands_the_ring_to_the_io_layer_first(store: Store) -> None:
    """With ``on_introduce`` set, INTRODUCE passes (domid, gfn, port) - gfn below 2^64,
    port below 2^32, decimal - before the domain counts as introduced; the hook's errno
    is the reply and leaves nothing introduced; a bad number is EINVAL, hook not called."""
    dom0 = store.connect(0)
    calls: list[tuple[int, int, int]] = []
    answer: list[str | None] = [None]

    def hook(domid: int, gfn: int, port: int) -> str | None:
        calls.append((domid, gfn, port))
        return answer[0]

    store.on_introduce = hook
    top_gfn, top_port = 2**64 - 1, 2**32 - 1
    assert accepted(store, dom0, T.INTRODUCE, f"3\0{top_gfn}\0{top_port}\0".encode()) == b"OK\0"
    assert calls == [(3, top_gfn, top_port)] and store.domains[3].introduced
    for payload in (f"4\0{2**64}\x001\0", f"4\x001\0{2**32}\0", "4\0x\x001\0", "4\x001\0\0",
                    "4\0\x001\0"):
        assert refused(store, dom0, T.INTRODUCE, payload.encode()) == b"EINVAL\0", payload
    assert len(calls) == 1
    answer[0] = "ENOSPC"
    assert refused(store, dom0, T.INTRODUCE, b"4\x0012\x0034\0") == b"ENOSPC\0"
    assert calls[-1] == (4, 12, 34)
    assert 4 not in store.domains or not store.domains[4].introduced


def test_root_removal_permission_entries_and_a_commit_that_does_not_grow(store: Store) -> None:
    """dom0's RM of ``/`` is EINVAL (raw name); a permission entry is a letter and at most
    five digits (``r65535``; ``r000005`` is one digit too many); a domain over its node
    quota (lowered after it created its nodes) may still commit a transaction that does
    not add nodes - the quota is checked where the count grows."""
    dom0 = store.connect(0)
    assert refused(store, dom0, T.RM, b"/\0") == b"EINVAL\0"
    accepted(store, dom0, T.WRITE, b"/p\0")
    assert accepted(store, dom0, T.SET_PERMS, b"/p\0n0\0r65535\0") == b"OK\0"
    assert accepted(store, dom0, T.GET_PERMS, b"/p\0") == b"n0\0r65535\0"
    for bad in (b"r000005", b"r65536", b"x5", b"r"):
        assert refused(store, dom0, T.SET_PERMS, b"/p\0n0\0" + bad + b"\0") == b"EINVAL\0", bad
    store.introduce_domain(5)
    guest = store.connect(5)
    home = b"/local/domain/5"
    accepted(store, dom0, T.MKDIR, home + b"\0")
    accepted(store, dom0, T.SET_PERMS, home + b"\0n5\0")
    for name in (b"a", b"b", b"c"):
        accepted(store, guest, T.WRITE, home + b"/" + name + b"\0x")
    count = store.node_count(5)
    store.quotas.nodes = 1  # now over it
    reply = store.handle(guest, T.TRANSACTION_START, 1, 0, b"\0")
    tx = int(reply[16:-1])
    assert store.handle(guest, T.WRITE, 2, tx, home + b"/a\0y")[16:] == b"OK\0"
    assert store.handle(guest, T.TRANSACTION_END, 3, tx, b"T\0")[16:] == b"OK\0"
    assert store.node_count(5) == count
    assert refused(store, guest, T.WRITE, home + b"/d\0z") == b"ENOSPC\0"  # growth: refused


def test_watch_event_paths_keep_the_form_they_were_watched_in(store: Store) -> None:
    """A guest's watch on an absolute path reports absolute paths, one on a relative
    path reports them relative to the domain's home (xen-protocols.md §4)."""
    store.introduce_domain(5)
    dom0, guest = store.connect(0), store.connect(5)
    accepted(store, dom0, T.MKDIR, b"/local/domain/5\0")
    accepted(store, dom0, T.SET_PERMS, b"/local/domain/5\0n5\0")
    accepted(store, guest, T.WATCH, b"/local/domain/5/abs\0ta\0")
    accepted(store, guest, T.WATCH, b"rel\0tr\0")
    guest.events.clear()
    accepted(store, guest, T.WRITE, b"/local/domain/5/abs\0x")
    accepted(store, guest, T.WRITE, b"/local/domain/5/rel\0x")
    got = [wire.fields(m[16:]) for m in guest.events]
    assert got == [[b"/local/domain/5/abs", b"ta"], [b"rel", b"tr"]]


def test_transaction_ids_skip_zero_when_they_wrap(store: Store) -> None:
    dom0 = store.connect(0)
    dom0.next_tx = 0xFFFFFFFF  # as after 2^32 - 1 transactions
    ids = [int(accepted(store, dom0, T.TRANSACTION_START, b"\0")[:-1]) for _ in range(2)]
    assert ids == [0xFFFFFFFF, 1]


def test_domain_1_is_an_ordinary_guest_and_check_counts_per_domain(store: Store) -> None:
    """Permission entries of a released domain 1 are stale for its successor (only dom0's
    are always honoured); the consistency check counts each domain's own watches and
    transactions."""
    dom0 = store.connect(0)
    accepted(store, dom0, T.WRITE, b"/n\0v")
    accepted(store, dom0, T.SET_PERMS, b"/n\0n0\0r1\0")
    assert store.introduce_domain(1) is True and store.introduce_domain(1) is False
    assert accepted(store, store.connect(1), T.READ, b"/n\0") == b"v"
    accepted(store, dom0, T.RELEASE, b"1\0")
    store.introduce_domain(1)
    assert refused(store, store.connect(1), T.READ, b"/n\0") == b"EACCES\0"
    store.introduce_domain(5)
    guest = store.connect(5)
    accepted(store, guest, T.WATCH, b"/local\0a\0")
    accepted(store, dom0, T.WATCH, b"/n\0b\0")
    accepted(store, dom0, T.WATCH, b"/n\0c\0")
    accepted(store, guest, T.TRANSACTION_START, b"\0")  # watches and transactions differ
    assert (store.watch_count(0), store.transaction_count(0)) == (2, 0)
    assert (store.watch_count(5), store.transaction_count(5)) == (1, 1)
    assert store.check() == []


def test_quotas_count_inside_a_transaction(store: Store) -> None:
    """Nodes and bytes a transaction creates count against the creator's quotas at once:
    the write that breaks one is refused inside the transaction (nodes: ENOSPC, memory:
    ENOMEM); a node made
    in the transaction has a decimal generation there (DIRECTORY_PART)."""
    store.introduce_domain(5)
    dom0, guest = store.connect(0), store.connect(5)
    accepted(store, dom0, T.MKDIR, b"/local/domain/5\0")
    accepted(store, dom0, T.SET_PERMS, b"/local/domain/5\0n5\0")
    home = b"/local/domain/5/"

    def in_tx(*writes: bytes) -> list[bytes]:
        tx = int(store.handle(guest, T.TRANSACTION_START, 1, 0, b"\0")[16:-1])
        out = [store.handle(guest, T.WRITE, 2, tx, w)[16:] for w in writes]
        store.handle(guest, T.TRANSACTION_END, 3, tx, b"F\0")
        return out

    store.quotas.nodes = store.node_count(5) + 1
    assert in_tx(home + b"a\0", home + b"b\0") == [b"OK\0", b"ENOSPC\0"]
    store.quotas.nodes = 1000
    entry = len("/local/domain/5/a") + 100 + 8  # path, value, one permission entry
    store.quotas.memory = store.mem(5) + 2 * entry + entry // 2
    writes = [home + name + b"\0" + b"x" * 100 for name in (b"a", b"c", b"d")]
    assert in_tx(*writes) == [b"OK\0", b"OK\0", b"ENOMEM\0"]
    tx = int(store.handle(guest, T.TRANSACTION_START, 1, 0, b"\0")[16:-1])
    store.handle(guest, T.WRITE, 2, tx, home + b"new/leaf\0")
    reply = store.handle(guest, T.DIRECTORY_PART, 3, tx, home + b"new\x000\0")[16:]
    assert reply.split(b"\0")[0].isdigit() and reply.endswith(b"leaf\0\0"), reply
    reply = store.handle(guest, T.DIRECTORY_PART, 4, tx, home + b"new/leaf\x000\0")[16:]
    assert reply[:-2].isdigit() and reply.endswith(b"\0\0"), reply

"""The block frontend's request table: the compiled one (``cython/blktable.pyx``) and its
readable twin (``xenpv.frontends.blktable``) driven through the same random operations
(builds on a small pool, staged slots, answers in any order, answers that are not the
table's: unknown ids, wrong operation echoes, unknown statuses, duplicates; timeouts'
listing and failing everything) give the same slots, data, pages, batches and ids; the
pure-Python switch picks the twin."""

from __future__ import annotations

import hashlib
import random
import struct
from typing import Any

import pytest

from xenpv.frontends import blktable, block
from xenpv.protocols.blkif import ABI, BLKIF_OP_READ, BLKIF_OP_WRITE, layouts


def compiled() -> Any:
    from xenpv.frontends import _blktable  # built by setup.py: missing is a failure

    return _blktable


class Future:
    """What a batch needs of an asyncio future."""

    def __init__(self) -> None:
        self.result: object = "unset"

    def done(self) -> bool:
        return self.result != "unset"

    def set_result(self, value: object) -> None:
        assert self.result == "unset", "a batch's future set twice"
        self.result = value


class Page:
    """A persistent pool page: one grant ref and its memory."""

    def __init__(self, ref: int) -> None:
        self.refs = (ref,)
        self.mem = memoryview(bytearray(4096))


def drive(mod: Any, seed: int, abi: ABI) -> list[Any]:
    """Random operations on ``mod``'s table; everything observable, in order."""
    rng = random.Random(seed)
    slot = layouts(abi).ring.slot_size
    nr_ents = rng.choice([4, 8, 32])
    table = mod.RequestTable(nr_ents, slot, 4 if abi is ABI.X86_32 else 8)
    pool = [Page(100 + k) for k in range(rng.choice([3, 8, 40]))]
    free = list(pool)
    disk = rng.randbytes(64 * 1024)
    trace: list[Any] = []
    ring: list[tuple[int, int, int, int]] = []  # (id, op, sector, ref) pushed, unanswered
    answered: list[bytes] = []
    batches: list[tuple[Any, Future, list[Any]]] = []
    for _step in range(60):
        action = rng.random()
        if action < 0.4:  # a batch of pieces, some the table leaves (too big, bytes read)
            write = rng.random() < 0.4
            pieces = []
            for _ in range(rng.randrange(1, 10)):
                n = rng.choice([512, 1024, 4096, 4096, 8192, 0, 700])
                offset = rng.randrange(0, 120) * 512 + rng.choice([0, 0, 0, 3])
                buf: Any = bytearray(rng.randbytes(n + 512)) if rng.random() < 0.9 \
                    else bytes(n + 512)
                start = rng.choice([0, 0, 512, 1024])
                pieces.append((offset, n, memoryview(buf), start))
            fut = Future()
            batch = mod.Batch(fut, len(pieces))
            k = rng.randrange(0, 2)
            built = table.build(pieces, k, write, free, rng.random() * 10, batch)
            batches.append((batch, fut, pieces))
            trace.append(("build", built, table.staged, table.inflight, len(free),
                          list(table.free_ids), table.generation))
        elif action < 0.5:  # one request built elsewhere
            if table.free_ids and table.staged < nr_ents:
                rid = table.next_id(table.free_ids.pop())
                table.stage(struct.pack("<BBH", 3, 0, 0)  # a flush
                            + (b"" if abi is ABI.X86_32 else bytes(4))
                            + rid.to_bytes(8, "little"))
                trace.append(("stage", rid, table.staged))
        elif action < 0.65:  # push: the ring gets the staged slots
            n = table.take_staged()
            raw = bytes(table.out[:n * slot])
            trace.append(("push", n, raw))
            io = 4 if abi is ABI.X86_32 else 8
            for j in range(n):
                s = raw[j * slot:(j + 1) * slot]
                rid, sector = struct.unpack_from("<QQ", s, io)
                ref = struct.unpack_from("<I", s, io + 16)[0]
                ring.append((rid, s[0], sector, ref))
        elif action < 0.9 and (ring or answered):  # answers, in any order, some hostile
            rng.shuffle(ring)
            count = rng.randrange(1, len(ring) + 2) if ring else 1
            rsps = bytearray()
            for _ in range(count):
                kind = rng.random()
                if ring and kind < 0.8:
                    rid, op, sector, ref = ring.pop()
                    status = rng.choice([0, 0, 0, 0, -1, -2])
                    one = struct.pack("<QBxh", rid, op, status)
                    if op == BLKIF_OP_READ and status == 0:  # the backend's read
                        page = next(p for p in pool if p.refs[0] == ref)
                        page.mem[:] = disk[sector * 512 % 60000:][:4096].ljust(4096, b"\0")
                elif answered and kind < 0.9:
                    one = rng.choice(answered)  # a duplicate
                elif kind < 0.95:
                    one = struct.pack("<QBxh", rng.randrange(1 << 20), BLKIF_OP_READ, 0)
                else:
                    rid = ring[-1][0] if ring else 5
                    one = struct.pack("<QBxh", rid, BLKIF_OP_WRITE + 1,
                                      rng.choice([0, 7]))
                answered.append(one)
                rsps += one.ljust(slot, b"\0")
            j, stops = 0, []
            while j < count:
                k = table.finish(bytes(rsps), count, j)
                stops.append(k)
                if k < count:
                    rid, op = struct.unpack_from("<QB", rsps, k * slot)
                    stops.append(table.lookup(rid))
                j = k + 1
            trace.append(("finish", count, stops, table.inflight, list(table.free_ids),
                          [p.refs[0] for p in free]))
        else:
            index = {id(b): k for k, (b, _, _) in enumerate(batches)}
            trace.append(("entries", sorted((r, d, index[id(b)])
                                            for r, d, b in table.entries())))
        trace.append([(b.remaining, b.errors, b.status, f.result) for b, f, _ in batches])
    trace.append(hashlib.sha256(b"".join(bytes(v) for _, _, ps in batches
                                         for _, _, v, _ in ps)).hexdigest())
    failed = table.fail_all()
    index = {id(b): k for k, (b, _, _) in enumerate(batches)}
    trace.append(("fail_all", sorted(index[id(b)] for b in failed), table.inflight,
                  table.staged, sorted(p.refs[0] for p in free)))
    assert sorted(p.refs[0] for p in free) == sorted(p.refs[0] for p in pool)
    return trace


@pytest.mark.parametrize("abi", [ABI.X86_64, ABI.X86_32])
def test_compiled_table_matches_the_twin(abi: ABI) -> None:
    for seed in range(30):
        assert drive(compiled(), seed, abi) == drive(blktable, seed, abi), seed


def test_split_pages_matches_the_twin() -> None:
    rng = random.Random(3)
    for _ in range(300):
        items: list[Any] = []
        for _ in range(rng.randrange(0, 5)):
            n = rng.choice([512, 4096, 4096, 8192, 0, 100, 2048])
            buf: Any = rng.choice([bytearray(n), bytes(n), memoryview(bytearray(n))])
            offset: Any = rng.choice([0, 512, 4096 * 7, -512, 100, 1 << 70, 3.0])
            items.append(rng.choice([(offset, buf), (offset, buf), [offset, buf],
                                     (offset,)]))
        write, ss = rng.random() < 0.5, rng.choice([512, 4096])
        size = rng.choice([32 * 1024, 4096])
        want = blktable.split_pages(items, write, ss, size)
        got = compiled().split_pages(items, write, ss, size)
        if want is None:
            assert got is None
        else:
            assert got is not None
            assert [(o, n, bytes(v), s) for o, n, v, s in got] == \
                [(o, n, bytes(v), s) for o, n, v, s in want]


def test_pure_python_switch_turns_the_table_to_its_twin(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XENPV_PURE_PYTHON", "1")
    assert block._compiled_tables() is None
    monkeypatch.setenv("XENPV_PURE_PYTHON", "0")
    assert block._compiled_tables() is compiled()

"""A transaction's life in both xenstore clients (``ops.TransactionLife``).

``new`` → ``open`` (TRANSACTION_START answered) → ``committed`` / ``aborted``
(TRANSACTION_END answered) or ``failed`` (sent, never answered); node operations need it
``open``, a second start is refused, and the ``with`` exit commits, or aborts quietly when
the block raised.  The asyncio and the blocking transaction run over one scripted server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from xenpv.errors import LocalError
from xenpv.xenstore import ops
from xenpv.xenstore.blocking import BlockingTransaction
from xenpv.xenstore.client import Transaction
from xenpv.xenstore.wire import XsType


class Server:
    """Answers TRANSACTION_START with id 7, every other request with OK; ``silent`` makes
    the next TRANSACTION_END go unanswered (a timeout)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, bytes]] = []
        self.silent = False

    def answer(self, type_: int, payload: bytes, tx_id: int) -> bytes:
        self.seen.append((XsType(type_).name, tx_id, payload))
        if type_ == XsType.TRANSACTION_START:
            return b"7\0"
        if type_ == XsType.TRANSACTION_END and self.silent:
            raise TimeoutError
        return b"value" if type_ == XsType.READ else b"OK\0"

    def drive(self, op: ops.Op[Any], tx_id: int) -> Any:
        try:
            type_, payload = next(op)
            while True:
                type_, payload = op.send(self.answer(type_, payload, tx_id))
        except StopIteration as stop:
            return stop.value


class BlockingClient:
    def __init__(self, server: Server) -> None:
        self._drive = server.drive


class AsyncClient:
    """What :class:`Transaction` uses of a client and its connection."""

    default_timeout = None

    def __init__(self, server: Server) -> None:
        self.server = server
        self._conn = self

    async def call(self, type_: int, payload: bytes, tx_id: int, timeout: Any) -> bytes:
        return self.server.answer(type_, payload, tx_id)

    async def _run(self, op: ops.Op[Any], timeout: Any) -> Any:
        return self.server.drive(op, 0)


def _blocking(server: Server) -> Any:
    return BlockingTransaction(BlockingClient(server))  # type: ignore[arg-type]


def _async(server: Server) -> Any:
    return Transaction(AsyncClient(server))  # type: ignore[arg-type]


def do(result: Any) -> Any:
    """One call style for both transactions: an asyncio one's coroutine is run to its end."""
    return asyncio.run(result) if asyncio.iscoroutine(result) else result


@pytest.mark.parametrize("make", [_blocking, _async], ids=["blocking", "asyncio"])
def test_a_transaction_lives_new_open_and_over(make: Any) -> None:
    server = Server()
    t = make(server)
    assert (t.tx_id, t._state) == (0, "new")
    with pytest.raises(LocalError, match="transaction is new, not open"):
        do(t.write("a", "1"))
    assert do(t.start()) is t and (t.tx_id, t._state) == (7, "open")
    with pytest.raises(LocalError, match="already started"):
        do(t.start())
    do(t.write("a", "1"))
    assert do(t.read("a")) == b"value"
    do(t.commit())
    assert t._state == "committed"
    with pytest.raises(LocalError, match="transaction is committed, not open"):
        do(t.read("a"))
    with pytest.raises(LocalError, match="not open"):
        do(t.abort())
    assert t._state == "committed"
    assert [(name, tx) for name, tx, _ in server.seen] == [
        ("TRANSACTION_START", 0), ("WRITE", 7), ("READ", 7), ("TRANSACTION_END", 7)]
    assert server.seen[-1][2] == b"T\0"

    aborted = make(server)
    do(aborted.start())
    do(aborted.abort())
    assert aborted._state == "aborted" and server.seen[-1][2] == b"F\0"

    lost = make(server)
    do(lost.start())
    server.silent = True
    with pytest.raises(TimeoutError):
        do(lost.commit())
    assert lost._state == "failed"
    with pytest.raises(LocalError, match="transaction is failed, not open"):
        do(lost.write("a", "2"))


def test_the_with_exit_commits_or_aborts_quietly() -> None:
    server = Server()
    with _blocking(server) as t:
        t.write("a", "1")
    assert t._state == "committed"
    server.silent = True  # the abort after the block's error gets no answer: not reported
    with pytest.raises(KeyError), _blocking(server) as t:
        raise KeyError("the block's own error")
    assert t._state == "failed" and server.seen[-1][2] == b"F\0"

    async def main() -> None:
        server.silent = False
        async with _async(server) as at:
            await at.write("b", "1")
        assert at._state == "committed"
        server.silent = True
        with pytest.raises(KeyError):
            async with _async(server) as at:
                raise KeyError("the block's own error")
        assert at._state == "failed" and server.seen[-1][2] == b"F\0"

    asyncio.run(main())

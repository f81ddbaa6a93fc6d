"""A hostile xenbus peer: state sequences, garbage state values and bad connect-time keys.

The xenbus layer is sans-IO (``xenpv.xenbus.machine``, ``xenpv.xenbus.keys``), so the
hostile peer talks to it directly.  :func:`drive_machine` plays a fuzz input as a list of
steps against a backend or frontend :class:`~xenpv.xenbus.machine.XenbusMachine`: peer
state values (valid states in any order, including illegal jumps and high-rate cycles;
``99``, ``-1``, ``" 4"``, 2^40, arbitrary bytes; the node vanishing) interleaved with local
events (close, forced close, errors, ``online`` flips, readiness).  After every step:

* nothing but a :class:`~xenpv.errors.PeerError` handled inside the machine may happen
  (the machine must not raise at all for peer input);
* at most ``MAX_SETTLE + 2`` actions per input (bounded work, R3/R16);
* every state the machine asks to write is a real ``XenbusState``;
* a peer error is answered with the error node and Closing, and the machine stays marked
  misbehaving (R4); a destroyed machine stays inert.

:func:`parse_keys` feeds peer-written connect-time values to every strict key parser
(scenario 18): only ``BadKeyError`` (a PeerError) may come out, and accepted values must
lie inside the documented bounds.
"""

from __future__ import annotations

from xenpv.errors import PeerError
from xenpv.fuzz import oracles
from xenpv.fuzz.hostile import InvariantViolation, violation
from xenpv.fuzz.source import ByteSource
from xenpv.xenbus import keys
from xenpv.xenbus.machine import (
    MAX_SETTLE,
    BackendMachine,
    FrontendMachine,
    FrontendStyle,
    WriteError,
    WriteState,
    XenbusMachine,
)
from xenpv.xenbus.states import XenbusState

__all__ = ["drive_machine", "parse_keys"]

_VALUES = [str(i).encode() for i in range(9)] + [b"99", b"-1", b"04", b" 4", b"4\0",
                                                   str(2**40).encode(), b"", b"Connected"]
_LOCAL = ("close", "force_close", "local_error", "offline", "online", "ready", "reconnect",
          "removed")


def _peer_value(src: ByteSource) -> bytes | None:
    kind = src.below(4)
    if kind == 0:
        return None  # the state node vanished
    if kind == 1:
        return src.take(src.below(12))
    return src.choice(_VALUES)


def _local(m: XenbusMachine, what: str) -> list[object]:
    if what == "close":
        return list(m.close())
    if what == "force_close":
        return list(m.force_close())
    if what == "local_error":
        return list(m.local_error(5, "backing store failed"))
    if what in ("offline", "online"):
        return list(m.online_changed(what == "online"))
    if what == "ready":
        return list(m.local_ready())
    if what == "reconnect":
        return list(m.reconnect())
    return list(m.removed())


def drive_machine(data: bytes) -> None:
    """Play one input against a backend or frontend machine, checking after every step."""
    src = ByteSource(data)
    m: XenbusMachine
    if src.boolean():
        m = BackendMachine()
    else:
        m = FrontendMachine(src.choice(list(FrontendStyle)))
    m.start()
    for _ in range(64):
        if src.remaining <= 0:
            break
        destroyed, errors = m.destroyed, m.peer_errors
        was_open = m.state not in (XenbusState.Closing, XenbusState.Closed, XenbusState.Unknown)
        try:
            actions: list[object]
            if src.below(4):
                actions = list(m.peer_state_raw(_peer_value(src)))
            else:
                actions = _local(m, src.choice(_LOCAL))
        except PeerError as e:
            raise violation("the xenbus machine let a PeerError escape", e) from None
        except Exception as e:
            # Local events the table has no row for are API misuse (LocalError): the fuzzer
            # chose them blindly, so they are not findings.  Anything else is.
            from xenpv.errors import LocalError

            if isinstance(e, LocalError):
                continue
            raise violation("the xenbus machine raised", e) from None
        if len(actions) > MAX_SETTLE + 2:
            raise InvariantViolation(f"{len(actions)} actions for one input (R3)")
        for a in actions:
            if isinstance(a, WriteState) and not isinstance(a.state, XenbusState):
                raise InvariantViolation(f"asked to write a non-state {a.state!r}")
        if destroyed and actions:
            raise InvariantViolation("a destroyed machine acted again")
        if m.peer_errors > errors and not m.destroyed:
            if m.state not in (XenbusState.Closing, XenbusState.Closed) or not m.misbehaving:
                raise InvariantViolation("a peer error was not answered with Closing (R4)")
            if errors == 0 and was_open and not any(isinstance(a, WriteError) for a in actions):
                raise InvariantViolation("the first peer error in an open state wrote no error node")


def parse_keys(data: bytes) -> None:
    """Feed peer-written connect-time values to every strict key parser (scenario 18).

    Only ``BadKeyError`` (a PeerError) may come out, and every accepted value must pass
    the acceptance oracle (:mod:`xenpv.fuzz.oracles`): canonical decimal text worth the
    value returned, inside the key's documented bounds.
    """
    src = ByteSource(data)
    for _ in range(16):
        if src.remaining <= 0:
            break
        raw = None if src.below(8) == 0 else src.take(src.below(24))
        which = src.below(7)
        try:
            if which == 0:
                v = keys.parse_grant_ref(raw)
                oracles.xs_canonical_uint(_present(raw, which), v, 8, 0xFFFFFFFF, what="ring-ref")
            elif which == 1:
                v = keys.parse_port(raw)
                oracles.xs_canonical_uint(_present(raw, which), v, 1, (1 << 17) - 1, what="event-channel")
            elif which == 2:
                hi = src.below(9)
                v = keys.parse_ring_page_order(raw, hi)
                if raw is None:
                    _default(which, v, 0)
                else:
                    oracles.xs_canonical_uint(raw, v, 0, hi, what="ring-page-order")
            elif which == 3:
                hi = src.below(64)
                v = keys.parse_num_queues(raw, hi)
                if raw is None:
                    _default(which, v, 1)
                else:
                    oracles.xs_canonical_uint(raw, v, 1, hi, what="multi-queue-num-queues")
            elif which == 4:
                oracles.xs_bool(raw, keys.parse_bool(raw, "feature-x"), False)
            elif which == 5:
                oracles.xs_protocol(raw, keys.parse_protocol(raw), "x86_64-abi")
            else:
                hi = src.u32()
                v = keys.parse_uint(raw, "x", 0, hi)
                oracles.xs_canonical_uint(_present(raw, which), v, 0, hi)
        except PeerError:
            continue
        except InvariantViolation:
            raise
        except Exception as e:
            raise violation("a xenbus key parser raised something other than a PeerError", e) from None


def _present(raw: bytes | None, which: int) -> bytes:
    """A required key must be present for its parser to accept it."""
    if raw is None:
        raise InvariantViolation(f"key parser {which} accepted a missing required key")
    return raw


def _default(which: int, value: int, default: int) -> None:
    if value != default:
        raise InvariantViolation(f"key parser {which} gave {value} for an absent key (default {default})")

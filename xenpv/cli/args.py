"""Argument types shared by the ``xenpv`` commands: strict numbers, never masked.

Every number a command takes goes through :func:`uint` (or one of its named forms):
plain ASCII decimal digits only (no sign, spaces, underscores or ``0x``; ``int()``
accepts several of those), checked against the range of the field it fills.  An
out-of-range value is a usage error naming the range; it is never masked or truncated
to fit the field (issue 14 item 9).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from xenpv.xenbus.keys import EVTCHN_PORT_MAX, GRANT_REF_MAX
from xenpv.xenbus.paths import DEVID_MAX, DOMID_MAX

U32_MAX = 0xFFFFFFFF
_MAX_DIGITS = 20


class CliError(Exception):
    """A command failed; ``xenpv`` prints ``xenpv COMMAND: MESSAGE`` and exits 1."""


class UsageError(CliError):
    """The command line is wrong in a way argparse cannot see; exits like a usage error."""


def parse_uint(text: str, lo: int = 0, hi: int = U32_MAX, what: str = "number") -> int:
    """``text`` as a decimal integer in ``lo..hi``; :class:`ValueError` (with a message
    naming ``what`` and the range) otherwise."""
    if not text or len(text) > _MAX_DIGITS or not all("0" <= ch <= "9" for ch in text):
        raise ValueError(f"{what} must be a decimal number in {lo}..{hi}, got {text[:32]!r}")
    value = int(text)
    if not lo <= value <= hi:
        raise ValueError(f"{what} {value} is out of range {lo}..{hi}")
    return value


def uint(lo: int = 0, hi: int = U32_MAX, what: str = "number") -> Callable[[str], int]:
    """An argparse ``type=`` for a decimal integer in ``lo..hi``."""

    def convert(text: str) -> int:
        try:
            return parse_uint(text, lo, hi, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = what  # argparse names the type in some messages
    return convert


domid = uint(0, DOMID_MAX, "domid")
"""An ordinary domain id (0..0x7FEF)."""

guest_domid = uint(1, DOMID_MAX, "domid")
"""An ordinary domain id other than dom0's."""

port = uint(1, EVTCHN_PORT_MAX, "event-channel port")
"""An event-channel port number."""

grant_ref = uint(0, GRANT_REF_MAX, "grant ref")
"""A grant reference."""

devid = uint(0, DEVID_MAX, "device id")
"""A xenbus device id."""


def size(lo: int = 0, hi: int = 1 << 40, what: str = "size") -> Callable[[str], int]:
    """A byte count or table size in ``lo..hi``."""
    return uint(lo, hi, what)


def positive_float(text: str) -> float:
    """A finite number of seconds ≥ 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < 1e9:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds ≥ 0")
    return value

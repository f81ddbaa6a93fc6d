"""``xenpv xenstore read|write|ls|list|rm|exists|chmod|watch`` — xenstore-utils work-alikes.

Output and exit status follow Xen 4.17's ``xenstore-*`` tools, so scripts can switch
between them:

* values are printed *sanitised*: printable ASCII as is, ``\\t \\n \\r \\\\`` escaped,
  bytes below 8 as three octal digits (``\\000``), other bytes as ``\\xNN``; ``write``
  undoes that escaping.  ``-R`` reads and writes raw bytes instead;
* ``read``/``list`` buffer their output and print it at the end (also what was read
  before a failing key); ``-p`` prefixes each value with its path;
* ``read`` of several keys, ``write`` of several pairs, and every ``rm``, ``exists``,
  ``list`` and ``chmod`` run in one transaction that is retried on ``EAGAIN``;
* ``ls`` prints an indented tree (``name = "value"``), truncated to the terminal width
  (80 columns when stdout is not a terminal); ``-p`` adds permissions, ``-f`` full paths;
* ``exists`` prints nothing and exits 1 if a key is missing;
* failures exit 1 with a message on stderr; usage errors exit 1 too;
* ``chmod`` takes a domid of plain decimal digits up to 65535 and refuses anything
  else with ``Invalid argument`` (where xenstore-chmod's ``atoi`` turns ``nabc`` into
  ``n0`` and ``n4294967297`` into ``n1``); nothing is masked to fit.

The server is found as libxenstore finds it (``$XENSTORED_PATH``,
``$XENSTORED_RUNDIR/socket``, ``/dev/xen/xenbus``) unless ``--socket PATH`` names one.
``-s`` is accepted for compatibility and, as in 4.17, changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import os
import struct
import sys
import termios
from collections.abc import Awaitable, Callable
from typing import BinaryIO, TypeVar

from xenpv.errors import LocalError
from xenpv.xenstore.client import (
    Perm,
    Transaction,
    Watch,
    XenstoreClient,
    XenstoreConnectionError,
)
from xenpv.xenstore.client import connect as xs_connect
from xenpv.xenstore.wire import WireError, XenstoreError

T = TypeVar("T")

USAGE_STATUS = 1  # xenstore-utils exit 1 on a usage error
MODES = ("read", "write", "ls", "list", "rm", "exists", "chmod", "watch")

# " = \"...\"": the room xenstore-ls keeps for a value marker on every line.
_TAG_LEN = 8
_DESIRED_WIDTH = 60


class _Failed(Exception):
    """A CLI step failed; the message (if any) is already printed."""


def sanitise(value: bytes) -> str:
    """Return ``value`` escaped the way xenstore-read prints it."""
    out = []
    for c in value:
        if 0x20 <= c <= 0x7E and c != 0x5C:
            out.append(chr(c))
        elif c == 0x09:
            out.append("\\t")
        elif c == 0x0A:
            out.append("\\n")
        elif c == 0x0D:
            out.append("\\r")
        elif c == 0x5C:
            out.append("\\\\")
        elif c < 8:
            out.append(f"\\{c:03o}")
        else:
            out.append(f"\\x{c:02x}")
    return "".join(out)


_HEX = b"0123456789abcdefABCDEF"
_OCT = b"01234567"


def _take_digits(data: bytes, pos: int, allowed: bytes, limit: int) -> int:
    end = pos
    while end < len(data) and end - pos < limit and data[end] in allowed:
        end += 1
    return end


def unsanitise(text: bytes) -> bytes:
    """Undo :func:`sanitise` (xenstore-write's escape syntax); stops at a NUL."""
    out = bytearray()
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        i += 1
        if c == 0:
            break
        if c != 0x5C:
            out.append(c)
            continue
        if i >= n:  # a lone trailing backslash becomes a NUL byte (as in xenstore-write)
            out.append(0)
            break
        e = text[i]
        i += 1
        simple = {0x74: 0x09, 0x6E: 0x0A, 0x72: 0x0D, 0x5C: 0x5C}
        if e in simple:
            out.append(simple[e])
        elif e == 0x78:  # \xNN: up to two hex digits; none → a plain 'x'
            end = _take_digits(text, i, _HEX, 2)
            out.append(int(text[i:end], 16) & 0xFF if end > i else e)
            i = end
        elif e in _OCT:  # \ooo: up to three octal digits
            end = _take_digits(text, i - 1, _OCT, 3)
            out.append(int(text[i - 1 : end], 8) & 0xFF)
            i = end
        else:
            out.append(e)
    return bytes(out)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the mode subcommands."""
    sub = parser.add_subparsers(dest="mode", metavar="MODE", help="the xenstore-MODE tool to act as")
    sub.required = True

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("-s", action="store_true", help="accepted for compatibility (no effect)")
        p.add_argument("--socket", metavar="PATH", help="xenstore socket or device to use")
        return p

    p = add("read", "print the values of keys")
    p.add_argument("-p", "--prefix", action="store_true", help="prefix values with their path")
    p.add_argument("-R", "--raw", action="store_true", help="print raw bytes, no newline")
    p.add_argument("keys", nargs="*", metavar="key", help="the keys to read")
    p = add("write", "write key value pairs")
    p.add_argument("-R", "--raw", action="store_true", help="do not unescape values")
    p.add_argument("keys", nargs="*", metavar="key value", help="pairs of key and value")
    p = add("ls", "print a subtree")
    p.add_argument("-p", "--prefix", action="store_true", help="show permissions")
    p.add_argument("-f", "--flat", action="store_true", help="show full paths")
    p.add_argument("keys", nargs="*", metavar="path", help="the subtree to print (default /)")
    p = add("list", "list the children of keys")
    p.add_argument("-p", "--prefix", action="store_true", help="prefix names with the key")
    p.add_argument("keys", nargs="*", metavar="key", help="the keys to list")
    p = add("rm", "remove keys and their subtrees")
    p.add_argument("-t", "--tidy", action="store_true", help="also remove empty parents")
    p.add_argument("keys", nargs="*", metavar="key", help="the keys to remove")
    p = add("exists", "exit 0 if every key exists, else 1")
    p.add_argument("-p", "--prefix", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("keys", nargs="*", metavar="key", help="the keys to look for")
    p = add("chmod", "set permissions: key perm [perm…] (perm = n|r|w|b + domid)")
    p.add_argument("-u", "--upto", action="store_true", help="also set on every parent")
    p.add_argument("-r", "--recurse", action="store_true", help="also set on every child")
    p.add_argument("keys", nargs="*", metavar="key perm",
                   help="the key, then its permissions (owner first)")
    p = add("watch", "print the path of every watch event")
    p.add_argument("-n", "--number", type=int, default=-1, metavar="NR",
                   help="exit after NR events")
    p.add_argument("keys", nargs="*", metavar="key", help="the keys to watch")


def _usage(mode: str) -> str:
    forms = {
        "read": "[-h] [-p] [-s] [-R] key [...]",
        "write": "[-h] [-s] [-R] key value [...]",
        "ls": "[-h] [-f] [-p] [-s] [path]",
        "list": "[-h] [-p] [-s] key [...]",
        "rm": "[-h] [-s] [-t] key [...]",
        "exists": "[-h] [-p] [-s] key [...]",
        "chmod": "[-h] [-u] [-r] [-s] key <mode [modes...]>",
        "watch": "[-h] [-n NR] key",
    }
    return f"Usage: xenpv xenstore {mode} {forms[mode]}"


class _Cli:
    """State of one CLI run: where output goes and how errors are reported."""

    def __init__(self, args: argparse.Namespace, out: BinaryIO) -> None:
        self.args = args
        self.mode: str = args.mode
        self.out = out
        self.buffer = bytearray()

    def warn(self, text: str) -> None:
        """Print ``text`` on stderr with the command prefix (like warnx)."""
        print(f"xenpv xenstore {self.mode}: {text}", file=sys.stderr)

    def emit(self, text: str | bytes) -> None:
        """Write straight to stdout."""
        self.out.write(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)

    # -- modes run inside a (possibly retried) transaction -------------------------------

    async def do_read(self, ops: XenstoreClient | Transaction) -> int:
        for key in self.args.keys:
            value = await _maybe(ops.read(key))
            if value is None:
                self.warn(f"couldn't read path {key}")
                return 1
            if self.args.prefix:
                self.buffer += f"{key}: ".encode("utf-8", "surrogateescape")
            if self.args.raw:
                self.buffer += value
            else:
                self.buffer += sanitise(value).encode() + b"\n"
        return 0

    async def do_write(self, ops: XenstoreClient | Transaction) -> int:
        keys = self.args.keys
        for key, spec in zip(keys[::2], keys[1::2], strict=True):
            raw = os.fsencode(spec)
            value = raw if self.args.raw else unsanitise(raw)
            if not await _ok(ops.write(key, value)):
                self.warn(f"could not write path {key}")
                return 1
        return 0

    async def do_rm(self, ops: XenstoreClient | Transaction) -> int:
        for key in self.args.keys:
            path = key
            while True:
                if not await _ok(ops.rm(path)):
                    self.warn(f"could not remove path {path}")
                    return 1
                if not self.args.tidy or "/" not in path:
                    break
                # -t: climb while the parent has an empty value and no children left
                path = path.rpartition("/")[0]
                value = await _maybe(ops.read(path))
                if value != b"":
                    break
                children = await _maybe(ops.directory(path))
                if children is None or children:
                    break
        return 0

    async def do_exists(self, ops: XenstoreClient | Transaction) -> int:
        for key in self.args.keys:
            if await _maybe(ops.read(key)) is None:
                return 1
        return 0

    async def do_list(self, ops: XenstoreClient | Transaction) -> int:
        for key in self.args.keys:
            names = await _maybe(ops.directory(key))
            if names is None:
                self.warn(f"could not list path {key}")
                return 1
            for name in names:
                # 4.17 prints "<key>/<name>" even for the root ("//tool"); so do we
                line = f"{key}/{name}\n" if self.args.prefix else f"{name}\n"
                self.buffer += line.encode("utf-8", "surrogateescape")
        return 0

    async def do_chmod(self, ops: XenstoreClient | Transaction) -> int:
        key, *specs = self.args.keys
        perms = []
        for spec in specs:
            letter = spec[:1]
            if letter not in ("n", "r", "w", "b"):
                self.warn(f"Invalid permission specification: '{letter}'")
                raise _Failed
            digits = spec[1:]
            # the wire carries the domid as text and the server refuses one above 65535
            # with EINVAL; refuse it (and anything but plain digits) the same way, never
            # masked to 16 bits
            if not digits.isascii() or not digits.isdigit() or int(digits) > 0xFFFF:
                self.warn(f"Error occurred setting permissions on '{key}': "
                          f"{os.strerror(errno.EINVAL)} (domid {digits!r} in {spec!r})")
                raise _Failed
            perms.append(Perm(letter, int(digits)))
        await self._chmod(ops, key, perms, self.args.upto, self.args.recurse)
        return 0

    async def _chmod(
        self,
        ops: XenstoreClient | Transaction,
        path: str,
        perms: list[Perm],
        upto: bool,
        recurse: bool,
    ) -> None:
        if not path:
            return
        try:
            await ops.set_perms(path, perms)
        except (XenstoreError, LocalError) as exc:
            self.warn(f"Error occurred setting permissions on '{path}': {_describe(exc)}")
            raise _Failed from None
        if upto:
            if "/" not in path:
                self.warn(f"Unable to locate path separator '/' in '{path}'")
                raise _Failed
            await self._chmod(ops, path.rpartition("/")[0], perms, True, False)
        if recurse:
            for name in await _maybe(ops.directory(path)) or []:
                await self._chmod(ops, f"{path}/{name}", perms, False, True)

    # -- modes without a transaction ----------------------------------------------------

    async def do_ls(self, client: XenstoreClient) -> int:
        path = self.args.keys[0] if self.args.keys else "/"
        max_width = 80
        desired = _DESIRED_WIDTH
        if self.args.flat:
            max_width, desired = 2**30, 0
        else:
            cols = _terminal_columns(self.out)
            if cols is not None:
                max_width = cols - 2
        await self._ls(client, path, 0, max_width, desired)
        return 0

    async def _ls(
        self, client: XenstoreClient, path: str, depth: int, max_width: int, desired: int
    ) -> None:
        try:
            names = await client.directory(path)
        except (XenstoreError, LocalError) as exc:
            if depth and isinstance(exc, XenstoreError) and exc.errno_name == "ENOENT":
                return  # a node vanished while we walked: move on
            self.warn(f"xs_directory ({path}): {_describe(exc)}")
            raise _Failed from None
        show_perms = self.args.prefix
        for name in names:
            full = f"{path}{'' if path.endswith('/') else '/'}{name}"
            line = ""
            width = 0
            if self.args.flat:
                line = full
            else:
                line = " " * depth + _clip(name, max_width - _TAG_LEN - depth)
                width = len(line)
            value = await _maybe(client.read(full))
            if value is None:
                line += ":\n"
            else:
                shown = sanitise(value)
                if max_width < width + len(value) + _TAG_LEN:
                    line += f' = "{_clip(shown, max_width - _TAG_LEN - width)}\\..."'
                else:
                    text = f' = "{shown}"'
                    line += text
                    width += len(text)
                    if show_perms:
                        line += " "
                        width += 1
                        while width < min(desired, max_width):
                            line += "." if width & 1 else " "
                            width += 1
            if show_perms:
                perms = await _maybe(client.get_perms(full))
                if perms is None:
                    self.emit(line)
                    self.out.flush()
                    self.warn(f"\ncould not access permissions for {name}")
                    line = ""
                else:
                    line += "  (" + ",".join(str(p) for p in perms) + ")"
            self.emit(line + "\n")
            await self._ls(client, full, depth + 1, max_width, desired)

    async def do_watch(self, client: XenstoreClient) -> int:
        async with contextlib.AsyncExitStack() as stack:
            watches: list[Watch] = []
            for key in self.args.keys:
                try:
                    w = client.watch(key, key)
                    await stack.enter_async_context(w)
                except (XenstoreError, LocalError):
                    self.warn(f"Unable to add watch on {key}")
                    raise _Failed from None
                watches.append(w)
            queue: asyncio.Queue[str] = asyncio.Queue()

            async def pump(w: Watch) -> None:
                async for event_path, _token in w:
                    await queue.put(event_path)

            tasks = [asyncio.ensure_future(pump(w)) for w in watches]
            try:
                count = 0
                while self.args.number < 0 or count < self.args.number:
                    getter = asyncio.ensure_future(queue.get())
                    done, _ = await asyncio.wait(
                        [getter, *tasks], return_when=asyncio.FIRST_COMPLETED
                    )
                    if getter not in done:
                        getter.cancel()
                        for t in done:
                            t.result()  # re-raise the connection failure
                        continue
                    self.emit(getter.result() + "\n")
                    self.out.flush()
                    count += 1
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return 0


def _clip(text: str, precision: int) -> str:
    """printf ``%.*s``: a negative precision means no limit."""
    return text if precision < 0 else text[:precision]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, XenstoreError):
        return os.strerror(exc.errno)
    return str(exc)


def _terminal_columns(out: BinaryIO) -> int | None:
    try:
        packed = fcntl.ioctl(out.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
    except (OSError, ValueError, AttributeError):
        return None
    return int(struct.unpack("HHHH", packed)[1])


async def _maybe(aw: Awaitable[T]) -> T | None:
    """Await ``aw``; a server error or a locally invalid path gives None (like a NULL)."""
    try:
        return await aw
    except (XenstoreError, LocalError):
        return None


async def _ok(aw: Awaitable[None]) -> bool:
    """Await ``aw``; return False on a server error or a locally invalid path."""
    try:
        await aw
    except (XenstoreError, LocalError):
        return False
    return True


async def _run(args: argparse.Namespace, cli: _Cli) -> int:
    try:
        client = await xs_connect(args.socket)
    except XenstoreConnectionError as exc:
        cli.warn(f"xs_open: {exc}")
        return 1
    try:
        if cli.mode == "ls":
            return await cli.do_ls(client)
        if cli.mode == "watch":
            return await cli.do_watch(client)
        body: Callable[[XenstoreClient | Transaction], Awaitable[int]] = getattr(
            cli, f"do_{cli.mode}"
        )
        n = len(args.keys)
        use_tx = {"read": n > 1, "write": n > 2}.get(cli.mode, True)
        if not use_tx:
            return await body(client)
        return await _in_transaction(client, cli, body)
    except _Failed:
        return 1
    except (XenstoreConnectionError, WireError) as exc:
        cli.warn(str(exc))
        return 1
    finally:
        await client.close()


async def _in_transaction(
    client: XenstoreClient,
    cli: _Cli,
    body: Callable[[XenstoreClient | Transaction], Awaitable[int]],
) -> int:
    """Run ``body`` in a transaction: commit if it returned 0, else abort; retry EAGAIN."""
    while True:
        cli.buffer.clear()
        try:
            t = await client.transaction().start()
        except XenstoreError:
            cli.warn("couldn't start transaction")
            return 1
        try:
            ret = await body(t)
        except _Failed:
            with contextlib.suppress(XenstoreError):
                await t.abort()
            raise
        try:
            await t.end(commit=ret == 0)
        except XenstoreError as exc:
            if ret == 0 and exc.errno_name == "EAGAIN":
                continue
            cli.warn("couldn't end transaction")
            cli.buffer.clear()  # xenstore-utils exit here without printing anything
            return 1
        return ret


def run(args: argparse.Namespace) -> int:
    """Run one xenstore-utils style mode; returns its exit status."""
    mode = args.mode
    n = len(args.keys)
    bad = (
        (n == 0 and mode != "ls")
        or (mode == "write" and n % 2 == 1)
        or (mode == "watch" and n == 0)
        or (mode == "exists" and args.prefix)  # 4.17 parses -p, then refuses it here
    )
    if bad:
        print(f"xenpv xenstore {mode}: {_usage(mode)}", file=sys.stderr)
        return 1
    out = sys.stdout.buffer
    cli = _Cli(args, out)
    ret = asyncio.run(_run(args, cli))
    if cli.buffer:
        out.write(cli.buffer)
    out.flush()
    return ret

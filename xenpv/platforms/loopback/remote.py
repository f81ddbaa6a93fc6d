"""A platform living in another process, driven by calls from this one (tests, benchmarks).

Theory of operation
-------------------
``RemotePlatform.spawn(...)`` starts ``python -m xenpv.platforms.loopback.remote`` with
the environment of one emulated domain and talks to it over a socketpair with
:mod:`multiprocessing.connection` framing.  The child builds a platform with a factory
(``module:callable`` taking ``(rundir, domid)``; by default the cross-process loopback
client) and executes calls on it: ``("call", target, method, args, kwargs)``.

Results that are page runs (anything with a ``mem`` attribute) stay in the child and come
back as :class:`RemotePages` proxies whose ``mem`` supports slice reads and writes, so
platform-suite tests can be written once against the interfaces and run with each domain
in its own process.  Exceptions come back as the same classes with the same ``errno``
and attributes (``MapError.index``/``status``, ``GrantInUse.refs``).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

from xenpv.errors import LocalError, PlatformError

DEFAULT_FACTORY = "xenpv.platforms.loopback.client:ClientPlatform.for_domain"
_ATTRS = ("errno", "index", "status", "refs")


def _load(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _encode_exc(exc: BaseException) -> tuple[Any, ...]:
    cls = type(exc)
    attrs = {a: getattr(exc, a) for a in _ATTRS if hasattr(exc, a)}
    return ("exc", cls.__module__, cls.__qualname__, str(exc), attrs)


def _decode_exc(module: str, qualname: str, message: str, attrs: dict[str, Any]) -> BaseException:
    try:
        cls: Any = _load(f"{module}:{qualname}")
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(qualname)
    except Exception:
        cls = PlatformError
    if issubclass(cls, PlatformError):
        exc = cls.__new__(cls)
        Exception.__init__(exc, message)
        exc.errno = None
    else:
        exc = cls(message)
    for key, value in attrs.items():
        setattr(exc, key, value)
    return exc


def serve(conn: Connection, factory: str, rundir: str, domid: int) -> None:
    """Child side: build the platform and execute calls until EOF."""
    make = _load(factory)
    platform: Any = make(rundir, domid)
    objs: dict[int, Any] = {}

    def resolve(value: Any) -> Any:
        if isinstance(value, tuple) and len(value) == 2 and value[0] == "__ref__":
            return objs[value[1]]
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        try:
            kind = msg[0]
            if platform is None and kind in ("call", "ping"):
                platform = make(rundir, domid)
            if kind == "call":
                _, target, method, args, kwargs = msg
                obj = (
                    platform
                    if target is None
                    else (objs[target] if isinstance(target, int) else getattr(platform, target))
                )
                result = getattr(obj, method)(*[resolve(a) for a in args], **kwargs)
                if hasattr(result, "mem") and hasattr(result, "refs"):
                    objs[id(result)] = result
                    reply: tuple[Any, ...] = (
                        "obj",
                        id(result),
                        {
                            "refs": tuple(result.refs),
                            "domid": result.domid,
                            "writable": result.writable,
                            "nbytes": len(result.mem),
                        },
                    )
                else:
                    reply = ("val", result)
            elif kind == "get":
                _, oid, key = msg
                reply = (
                    "val",
                    bytes(objs[oid].mem[key]) if isinstance(key, slice) else objs[oid].mem[key],
                )
            elif kind == "set":
                _, oid, key, value = msg
                objs[oid].mem[key] = value
                reply = ("val", None)
            elif kind == "ping":
                reply = ("val", platform.domid)
            elif kind == "forget":
                objs.pop(msg[1], None)
                reply = ("val", None)
            elif kind == "reopen":
                # close now (releasing everything); the next call opens a fresh platform
                if platform is not None:
                    platform.close()
                objs.clear()
                platform = None
                reply = ("val", None)
            else:
                raise LocalError(f"unknown remote request {kind!r}")
        except Exception as exc:  # every error goes back to the caller
            reply = _encode_exc(exc)
            if not isinstance(exc, (PlatformError, LocalError, TypeError, ValueError, KeyError)):
                traceback.print_exc()
        conn.send(reply)
    if platform is not None:
        platform.close()


class RemoteMem:
    """``mem`` of a page run in another process: slice reads/writes, ``len``."""

    def __init__(self, owner: RemotePlatform, oid: int, nbytes: int) -> None:
        self._owner = owner
        self._oid = oid
        self._nbytes = nbytes

    def __len__(self) -> int:
        return self._nbytes

    def __getitem__(self, key: int | slice) -> Any:
        return self._owner._request(("get", self._oid, key))

    def __setitem__(self, key: int | slice, value: Any) -> None:
        if isinstance(value, memoryview):
            value = bytes(value)
        self._owner._request(("set", self._oid, key, value))


class RemotePages:
    """Proxy of a :class:`SharedPages`/:class:`MappedGrants` living in another process."""

    def __init__(self, owner: RemotePlatform, oid: int, info: dict[str, Any]) -> None:
        self.oid = oid
        self.refs: tuple[int, ...] = tuple(info["refs"])
        self.domid: int = info["domid"]
        self.writable: bool = info["writable"]
        self.mem = RemoteMem(owner, oid, info["nbytes"])

    @property
    def nbytes(self) -> int:
        """Length in bytes."""
        return len(self.mem)


class _RemoteNamespace:
    """``platform.grants`` / ``platform.events`` of a remote platform."""

    def __init__(self, owner: RemotePlatform, name: str) -> None:
        self._owner = owner
        self._name = name

    def __getattr__(self, method: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            return self._owner.call(self._name, method, *args, **kwargs)

        return call

    async def wait(self, timeout: float | None = None) -> int:
        """asyncio wait for a pending port of the remote handle."""
        port = await asyncio.to_thread(self._owner.call, self._name, "pending", timeout)
        if port is None:
            raise TimeoutError("no event")
        return int(port)


class RemotePlatform:
    """A platform of domain ``domid`` running in a child process."""

    def __init__(self, proc: subprocess.Popen[bytes], conn: Connection, domid: int) -> None:
        self.proc = proc
        self._conn = conn
        self._domid = domid
        self.grants: Any = _RemoteNamespace(self, "grants")
        self.events: Any = _RemoteNamespace(self, "events")
        self.xenstore_path: str | None = None

    @property
    def domid(self) -> int:
        """The domain the child acts as."""
        return self._domid

    @classmethod
    def spawn(
        cls,
        rundir: str | os.PathLike[str],
        domid: int,
        *,
        factory: str = DEFAULT_FACTORY,
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> RemotePlatform:
        """Start the child acting as ``domid`` and wait until its platform is open."""
        parent, child = socket.socketpair()
        cmd = [
            sys.executable,
            "-m",
            "xenpv.platforms.loopback.remote",
            str(child.fileno()),
            factory,
            str(rundir),
            str(domid),
        ]
        full_env = dict(os.environ)
        full_env.update(env or {})
        proc = subprocess.Popen(cmd, pass_fds=[child.fileno()], env=full_env)  # exits on EOF
        child.close()
        conn = Connection(parent.detach())
        self = cls(proc, conn, domid)
        try:
            self._request(("ping",), timeout=timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _request(self, msg: tuple[Any, ...], timeout: float = 30.0) -> Any:
        try:
            self._conn.send(msg)
            if not self._conn.poll(timeout):
                raise PlatformError(f"remote dom{self._domid} did not answer", 110)
            reply = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise PlatformError(f"remote dom{self._domid} is gone: {exc}", 107) from exc
        if reply[0] == "exc":
            raise _decode_exc(*reply[1:])
        if reply[0] == "obj":
            return RemotePages(self, reply[1], reply[2])
        return reply[1]

    def call(self, target: str | None, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``platform.<target>.<method>(*args, **kwargs)`` in the child."""
        wire_args = [("__ref__", a.oid) if isinstance(a, RemotePages) else a for a in args]
        return self._request(("call", target, method, tuple(wire_args), kwargs))

    def reopen(self) -> None:
        """Close the child's platform (releasing everything); the next call reopens it."""
        self._request(("reopen",))

    def close(self, timeout: float = 10.0) -> None:
        """Let the child close its platform and exit."""
        if self.proc.poll() is None:
            self._conn.close()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        else:
            self._conn.close()

    def kill(self) -> None:
        """Kill the child outright (SIGKILL): the emulator sees a dead domain process."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if not self._conn.closed:
            self._conn.close()


def main(argv: list[str] | None = None) -> int:
    """Child entry point: ``remote.py FD FACTORY RUNDIR DOMID``."""
    args = sys.argv[1:] if argv is None else argv
    fd, factory, rundir, domid = int(args[0]), args[1], args[2], int(args[3])
    serve(Connection(fd), factory, rundir, domid)
    return 0


if __name__ == "__main__":
    sys.exit(main())

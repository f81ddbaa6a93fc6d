"""A tiny xenstore server with a planted bug, used as an external fuzz victim.

``python fragile_xenstored.py DOM0_SOCKET GUEST_SOCKET``: dom0's socket answers WRITE and
READ from a dict; the guest's socket answers everything with EACCES, except that a
message of the removed type 20 (RESTRICT) makes the whole server exit: the crash the
``xenstore:process`` target must find.
"""

from __future__ import annotations

import os
import socketserver
import struct
import sys
import threading

HEADER = struct.Struct("<IIII")
STORE: dict[bytes, bytes] = {}


def _reply(sock: socketserver.BaseRequestHandler, type_: int, rid: int, tx: int, payload: bytes) -> None:
    sock.request.sendall(HEADER.pack(type_, rid, tx, len(payload)) + payload)


def _read_exact(handler: socketserver.BaseRequestHandler, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = handler.request.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class Handler(socketserver.BaseRequestHandler):
    privileged = False

    def handle(self) -> None:
        while True:
            head = _read_exact(self, 16)
            if head is None:
                return
            type_, rid, tx, length = HEADER.unpack(head)
            if length > 4096:
                return  # drop the connection
            payload = _read_exact(self, length)
            if payload is None:
                return
            if not self.privileged:
                if type_ == 20:
                    os._exit(3)  # the planted bug
                _reply(self, 16, rid, tx, b"EACCES\0")
            elif type_ == 11:
                path, _, value = payload.partition(b"\0")
                STORE[path] = value
                _reply(self, 11, rid, tx, b"OK\0")
            elif type_ == 2:
                path = payload.rstrip(b"\0")
                if path in STORE:
                    _reply(self, 2, rid, tx, STORE[path])
                else:
                    _reply(self, 16, rid, tx, b"ENOENT\0")
            else:
                _reply(self, 16, rid, tx, b"EINVAL\0")


class Dom0Handler(Handler):
    privileged = True


def main() -> None:
    dom0, guest = sys.argv[1], sys.argv[2]
    servers = [socketserver.ThreadingUnixStreamServer(dom0, Dom0Handler),
               socketserver.ThreadingUnixStreamServer(guest, Handler)]
    for s in servers:
        s.daemon_threads = True
        threading.Thread(target=s.serve_forever, daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    main()

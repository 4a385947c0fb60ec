"""Pipelined ``GET`` and ``SET`` on one pooled connection, payloads moving straight between the caller's
buffers and the socket (one Redis server, RESP2 or 3).

Through redis-py and hiredis a value read is copied three times in user space: from the socket buffer into
the parser, into a new ``bytes`` object, and from there into the caller's buffer; a value written from two
pieces (chunk header and payload) has to be joined first. On a 2-core host that shares its CPUs with the
server, those copies are what a small-value get spends its time on. Here ``GET`` replies are parsed by
hand and each value is received with ``recv_into``: its first ``head_bytes`` into a small buffer and the
rest directly into the destination, so the kernel's copy is the only one; ``SET`` commands are framed by
hand around the caller's buffers. The connection comes from (and goes back to) redis-py's pool, which has
already done the handshake (password, ACL user, TLS).

A pipeline goes out in one ``sendmsg`` (scatter-gather) instead of one ``sendall`` per piece: with
TCP_NODELAY every piece is its own segment and wakes the server, which on 2 shared cores cost 3x the
round-trip time of 16 small SETs (measured 505 -> 163 us). A TLS socket has no ``sendmsg``: there the small
pieces are joined and each payload is written on its own, as the TLS record layer copies anyway.
"""

from __future__ import annotations

import functools
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

_SCRATCH_BYTES = 16 << 10  # framing is read through this; at most this much of a value is copied out of it
_IOV_MAX = 1024            # buffers per sendmsg (Linux IOV_MAX)


@dataclass(frozen=True)
class Landed:
    """A value split on arrival: its first bytes here, the next ``nbytes`` in the destination buffer."""

    head: bytes
    nbytes: int


Reply = Landed | bytes | None  # bytes: a value too short or too long to split, whole; None: no such key


class _Stream:
    """Buffered reads of RESP lines, with bulk payloads received in place."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray(_SCRATCH_BYTES)
        self._start = self._end = 0

    def _recv_into(self, dest: memoryview) -> int:
        n = self._sock.recv_into(dest)
        if n == 0:
            raise redis.ConnectionError("the server closed the connection")
        return n

    def line(self) -> bytes:
        while (at := self._buf.find(b"\r\n", self._start, self._end)) < 0:
            if self._end == len(self._buf):  # no room left: move the partial line to the front
                if self._start == 0:
                    raise redis.InvalidResponse("RESP line longer than the scratch buffer")
                pending = self._end - self._start
                self._buf[:pending] = self._buf[self._start:self._end]
                self._start, self._end = 0, pending
            self._end += self._recv_into(memoryview(self._buf)[self._end:])
        out = bytes(self._buf[self._start:at])
        self._start = at + 2
        return out

    def read_into(self, dest: memoryview) -> None:
        """Fill ``dest``: first from what is buffered, the rest straight from the socket."""
        take = min(len(dest), self._end - self._start)
        dest[:take] = self._buf[self._start:self._start + take]
        self._start += take
        at = take
        while at < len(dest):
            at += self._recv_into(dest[at:])


@functools.cache
def available() -> bool:
    """Whether redis-py keeps a connection's socket where ``get_into`` reads it (``_sock``, not public API);
    where it does not, the tier keeps reading through redis-py."""
    return hasattr(redis.Connection(), "_sock")


def get_into(conn: Any, names: Sequence[str], dests: Sequence[memoryview], head_bytes: int,
             whole_up_to: int) -> list[Reply]:
    """Send ``GET name`` for every name in one write and read the replies in order.

    A value longer than ``whole_up_to`` whose bytes past ``head_bytes`` fit its destination arrives
    ``Landed``; any other value comes back whole as bytes. ``conn`` is a connected redis-py ``Connection``;
    on any exception its stream is out of step, so the caller must disconnect it. Socket errors are raised
    as ``redis.ConnectionError`` / ``redis.TimeoutError`` (the former is retryable by redis-py's ``Retry``).
    """
    try:
        sock = _connected(conn)
        send(sock, conn.pack_commands([("GET", name) for name in names]))
        stream = _Stream(sock)
        return [_reply(stream, dest, head_bytes, whole_up_to) for dest in dests]
    except TimeoutError as exc:
        raise redis.TimeoutError(f"reading GET replies: {exc}") from exc
    except OSError as exc:
        raise redis.ConnectionError(f"reading GET replies: {exc}") from exc


def _connected(conn: Any) -> socket.socket:
    """The connection's socket, (re)connecting first after a disconnect (as ``send_packed_command`` would)."""
    if conn._sock is None:
        conn.connect()
    return conn._sock


def send(sock: socket.socket, pieces: Sequence[Any]) -> None:
    """Write every piece, in order: in few ``sendmsg`` calls on a plain socket, joined small pieces and
    whole payloads through ``sendall`` on a TLS socket. Socket errors propagate (callers map them)."""
    if isinstance(sock, ssl.SSLSocket):
        small: list[Any] = []
        for piece in pieces:
            if len(piece) < _SCRATCH_BYTES:
                small.append(piece)
                continue
            if small:
                sock.sendall(b"".join(small))
                small = []
            sock.sendall(piece)
        if small:
            sock.sendall(b"".join(small))
        return
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    at = 0
    while at < len(views):
        sent = sock.sendmsg(views[at:at + _IOV_MAX])
        while at < len(views) and sent >= len(views[at]):
            sent -= len(views[at])
            at += 1
        if sent:
            views[at] = views[at][sent:]


def _reply(stream: _Stream, dest: memoryview, head_bytes: int, whole_up_to: int) -> Reply:
    line = stream.line()
    if line == b"_":  # RESP3 null (redis-py 8 speaks RESP3 where the server does)
        return None
    if line[:1] == b"-":
        raise redis.ResponseError(line[1:].decode(errors="replace"))
    if line[:1] != b"$":
        raise redis.InvalidResponse(f"unexpected reply to GET: {line[:40]!r}")
    size = int(line[1:])
    if size < 0:
        return None
    out: Reply
    if whole_up_to < size <= head_bytes + len(dest):
        head = bytearray(head_bytes)
        stream.read_into(memoryview(head))
        stream.read_into(dest[:size - head_bytes])
        out = Landed(bytes(head), size - head_bytes)
    else:
        whole = bytearray(size)
        stream.read_into(memoryview(whole))
        out = bytes(whole)
    crlf = bytearray(2)
    stream.read_into(memoryview(crlf))
    if crlf != b"\r\n":
        raise redis.InvalidResponse("a GET reply does not end in CRLF")
    return out


def set_joined(conn: Any, names: Sequence[str], values: Sequence[Sequence[Any]], ttl_s: int | None) -> list[bool]:
    """``SET name value [EX ttl_s]`` for every name in one write, each value the concatenation of its
    buffers, framed by hand so that they go to the socket as they are (no join, no copy); per name whether
    the server answered OK. Same contract for ``conn`` and errors as ``get_into``."""
    expiry = b"$2\r\nEX\r\n$%d\r\n%d\r\n" % (len(str(ttl_s)), ttl_s) if ttl_s else b""
    out: list[Any] = []
    for name, pieces in zip(names, values):
        key = name.encode()
        out += [b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (5 if ttl_s else 3, len(key), key,
                                                                   sum(len(p) for p in pieces)),
                *pieces, b"\r\n" + expiry]
    try:
        sock = _connected(conn)
        send(sock, out)
        stream = _Stream(sock)
        return [_status(stream.line()) for _ in names]
    except TimeoutError as exc:
        raise redis.TimeoutError(f"reading SET replies: {exc}") from exc
    except OSError as exc:
        raise redis.ConnectionError(f"reading SET replies: {exc}") from exc


def _status(line: bytes) -> bool:
    """True for OK; False for an error reply (that value was not stored); anything else breaks the stream."""
    if line[:1] not in (b"+", b"-"):
        raise redis.InvalidResponse(f"unexpected reply to SET: {line[:40]!r}")
    return line == b"+OK"

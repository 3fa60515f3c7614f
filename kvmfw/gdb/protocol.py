"""The GDB remote serial protocol's framing: ``$payload#cs``, acks, escapes, Ctrl-C.

Pure functions and one incremental reader, no I/O, so every byte sequence a client can
send is testable without a socket. A packet longer than :data:`MAX_PACKET` is dropped
(answered with a NAK) rather than buffered: the client sizes nothing on the host.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

MAX_PACKET = 64 * 1024
"""Largest packet the stub accepts (``PacketSize`` in qSupported says so to GDB)."""

INTERRUPT = 0x03
_ESCAPED = frozenset(b"$#}*")


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    """Escape ``$ # } *`` (``}`` then the byte XOR 0x20), as binary replies need."""
    if not any(b in _ESCAPED for b in data):
        return data
    out = bytearray()
    for b in data:
        if b in _ESCAPED:
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Undo :func:`escape` (binary data of ``X`` and ``vFile`` packets)."""
    if 0x7D not in data:
        return data
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                break  # a dangling escape at the end: drop it
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """``$payload#cs`` with ``payload`` escaped."""
    body = escape(payload)
    return b"$" + body + b"#%02x" % checksum(body)


@dataclass(frozen=True)
class Received:
    """One thing the client sent: ``kind`` is ``packet`` (``data`` the payload),
    ``interrupt`` (Ctrl-C, 0x03), ``ack``, ``nak`` or ``bad`` (a packet with a wrong
    checksum or too long: answer with a NAK)."""

    kind: str
    data: bytes = b""


class PacketReader:
    """Incremental parser: :meth:`feed` bytes as they arrive, get :class:`Received` items.

    Garbage between packets is skipped; a packet's payload is returned still escaped
    (only binary packets unescape, and only their data part).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._in_packet = False
        self._overflow = False

    def feed(self, data: bytes) -> Iterator[Received]:
        for b in data:
            if not self._in_packet:
                if b == 0x24:  # $
                    self._in_packet = True
                    self._buf.clear()
                    self._overflow = False
                elif b == INTERRUPT:
                    yield Received("interrupt")
                elif b == 0x2B:  # +
                    yield Received("ack")
                elif b == 0x2D:  # -
                    yield Received("nak")
                continue  # anything else between packets is noise
            self._buf.append(b)
            if len(self._buf) > MAX_PACKET + 3:
                self._overflow = True
                self._buf.clear()
            n = len(self._buf)
            if n >= 3 and self._buf[-3] == 0x23:  # '#' then two checksum digits
                body = bytes(self._buf[:-3])
                cs = bytes(self._buf[-2:])
                self._in_packet = False
                self._buf.clear()
                if self._overflow or (self._buf_escape_ends(body)):
                    yield Received("bad")
                    continue
                try:
                    ok = int(cs, 16) == checksum(body)
                except ValueError:
                    ok = False
                yield Received("packet", body) if ok else Received("bad", body)

    @staticmethod
    def _buf_escape_ends(body: bytes) -> bool:
        # '#' escaped as "}\x03" never appears raw, but a body ending in an odd run of
        # '}' means the '#' we took as the end was escaped data: treat it as corrupt
        run = len(body) - len(body.rstrip(b"}"))
        return run % 2 == 1

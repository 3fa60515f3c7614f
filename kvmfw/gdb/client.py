"""A small GDB remote-protocol client: drive a stub from Python (scripts, tests) the way
GDB does, with acknowledgements on. Not a debugger: packets in, packets out."""

from __future__ import annotations

import socket
from types import TracebackType


class GdbClient:
    """One connection to a stub at ``host:port``; every wait is bounded by ``timeout``."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 60.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = b""

    def raw(self, data: bytes) -> None:
        """Send bytes as they are (a Ctrl-C is ``b"\\x03"``; a broken packet for tests)."""
        self.sock.sendall(data)

    def ack(self) -> bytes:
        """The next byte from the stub (``+`` or ``-`` after a packet we sent)."""
        while not self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the stub closed the connection")
            self._buf += chunk
        b, self._buf = self._buf[:1], self._buf[1:]
        return b

    def packet(self) -> bytes:
        """The next packet's payload (checksum verified, then acknowledged)."""
        while (b := self.ack()) != b"$":
            if b != b"+":
                raise ConnectionError(f"unexpected byte {b!r} from the stub before a packet")
        body = b""
        while (b := self.ack()) != b"#":
            body += b
        checksum = self.ack() + self.ack()
        if int(checksum, 16) != sum(body) & 0xFF:
            raise ConnectionError("the stub sent a packet with a bad checksum")
        self.raw(b"+")
        return body

    def send(self, payload: bytes) -> None:
        """Send one packet and wait for the stub's acknowledgement."""
        self.raw(b"$" + payload + b"#%02x" % (sum(payload) & 0xFF))
        if (a := self.ack()) != b"+":
            raise ConnectionError(f"the stub answered {a!r} to a well-formed packet")

    def cmd(self, payload: bytes) -> bytes:
        """Send a packet and return the reply's payload."""
        self.send(payload)
        return self.packet()

    def register(self, number: int, width: int = 8) -> int:
        """Register ``number`` of the ``g`` reply (all ``width`` bytes wide, little-endian)."""
        regs = bytes.fromhex(self.cmd(b"g").decode())
        return int.from_bytes(regs[number * width:(number + 1) * width], "little")

    def monitor(self, command: str) -> str:
        """A ``monitor`` command (``qRcmd``) and its text output."""
        return bytes.fromhex(self.cmd(b"qRcmd," + command.encode().hex().encode())
                             .decode()).decode()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> GdbClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

"""The TCP transport: one listening socket, one client at a time, one reader thread.

The reader thread parses bytes (:class:`~kvmfw.gdb.protocol.PacketReader`), acknowledges
packets (until no-ack mode), answers a bad checksum with ``-``, resends the last packet
on ``-``, and hands packets and Ctrl-C to the stub. Replies are written by whichever
thread serves the stop, under a send lock. A client that goes away is the same as a
detach; the server then waits for the next one.
"""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING, Any

from kvmfw.debug import get_logger
from kvmfw.errors import ConfigError
from kvmfw.gdb.protocol import PacketReader, frame
from kvmfw.gdb.stub import SIGTRAP, GdbStub
from kvmfw.gdb.target import Stop

if TYPE_CHECKING:
    from kvmfw.machine import Machine

log = get_logger("kvmfw.gdb")


def parse_endpoint(spec: str) -> tuple[str, int]:
    """QEMU's spellings: ``tcp::1234``, ``tcp:HOST:1234``, ``:1234``, ``1234``."""
    text = spec[4:] if spec.startswith("tcp:") else spec
    host, sep, port_s = text.rpartition(":")
    if not sep:
        host, port_s = "", text
    elif text is spec and host:  # "unix:/path", "udp:1": not a TCP endpoint
        raise ConfigError(f"--gdb {spec!r}: only TCP is supported (tcp::PORT or "
                          "tcp:HOST:PORT)")
    try:
        port = int(port_s, 10)
    except ValueError:
        raise ConfigError(f"--gdb {spec!r}: expected tcp::PORT (e.g. tcp::1234)") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--gdb {spec!r}: port {port} is not in 0-65535")
    return host or "127.0.0.1", port


class GdbServer:
    """Listens on ``host:port`` (port 0: any free port, see :attr:`port`) for GDB."""

    def __init__(self, machine: Machine, host: str = "127.0.0.1", port: int = 1234, *,
                 start: bool = True) -> None:
        self.machine = machine
        self.stub = GdbStub(machine)
        self.stub.target()  # fails now, with a clear error, if the arch has no GDB support
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise ConfigError(f"--gdb: cannot listen on {host}:{port}: {exc.strerror} "
                              "(choose another port)") from None
        self._sock.listen(1)
        self._sock.settimeout(0.2)
        self.host, self.port = self._sock.getsockname()[:2]
        self._conn: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._last_sent = b""
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="gdbstub", daemon=True)
        if start:
            self._thread.start()
        log.info("gdb: listening on %s:%d", self.host, self.port)

    # --- client -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the socket was closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            log.info("gdb: client %s:%d attached", *peer[:2])
            self._conn = conn
            self.stub.client_connected(self._send)
            try:
                self._read_loop(conn)
            except OSError as exc:
                log.info("gdb: connection error: %s", exc)
            finally:
                self._conn = None
                try:
                    conn.close()
                except OSError:
                    pass
                self.stub.client_disconnected()

    def _read_loop(self, conn: socket.socket) -> None:
        reader = PacketReader()
        while not self._closed.is_set():
            data = conn.recv(65536)
            if not data:
                return
            for item in reader.feed(data):
                if item.kind == "packet":
                    if not self.stub.no_ack:
                        self._raw(b"+")
                    self.stub.feed(item)
                elif item.kind == "bad":
                    if not self.stub.no_ack:
                        self._raw(b"-")  # the client resends
                elif item.kind == "nak":
                    if self._last_sent:
                        self._raw(self._last_sent)
                else:
                    self.stub.feed(item)

    def _raw(self, data: bytes) -> None:
        conn = self._conn
        if conn is None:
            return
        with self._send_lock:
            try:
                conn.sendall(data)
            except OSError:
                pass  # the reader sees the connection end

    def _send(self, payload: bytes) -> None:
        pkt = frame(payload)
        self._last_sent = pkt
        self._raw(pkt)

    # --- API ------------------------------------------------------------------------------

    def debug_exit(self, cpu: Any) -> None:
        """A ``KVM_EXIT_DEBUG`` (the core's exit table, on ``cpu``'s thread)."""
        self.stub.debug_exit(cpu)

    def wait(self) -> None:
        """Block until a client attaches and resumes the guest (``--gdb-wait``)."""
        log.warning("gdb: waiting for a client on %s:%d", self.host, self.port)
        cpu = self.machine.cpus[0]
        self.stub.stopped = True  # so the client's attach does not post a second stop
        if not self._thread.is_alive():
            self._thread.start()
        self.stub.stop_world(cpu, Stop("trap"), SIGTRAP, wait_for_client=True)

    def close(self, status: int | None = None) -> None:
        """Tell an attached client the guest exited with ``status`` (``W``), then close."""
        if self._closed.is_set():
            return
        if status is not None and self._conn is not None and not self.stub.killed:
            self._send(b"W%02x" % (status & 0xFF))
        self._closed.set()
        conn = self._conn
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._sock.close()
        if self._thread.is_alive():
            self._thread.join(2.0)

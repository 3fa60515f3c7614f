"""The stub: GDB's packets against a stopped machine, and stopping and resuming it.

ISA-neutral: registers, breakpoints, address translation and the meaning of a debug
exit come from the arch plugin's ``gdb_*`` hooks (:mod:`kvmfw.hookspecs`).

Stopping (all-stop mode). A stop happens on one host thread, which then serves packets
until GDB resumes the guest:

* a debug exit (breakpoint, watchpoint, single step): on the thread of the vCPU that took
  it, from the core's exit table (``KvmCPU._exit_debug``);
* Ctrl-C, or a client connecting to a running guest: an event posted to the machine's
  event queue (which kicks the vCPUs), served by the thread that services events;
* ``--gdb-wait``: on the caller's thread before the run starts.

With one host thread per vCPU (parallel mode) exits are serviced under ``machine.lock``
and events too, so the stopping thread holds the lock; every other vCPU is told to stop
through the machine's drain flag and kicked out of KVM: it then blocks on the lock
before entering KVM again. Its registers are read with vCPU ioctls, which KVM serialises
with ``KVM_RUN``. Resuming clears the flags and releases the lock.
"""

from __future__ import annotations

import binascii
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmfw.debug import get_logger
from kvmfw.errors import GuestMemoryError, KvmfwError
from kvmfw.eventq import PRIO_EXIT, Event
from kvmfw.gdb.protocol import MAX_PACKET, Received, unescape
from kvmfw.gdb.target import BreakKind, Breakpoint, GdbError, GdbTarget, GdbUnsupported, Stop
from kvmfw.hookspecs import SyncLevel

if TYPE_CHECKING:
    from kvmfw.cpu import KvmCPU
    from kvmfw.machine import Machine

log = get_logger("kvmfw.gdb")

SIGINT, SIGTRAP = 2, 5
PAGE = 4096
MAX_MEMORY_READ = (MAX_PACKET - 16) // 2
"""Largest ``m`` answer (hex doubles it); GDB splits bigger reads itself."""
MAX_QUEUED = 1024
"""Packets kept while the guest runs (GDB sends none in all-stop mode; a client that
floods is not allowed to grow host memory)."""
MAX_BREAKPOINTS = 4096
"""Inserted breakpoints kept at most (each is a host object; the client is untrusted)."""

_ERR_ARGS, _ERR_FAULT, _ERR_NOSPACE = b"E16", b"E14", b"E28"


def _hex(data: bytes) -> bytes:
    return binascii.hexlify(data)


class _Resume(Exception):
    """Raised inside packet handling to leave the stop: ``how`` is resume/detach/kill."""

    def __init__(self, how: str) -> None:
        self.how = how


class GdbStub:
    """Protocol state for one machine; transports call :meth:`feed`, the run loop calls
    :meth:`debug_exit`, the transport's reader thread :meth:`request_stop`."""

    def __init__(self, machine: Machine, send: Callable[[bytes], None] | None = None) -> None:
        self.machine = machine
        self.send: Callable[[bytes], None] = send or (lambda _p: None)
        self.inbox: queue.Queue[Received] = queue.Queue()
        self.breakpoints: dict[tuple[int, int, int], Breakpoint] = {}
        self.stepping: set[int] = set()
        self.connected = False
        self.stopped = False
        """True while a thread serves packets with the guest stopped."""
        self.killed = False
        self.no_ack = False
        self.stops = 0
        self._awaiting_stop = False
        self._stop_requested = False
        self._last_stop = b"S05"
        self._g_cpu = 0
        self._c_cpu = -1
        self._target: GdbTarget | None = None
        self._lock = threading.Lock()
        self._supported: set[str] = set()
        self._watch_values: dict[Breakpoint, bytes | None] = {}
        self._restop = False
        self._generation = 0
        self._stop_signal = SIGTRAP
        self.emulated_steps = False
        """``monitor emulate on``: single steps run on the emulated CPU (:mod:`kvmfw.emu`),
        one exact instruction each, without entering KVM (``monitor emulate off``: KVM's
        single step again)."""

    # --- helpers -------------------------------------------------------------------------

    @property
    def cpus(self) -> list[KvmCPU]:
        return self.machine.cpus

    def _cpu(self, index: int | None = None) -> KvmCPU:
        i = self._g_cpu if index is None else index
        return self.cpus[i if 0 <= i < len(self.cpus) else 0]

    def target(self) -> GdbTarget:
        if self._target is None:
            t = self.machine.hooks.call("gdb_target", cpu=self._cpu(0))
            if t is None:
                raise GdbError(f"the {self.machine.arch} plugin does not support GDB "
                               "(no gdb_target hook)")
            self._target = t
            for note in t.notes:
                log.warning("gdb: %s", note)
        return self._target

    def _thread_id(self, text: bytes) -> int | None:
        """A GDB thread id (``p1.2``, ``2``, ``-1``, ``0``) -> vCPU index, -1 all, None bad."""
        if text.startswith(b"p"):
            _, _, text = text.partition(b".")
            if not text:
                return -1
        try:
            tid = int(text, 16)
        except ValueError:
            return None
        if tid == -1:
            return -1
        if tid == 0:
            return 0
        return tid - 1 if 1 <= tid <= len(self.cpus) else None

    # --- the client ----------------------------------------------------------------------

    def client_connected(self, send: Callable[[bytes], None]) -> None:
        """A client attached (transport thread): the guest stops for it."""
        with self._lock:
            if self.stopped:
                # a stop still serving the previous client (its disconnect is queued): it
                # ends, then a new stop serves this one, unless this stop takes its packets
                self._restop = True
            else:
                while not self.inbox.empty():  # anything a previous client left
                    self.inbox.get_nowait()
            self.send = send
            self.no_ack = False
            self._awaiting_stop = False
            self._supported = set()
            self._generation += 1
            self.connected = True
        self.request_stop()

    def client_disconnected(self) -> None:
        """The client went away (transport thread): the guest resumes without its
        breakpoints (as after a detach)."""
        self.connected = False
        self.send = lambda _p: None
        self.inbox.put(Received("disconnect", b"%d" % self._generation))
        if self.breakpoints or self.stepping:
            self.request_stop()  # to clear them, on the thread that may touch the vCPUs

    def feed(self, item: Received) -> None:
        """A received item (transport thread): packets queue for the stop; Ctrl-C stops."""
        if item.kind == "interrupt":
            self.request_stop(SIGINT)
        elif item.kind == "packet":
            if self.inbox.qsize() >= MAX_QUEUED:
                log.warning("gdb: client floods packets while the guest runs: dropped")
                return
            self.inbox.put(item)

    # --- stop and resume -----------------------------------------------------------------

    def request_stop(self, signal: int = SIGTRAP) -> None:
        """Stop the running guest soon (Ctrl-C: SIGINT, a client attaching); any thread."""
        with self._lock:
            if self._stop_requested or self.stopped:
                return
            self._stop_requested = True
            self._stop_signal = signal
        eq = self.machine.eventq
        ev = Event(self._stop_event, "gdb-stop", PRIO_EXIT)
        eq.post(ev)
        self.machine.kick_all()

    def _stop_event(self) -> None:
        with self._lock:
            self._stop_requested = False
        if self.stopped or self.machine.stop_requested:
            return
        if not self.connected:
            self._forget()
            return
        self.stop_world(self._cpu(), Stop("trap"), self._stop_signal)

    def debug_exit(self, cpu: KvmCPU) -> None:
        """A ``KVM_EXIT_DEBUG`` on ``cpu`` (its thread): ask the arch why, then stop."""
        stop = self.machine.hooks.call("gdb_debug_exit", cpu=cpu) or Stop("trap")
        if stop.reason == "guest":
            return  # the guest's own breakpoint, handed back to it by the arch
        if not self.connected:
            self._forget()  # nobody listens (the client left): clear what it set, go on
            return
        watched = self._stepped_watches()
        breaks = self._stepped_breaks()
        if (watched or breaks) and stop.reason in ("step", "trap"):
            hit = self._stepped_hit(cpu, watched, breaks)
            if hit is not None:
                stop = hit
            elif cpu.id not in self.stepping:
                return  # a step the stub made to watch or break: nothing to report, go on
        self.stop_world(cpu, stop, SIGTRAP)

    def _stepped_hit(self, cpu: KvmCPU, watched: list[Breakpoint],
                     breaks: list[Breakpoint]) -> Stop | None:
        for bp in watched:
            if self._peek(bp) != self._watch_values.get(bp):
                return Stop("watch" if bp.kind == BreakKind.WRITE else "awatch", bp.address)
        if breaks:
            pc = int(cpu.get_context(SyncLevel.RUNTIME).pc)
            for bp in breaks:
                if bp.address == pc:
                    return Stop("swbreak" if bp.kind == BreakKind.SOFTWARE else "hwbreak")
        return None

    def _stepped_breaks(self) -> list[Breakpoint]:
        if not self.target().stepped_breakpoints:
            return []
        return [b for b in self.breakpoints.values()
                if b.kind in (BreakKind.SOFTWARE, BreakKind.HARDWARE)]

    def _stepped_watches(self) -> list[Breakpoint]:
        if not self.target().stepped_watchpoints:
            return []
        return [b for b in self.breakpoints.values()
                if b.kind in (BreakKind.WRITE, BreakKind.ACCESS)]

    def _peek(self, bp: Breakpoint) -> bytes | None:
        gpa = self._translate(bp.address)
        mem = self.machine.memory
        if gpa is None or not mem.contains(gpa, bp.length):
            return None
        return mem.read(gpa, bp.length)

    def _forget(self) -> None:
        self.breakpoints.clear()
        self.stepping.clear()
        self._apply_debug()

    def stop_world(self, cpu: KvmCPU, stop: Stop, signal: int, *,
                   wait_for_client: bool = False) -> None:
        """Stop every vCPU, report ``stop`` to GDB, serve packets until it resumes
        (``wait_for_client``: also wait for a client to connect first)."""
        parallel = any(c.parallel for c in self.cpus)
        me = threading.get_ident()
        if parallel:
            for c in self.cpus:
                if c.vcpu.thread_ident != me:
                    c.drain_pending = True  # park: it blocks on the lock (see module doc)
                    c.kick()
        self.stopped = True
        self.stops += 1
        self._g_cpu = self._c_cpu = cpu.id
        self._last_stop = self._stop_reply(cpu, stop, signal)
        how = "resume"
        try:
            if self._awaiting_stop:
                self._awaiting_stop = False
                self.send(self._last_stop)
            how = self._serve(wait_for_client)
        finally:
            if how in ("detach", "kill"):
                self.breakpoints.clear()
                self.stepping.clear()
            try:
                self._apply_debug()
            except KvmfwError as exc:  # leaving the stop must not kill the run
                log.warning("gdb: could not program guest debug on resume: %s", exc)
            with self._lock:
                self.stopped = False
                restop, self._restop = self._restop, False
            if parallel:
                for c in self.cpus:
                    c.drain_pending = False
        if restop and self.connected and how != "kill":
            self.request_stop()
        if how == "kill":
            self.killed = True
            self.machine.request_exit(0, "killed by GDB")
            # a kill before the run starts: the run clears stop requests, an event does not
            eq = self.machine.eventq
            eq.post(Event(lambda: self.machine.request_exit(0, "killed by GDB"),
                          "gdb-kill", PRIO_EXIT))
            self.machine.kick_all()

    def _serve(self, wait_for_client: bool) -> str:
        """Handle queued packets until one resumes the guest; returns how."""
        while True:
            if self.machine.stop_requested and not self.killed:
                return "resume"  # the run is ending (timeout, guest exit): let it
            if not self.connected and not wait_for_client and self.inbox.empty():
                return "detach"
            try:
                item = self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if item.kind == "disconnect":
                if item.data != b"%d" % self._generation:
                    continue  # a client before the current one
                if wait_for_client:  # --gdb-wait: only a client's continue starts the guest
                    self.breakpoints.clear()
                    self.stepping.clear()
                    continue
                log.info("gdb: client disconnected; guest resumes")
                return "detach"
            if item.kind != "packet":
                continue
            self._restop = False  # this stop serves the client that sent it
            try:
                reply = self.handle(item.data)
            except _Resume as r:
                return r.how
            if reply is not None:
                self.send(reply)

    def _apply_debug(self) -> None:
        bps = list(self.breakpoints.values())
        watched = self._stepped_watches()
        self._watch_values = {bp: self._peek(bp) for bp in watched}
        force = bool(watched or self._stepped_breaks())
        for c in self.cpus:
            self.machine.hooks.call("gdb_set_guest_debug", cpu=c,
                                    step=c.id in self.stepping or force, breakpoints=bps)

    def _stop_reply(self, cpu: KvmCPU, stop: Stop, signal: int) -> bytes:
        out = b"T%02xthread:%x;" % (signal, cpu.id + 1)
        if stop.reason in ("watch", "rwatch", "awatch") and stop.address is not None:
            out += b"%s:%x;" % (stop.reason.encode(), stop.address)
        elif stop.reason in ("swbreak", "hwbreak") and stop.reason in self._supported:
            out += stop.reason.encode() + b":;"
        return out

    # --- packets ---------------------------------------------------------------------------

    def handle(self, pkt: bytes) -> bytes | None:
        """One packet's answer (None: no answer). Raises :class:`_Resume` to resume."""
        try:
            return self._dispatch(pkt)
        except _Resume:
            raise
        except GdbError as exc:
            log.info("gdb: %s", exc)
            return _ERR_NOSPACE
        except (ValueError, IndexError, binascii.Error):
            return _ERR_ARGS
        except GuestMemoryError:
            return _ERR_FAULT
        except KvmfwError as exc:
            log.warning("gdb: %r failed: %s", pkt[:32], exc)
            return b"E05"

    def _dispatch(self, pkt: bytes) -> bytes | None:
        if not pkt:
            return b""
        c = pkt[:1]
        body = pkt[1:]
        if c == b"q" or c == b"Q":
            return self._query(pkt)
        if c == b"v":
            return self._v(pkt)
        if c == b"?":
            return self._last_stop
        if c == b"H":
            tid = self._thread_id(body[1:])
            if tid is None or body[:1] not in (b"g", b"c"):
                return b"E01"
            if body[:1] == b"g":
                self._g_cpu = max(tid, 0)
            else:
                self._c_cpu = tid
            return b"OK"
        if c == b"T":
            tid = self._thread_id(body)
            return b"OK" if tid is not None and tid >= 0 else b"E01"
        if c == b"g":
            return b"".join(_hex(r) for r in self._read_registers(self._cpu()))
        if c == b"G":
            return self._write_all(binascii.unhexlify(body))
        if c == b"p":
            regs = self._read_registers(self._cpu())
            regno = int(body, 16)
            return _hex(regs[regno]) if 0 <= regno < len(regs) else b"E00"
        if c == b"P":
            n_text, _, value = body.partition(b"=")
            return self._write_register(int(n_text, 16), binascii.unhexlify(value))
        if c == b"m":
            a, _, n = body.partition(b",")
            return self._read_memory(int(a, 16), int(n, 16))
        if c == b"M":
            head, _, data = body.partition(b":")
            a, _, n = head.partition(b",")
            raw = binascii.unhexlify(data)
            if len(raw) != int(n, 16):
                return b"E01"
            return self._write_memory(int(a, 16), raw)
        if c == b"X":
            head, _, data = body.partition(b":")
            a, _, n = head.partition(b",")
            raw = unescape(data)
            if len(raw) != int(n, 16):
                return b"E01"
            return self._write_memory(int(a, 16), raw)
        if c in (b"Z", b"z"):
            return self._breakpoint(c == b"Z", body)
        if c in (b"c", b"s", b"C", b"S"):
            if body and c in (b"c", b"s"):
                self._set_pc(self._cpu(), int(body, 16))
            step = {self._c_cpu if self._c_cpu >= 0 else self._g_cpu} if c in (b"s", b"S") \
                else set()
            return self._resume(step)
        if c == b"D":
            self.send(b"OK")
            raise _Resume("detach")
        if c == b"k":
            raise _Resume("kill")
        return b""  # unknown: the protocol's "not supported"

    def _query(self, pkt: bytes) -> bytes | None:
        name, _, args = pkt.partition(b":")
        if name == b"qSupported":
            self._supported = {f.rstrip(b"+").decode("ascii", "replace")
                               for f in args.split(b";") if f.endswith(b"+")}
            return (b"PacketSize=%x;qXfer:features:read+;QStartNoAckMode+;vContSupported+;"
                    b"swbreak+;hwbreak+" % MAX_PACKET)
        if name == b"QStartNoAckMode":
            self.send(b"OK")
            self.no_ack = True
            return None  # (already answered: later packets are not acknowledged)
        if name == b"qXfer" and args.startswith(b"features:read:"):
            annex, _, rng = args[len(b"features:read:"):].partition(b":")
            if annex != b"target.xml":
                return b"E00"
            off_s, _, len_s = rng.partition(b",")
            off, n = int(off_s, 16), min(int(len_s, 16), MAX_PACKET - 16)
            doc = self.target().xml().encode()
            chunk = doc[off:off + n]
            return (b"m" if off + n < len(doc) else b"l") + chunk
        if name == b"qAttached":
            return b"1"
        if name == b"qC":
            return b"QC%x" % (self._g_cpu + 1)
        if name == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % (c.id + 1) for c in self.cpus)
        if name == b"qsThreadInfo":
            return b"l"
        if name.startswith(b"qThreadExtraInfo"):
            tid = self._thread_id(pkt.partition(b",")[2])
            if tid is None or tid < 0:
                return b"E01"
            cpu = self._cpu(tid)
            return _hex(f"vCPU {cpu.id}".encode())
        if name == b"qSymbol":
            return b"OK"
        if pkt.startswith(b"qRcmd,"):
            return self._monitor(binascii.unhexlify(pkt[6:]))
        return b""

    def _monitor(self, cmd: bytes) -> bytes:
        text = cmd.decode("utf-8", "replace").strip()
        if text in ("emulate on", "emulate off"):
            self.emulated_steps = text == "emulate on"
            how = "the emulated CPU (exact, no KVM entry)" if self.emulated_steps \
                else "KVM"
            return _hex(f"single steps now run on {how}\n".encode())
        if text in ("info", "help", ""):
            lines = [f"kvmfw gdbstub: {len(self.cpus)} vCPU(s), arch {self.machine.arch}"]
            lines += list(self.target().notes)
            lines.append("monitor emulate on|off: single-step on the emulated CPU or on KVM "
                         f"(now {'on' if self.emulated_steps else 'off'})")
            return _hex(("\n".join(lines) + "\n").encode())
        return _hex(f"unknown monitor command {text!r} (try: monitor info)\n".encode())

    def _v(self, pkt: bytes) -> bytes | None:
        if pkt == b"vCont?":
            return b"vCont;c;C;s;S"
        if pkt.startswith(b"vCont;"):
            step: set[int] = set()
            for action in pkt[6:].split(b";"):
                verb, _, tid_text = action.partition(b":")
                tid = self._thread_id(tid_text) if tid_text else -1
                if tid is None or not verb or verb[:1] not in (b"c", b"C", b"s", b"S"):
                    return b"E01"
                if verb[:1] in (b"s", b"S"):
                    if tid < 0:
                        step |= {c.id for c in self.cpus}
                    else:
                        step.add(tid)
            return self._resume(step)
        if pkt.startswith(b"vKill"):
            self.send(b"OK")
            raise _Resume("kill")
        if pkt == b"vMustReplyEmpty":
            return b""
        return b""

    def _resume(self, step: set[int]) -> bytes:
        """Resume (raises :class:`_Resume`), or with ``monitor emulate on`` and one vCPU to
        step: step it on the emulated CPU here and answer with the stop at once."""
        if self.emulated_steps and len(step) == 1:
            return self._emulated_step(self.cpus[next(iter(step))])
        self.stepping = step
        self._awaiting_stop = True
        raise _Resume("resume")

    def _emulated_step(self, cpu: KvmCPU) -> bytes:
        from kvmfw.emu import emulate

        try:
            n = emulate(self.machine, 1, cpu=cpu.id, drain=False)
        except KvmfwError as exc:  # a state the emulator refuses: say so, stay stopped
            raise GdbError(f"emulated step refused: {exc}") from None
        self.emulated_step_count += n
        self._last_stop = self._stop_reply(cpu, Stop("step"), SIGTRAP)
        return self._last_stop

    emulated_step_count = 0

    # --- registers -------------------------------------------------------------------------

    def _read_registers(self, cpu: KvmCPU) -> list[bytes]:
        regs = self.machine.hooks.call("gdb_read_registers", cpu=cpu)
        if regs is None:
            raise GdbError("the arch plugin cannot read registers")
        return list(regs)

    def _write_register(self, n: int, value: bytes) -> bytes:
        sizes = self.target().sizes
        if not 0 <= n < len(sizes) or len(value) != sizes[n]:
            return b"E00"
        ok = self.machine.hooks.call("gdb_write_register", cpu=self._cpu(), regnum=n,
                                     value=value)
        return b"OK" if ok else b"E01"

    def _write_all(self, data: bytes) -> bytes:
        sizes = self.target().sizes
        if len(data) != sum(sizes):
            return b"E00"
        current = self._read_registers(self._cpu())
        off = 0
        for n, size in enumerate(sizes):
            value = data[off:off + size]
            off += size
            if value != current[n] and not self.machine.hooks.call(
                    "gdb_write_register", cpu=self._cpu(), regnum=n, value=value):
                return b"E01"
        return b"OK"

    def _set_pc(self, cpu: KvmCPU, pc: int) -> None:
        t = self.target()
        names = [r.name for r in t.registers]
        for name in ("pc", "rip", "eip"):
            if name in names:
                n = names.index(name)
                self.machine.hooks.call("gdb_write_register", cpu=cpu, regnum=n,
                                        value=pc.to_bytes(t.sizes[n], "little"))
                return

    # --- memory ------------------------------------------------------------------------------

    def _translate(self, vaddr: int) -> int | None:
        return self.machine.hooks.call("gdb_translate", cpu=self._cpu(), vaddr=vaddr)

    def _read_memory(self, addr: int, length: int) -> bytes:
        if length < 0 or addr < 0 or addr >= 1 << 64:
            return b"E16"
        length = min(length, MAX_MEMORY_READ)
        out = bytearray()
        mem = self.machine.memory
        while len(out) < length:
            va = addr + len(out)
            n = min(length - len(out), PAGE - (va % PAGE))
            gpa = self._translate(va)
            if gpa is None or not mem.contains(gpa, n):
                break
            out += mem.read(gpa, n)
        if not out and length:
            return _ERR_FAULT
        return _hex(bytes(out))

    def _write_memory(self, addr: int, data: bytes) -> bytes:
        mem = self.machine.memory
        plan = []
        done = 0
        while done < len(data):
            va = addr + done
            n = min(len(data) - done, PAGE - (va % PAGE))
            gpa = self._translate(va)
            if gpa is None or not mem.contains(gpa, n):
                return _ERR_FAULT  # all or nothing: check every page first
            plan.append((gpa, data[done:done + n]))
            done += n
        for gpa, chunk in plan:
            mem.write(gpa, chunk)
        return b"OK"

    # --- breakpoints ---------------------------------------------------------------------------

    def _breakpoint(self, insert: bool, body: bytes) -> bytes:
        parts = body.split(b";")[0].split(b",")
        if len(parts) != 3:
            return b"E01"
        kind_n, addr, length = int(parts[0], 16), int(parts[1], 16), int(parts[2], 16)
        try:
            kind = BreakKind(kind_n)
        except ValueError:
            return b""
        if not 0 <= addr < 1 << 64 or not 0 < length <= 64:
            return b"E01"
        key = (kind_n, addr, length)
        if not insert:
            if self.breakpoints.pop(key, None) is not None:
                self._apply_debug()
            return b"OK"
        if key in self.breakpoints:
            return b"OK"
        if len(self.breakpoints) >= MAX_BREAKPOINTS:
            return _ERR_NOSPACE
        self.breakpoints[key] = Breakpoint(kind, addr, length)
        try:
            self._apply_debug()
        except KvmfwError as exc:
            del self.breakpoints[key]
            self._apply_debug()
            log.info("gdb: breakpoint refused: %s", exc)
            return b"" if isinstance(exc, GdbUnsupported) else _ERR_NOSPACE
        return b"OK"

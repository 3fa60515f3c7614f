"""The emulated CPU: a vCPU handed over from KVM to the Unicorn engine and back.

gem5 switches a KVM CPU to a detailed model with ``switchOut``/``takeOverFrom``; kvmfw
switches it to :class:`EmulatedCPU`, an instruction-exact CPU on Unicorn (QEMU's TCG as a
library) that shares everything with the KVM CPU:

- the **thread context**: :meth:`EmulatedCPU.take_over_from` reads the KVM CPU's context
  (drained and pulled in full first) into Unicorn; :meth:`EmulatedCPU.switch_out` writes
  Unicorn's registers back into the same context and marks it dirty, so the next KVM entry
  pushes them;
- **guest RAM**: every RAM region is mapped into Unicorn with ``mem_map_ptr`` on the very
  host memory KVM uses, never copied; a store under emulation is a store KVM sees;
- **devices**: port IO and MMIO go to the machine's bus (``machine.bus.pio``/``.mmio``),
  the same devices at the same addresses (MMIO pages through ``mmio_map`` callbacks).

What is architecture-specific (register mapping, the modes Unicorn can model, port IO
instructions, the disassembler) is the arch plugin's :class:`EmuGlue`, returned by the
``emu_glue`` hook. The core never imports Unicorn at import time: it is the optional
extra ``kvmfw[emu]`` (with Capstone for the trace); without it a hand-over raises
:class:`EmuUnavailableError` saying what to install.

Rules while a CPU is emulated (one place, here):

- **Instruction count** is exact: every instruction Unicorn completes is counted by a code
  hook (``EmulatedCPU.instructions``, and ``emulated`` in the stats group
  ``system.cpu<i>.insts``).
- **Interrupts are held**: an interrupt a device raises while the CPU is emulated (e.g. from
  an ``out`` the emulator forwarded) stays pending in the interrupt model
  (``cpu.interrupt_pending``) and is delivered by the arch's ``deliver_interrupts`` at the
  first KVM entry after the switch back, i.e. at the instruction boundary where the
  emulated slice ended. The emulator never synthesises an IDT/vector-table entry.
- **Exceptions end the slice**: an instruction that raises an exception or interrupt
  under emulation (``int n``, a fault, an opcode Unicorn lacks) is not counted; the slice
  ends before it and KVM executes it, delivering the event through the guest's tables.
- **Waiting instructions end the slice**: the emulator stops *before* an instruction the
  glue calls a wait (x86 ``hlt``, AArch64 ``wfi``/``wfe``) and does not count it; the KVM
  CPU executes it after the switch back, so halting and wake-up stay KVM's.
- **Time**: simulated time advances by ``ticks_per_inst`` per emulated instruction; device
  events that fall due meanwhile run when the loop resumes on KVM (the slice is atomic for
  the event queue, as one long KVM slice is).
- **Dirty tracking**: Unicorn's stores bypass KVM's dirty log; if dirty logging is on, every
  RAM page is marked dirty at the switch back (conservative, never loses a page).

Hooks for plugins: :meth:`EmulatedCPU.add_instruction_hook` (``fn(emu, pc, size)`` before
each instruction) and :meth:`EmulatedCPU.add_memory_hook` (``fn(emu, kind, address, size,
value)`` for each data access, kind ``"read"``/``"write"``); the ``emu_started`` hook tells
plugins an emulated CPU exists so they can add theirs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Protocol

from kvmfw.errors import RunTimeoutError, StateError

if TYPE_CHECKING:
    from kvmfw.cpu import KvmCPU
    from kvmfw.machine import Machine

PAGE = 0x1000
MAX_MMIO_PAGES = 1 << 20
"""The most MMIO pages one emulated CPU maps (4 GiB of device space): a bus mapping larger
than the guest can address is clipped, never sizes a host allocation."""
TICKS_PER_INST = 1000
"""Simulated ticks per emulated instruction (1 ns at the default 1 THz tick: 1 GHz, IPC 1)."""


class EmuUnavailableError(StateError):
    """Unicorn (or Capstone) is not installed: ``pip install 'kvmfw[emu]'``."""


class HandoverError(StateError):
    """The vCPU is in a state the emulated CPU cannot model (VMX, SMM, vm86, big real mode,
    AArch64 outside EL1/EL0 ...): the message says which and that it stays on KVM."""


def require_unicorn() -> Any:
    """The ``unicorn`` module, or :class:`EmuUnavailableError` with what to install."""
    try:
        import unicorn
    except ImportError:
        raise EmuUnavailableError("the emulated CPU needs Unicorn: pip install 'kvmfw[emu]' "
                                  "(unicorn and capstone)") from None
    return unicorn


def require_capstone() -> Any:
    try:
        import capstone
    except ImportError:
        raise EmuUnavailableError("the instruction trace needs Capstone: pip install "
                                  "'kvmfw[emu]'") from None
    return capstone


class EmuGlue(Protocol):
    """What an arch plugin provides (``emu_glue`` hook) to hand its vCPUs to Unicorn."""

    arch: str

    def verify(self, cpu: KvmCPU) -> None:
        """Raise :class:`HandoverError` if ``cpu``'s context (pulled in full) describes a
        state Unicorn cannot model (gem5's ``verifyMemoryMode`` role)."""

    def create(self, cpu: KvmCPU) -> Any:
        """A new ``unicorn.Uc`` for ``cpu``'s architecture and mode (RAM not yet mapped)."""

    def uc_key(self, cpu: KvmCPU) -> Any:
        """Which engines :meth:`create` makes for ``cpu`` now are interchangeable (e.g. the
        x86 Unicorn mode): the core reuses a kept engine with the same key."""

    def load(self, uc: Any, cpu: KvmCPU) -> None:
        """Copy the thread context into ``uc`` (called after RAM and MMIO are mapped)."""

    def store(self, uc: Any, cpu: KvmCPU) -> None:
        """Copy ``uc``'s registers back into the thread context and mark it dirty."""

    def install_io(self, uc: Any, emu: EmulatedCPU) -> None:
        """Route the arch's port IO instructions (if any) to ``emu.pio_read``/``pio_write``."""

    def pc(self, uc: Any) -> int:
        """The program counter (virtual address of the next instruction)."""

    def set_pc(self, uc: Any, address: int) -> None:
        """Point the next instruction at ``address`` (as the code hook reports it)."""

    def is_wait(self, code: bytes) -> bool:
        """Whether the instruction starting with ``code`` waits for an interrupt (hlt, wfi):
        the slice ends before it."""

    def disassembler(self, uc: Any) -> Any:
        """A ``capstone.Cs`` for the mode ``uc`` is in now (the mode may change)."""

    def registers(self, uc: Any) -> dict[str, int]:
        """The main registers, for a trace with registers."""

    def mode(self, uc: Any) -> str:
        """A short name of the mode ``uc`` is in (e.g. ``long64``, ``el1``)."""

    # Optional (looked up with getattr): ``code_address(uc, vaddr) -> int | None``, the
    # physical address of a virtual one under ``uc``'s current paging (Unicorn reads
    # physical memory: without it the trace reads instruction bytes at the virtual
    # address, right only where the guest maps code 1:1), and ``translation_key(uc)``,
    # what those translations depend on (e.g. CR3): the core caches them per page until
    # it changes.


@dataclass
class TraceRecord:
    """One emulated instruction: where, its bytes, Capstone's text, optional registers."""

    index: int
    pc: int
    code: bytes
    text: str
    regs: dict[str, int] | None = None

    def __str__(self) -> str:
        line = f"{self.index:>10} {self.pc:#018x}: {self.code.hex(' '):<24} {self.text}"
        if self.regs:
            line += "  ; " + " ".join(f"{k}={v:#x}" for k, v in self.regs.items())
        return line


class Trace:
    """Where trace records go: a text file (one line each) and/or a callback."""

    def __init__(self, file: str | IO[str] | None = None, *,
                 callback: Callable[[TraceRecord], None] | None = None,
                 registers: bool = False) -> None:
        require_capstone()
        self._own = isinstance(file, str)
        self.file: IO[str] | None = open(file, "w") if isinstance(file, str) else file  # noqa: SIM115
        self.callback = callback
        self.registers = registers
        self.records = 0

    def emit(self, rec: TraceRecord) -> None:
        self.records += 1
        if self.file is not None:
            self.file.write(f"{rec}\n")
        if self.callback is not None:
            self.callback(rec)

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            if self._own:
                self.file.close()
            self.file = None


InstructionHook = Callable[["EmulatedCPU", int, int], None]
MemoryHook = Callable[["EmulatedCPU", str, int, int, int], None]


class EmulatedCPU:
    """An instruction-exact CPU on Unicorn that can take over a :class:`KvmCPU`.

    Typical use (what :meth:`Machine.emulate` does)::

        emu = EmulatedCPU(machine, trace=Trace("trace.txt"))
        emu.take_over_from(machine.cpus[0])   # the KVM CPU is switched out
        emu.run(1000)                         # exactly 1000 instructions (fewer at hlt)
        machine.cpus[0].take_over_from(emu)   # back on KVM
    """

    def __init__(self, machine: Machine, *, trace: Trace | None = None,
                 ticks_per_inst: int = TICKS_PER_INST) -> None:
        self.machine = machine
        self.trace = trace
        self.ticks_per_inst = ticks_per_inst
        self.cpu: KvmCPU | None = None
        self.uc: Any = None
        self.glue: EmuGlue | None = None
        self.instructions = 0
        """Instructions completed under this emulator (all hand-overs)."""
        self.handovers = 0
        self.host_ns = 0
        self.stop_reason = ""
        self._insn_hooks: list[InstructionHook] = []
        self._mem_hooks: list[MemoryHook] = []
        self._budget = 0
        self._done = 0
        self._cs: Any = None
        self._cs_mode = ""
        self._error: BaseException | None = None
        self._engines: dict[tuple[str, Any, int], tuple[Any, Any]] = {}
        self._tcache: dict[int, int] = {}
        self._tkey: Any = None

    # --- plugin hooks --------------------------------------------------------------------

    def add_instruction_hook(self, fn: InstructionHook) -> None:
        """Call ``fn(emu, pc, size)`` before every emulated instruction."""
        self._insn_hooks.append(fn)

    def add_memory_hook(self, fn: MemoryHook) -> None:
        """Call ``fn(emu, kind, address, size, value)`` for every data read/write (virtual
        addresses; ``value`` is 0 for reads). Takes effect at the next hand-over."""
        self._mem_hooks.append(fn)

    # --- hand-over -----------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.cpu is not None

    def take_over_from(self, cpu: KvmCPU, *, drain: bool = True) -> None:
        """Take ``cpu`` over from KVM (gem5's ``takeOverFrom``): drain the machine, check
        the mode, map RAM and devices, load the context. ``cpu`` is switched out; nothing
        changes if the state is refused.

        ``drain=False`` (the machine is stopped mid-run, e.g. by the GDB stub): no drain,
        but ``cpu`` must have no IO/MMIO completion pending."""
        uc_mod = require_unicorn()
        if self.cpu is not None:
            raise HandoverError(f"this emulated CPU already runs vcpu {self.cpu.id}")
        machine = self.machine
        glue = machine.hooks.call("emu_glue", cpu=cpu)
        if glue is None:
            raise HandoverError(f"the {machine.arch} plugin has no emulated CPU (emu_glue)")
        cpu.switch_out(drain=drain)
        try:
            glue.verify(cpu)
            uc = self._engine(uc_mod, glue, cpu)
            glue.load(uc, cpu)
        except BaseException:
            cpu.switched_out = False  # refused: the vCPU stays on KVM, unchanged
            raise
        self._tcache.clear()
        self.uc, self.glue, self.cpu = uc, glue, cpu
        self.handovers += 1
        machine.hooks.call("emu_started", emu=self)

    def switch_out(self) -> None:
        """Give the CPU back (gem5's ``switchOut``): registers into the thread context
        (dirty, pushed at the next KVM entry); Unicorn is released."""
        cpu, uc, glue = self.cpu, self.uc, self.glue
        if cpu is None or glue is None:
            return
        glue.store(uc, cpu)
        cpu.mark_context_dirty()
        mem = self.machine.memory
        if getattr(mem, "dirty", None) is not None:
            for r in mem:
                mem.mark_dirty(r.gpa, r.size)
        cpu.switched_out = False
        self.cpu = self.uc = self.glue = None
        self._cs = None

    def _engine(self, uc_mod: Any, glue: EmuGlue, cpu: KvmCPU) -> Any:
        """A Unicorn for ``glue``'s current mode with RAM, devices and hooks in place.

        Engines are kept per (arch, mode kind, vCPU) and reused while the RAM regions and
        MMIO mappings are unchanged: creating one and mapping RAM costs milliseconds, a
        reused one only has its translation caches flushed (KVM may have changed code and
        page tables meanwhile; Unicorn cannot see stores it did not make)."""
        kind = getattr(glue, "uc_key", lambda c: "")(cpu)
        key = (glue.arch, kind, cpu.id)
        layout = (tuple((r.gpa, r.size, r.host_addr, r.readonly) for r in self.machine.memory),
                  tuple((m.base, m.size) for m in self.machine.bus.mmio.mappings()),
                  len(self._mem_hooks))
        cached = self._engines.get(key)
        if cached is not None and cached[1] == layout:
            uc = cached[0]
            uc.ctl_flush_tb()
            uc.ctl(uc_mod.UC_CTL_TLB_FLUSH, uc_mod.UC_CTL_IO_WRITE)
            return uc
        uc = glue.create(cpu)
        self._map_memory(uc_mod, uc, cpu)
        glue.install_io(uc, self)
        uc.hook_add(uc_mod.UC_HOOK_CODE, self._on_code)
        if self._mem_hooks:
            uc.hook_add(uc_mod.UC_HOOK_MEM_READ | uc_mod.UC_HOOK_MEM_WRITE, self._on_mem)
        uc.hook_add(uc_mod.UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        uc.hook_add(uc_mod.UC_HOOK_INTR, self._on_intr)
        self._engines[key] = (uc, layout)
        return uc

    def _map_memory(self, uc_mod: Any, uc: Any, cpu: KvmCPU) -> None:
        ram = []
        for r in self.machine.memory:
            perms = uc_mod.UC_PROT_READ | uc_mod.UC_PROT_EXEC
            if not r.readonly:
                perms |= uc_mod.UC_PROT_WRITE
            uc.mem_map_ptr(r.gpa, r.size, perms, r.host_addr)
            ram.append((r.gpa, r.gpa + r.size))
        pages: set[int] = set()
        for m in self.machine.bus.mmio.mappings():
            first, last = m.base // PAGE, (m.base + max(m.size, 1) - 1) // PAGE
            for p in range(first, min(last, first + MAX_MMIO_PAGES) + 1):
                if len(pages) >= MAX_MMIO_PAGES:
                    break
                if not any(lo <= p * PAGE < hi for lo, hi in ram):
                    pages.add(p)
        for start, n in _runs(sorted(pages)):
            uc.mmio_map(start * PAGE, n * PAGE, self._mmio_read, start * PAGE,
                        self._mmio_write, start * PAGE)

    # --- devices -------------------------------------------------------------------------

    def _mmio_addr(self, addr: int) -> int:
        cpu = self.cpu
        fin = getattr(cpu, "_finalize_mmio", None)
        if fin is not None:
            new = fin(cpu, addr)
            if new is not None:
                return int(new)
        return addr

    def _mmio_read(self, uc: Any, offset: int, size: int, base: int) -> int:
        try:
            data = self.machine.bus.mmio.read(self._mmio_addr(base + offset), size)
            if self.cpu is not None:
                self.cpu.stats.mmio += 1
            return int.from_bytes(data[:size], "little")
        except BaseException as exc:
            self._fail(exc)
            return 0

    def _mmio_write(self, uc: Any, offset: int, size: int, value: int, base: int) -> None:
        try:
            pending = self.machine.bus.mmio.write(self._mmio_addr(base + offset),
                                                  (value & ((1 << (8 * size)) - 1))
                                                  .to_bytes(size, "little"))
            if self.cpu is not None:
                self.cpu.stats.mmio += 1
            if pending is not None:
                # a device answering later (timing-mode MMIO) cannot be waited for inside
                # one Unicorn instruction: the slice ends after it, the write has happened
                self._stop("pending MMIO write")
        except BaseException as exc:
            self._fail(exc)

    def pio_read(self, port: int, size: int) -> int:
        """Port IO read for the glue's IN instruction hook."""
        try:
            if self.cpu is not None:
                self.cpu.stats.io += 1
            return int.from_bytes(self.machine.bus.pio.read(port, size)[:size], "little")
        except BaseException as exc:
            self._fail(exc)
            return 0

    def pio_write(self, port: int, size: int, value: int) -> None:
        """Port IO write for the glue's OUT instruction hook."""
        try:
            if self.cpu is not None:
                self.cpu.stats.io += 1
            self.machine.bus.pio.write(port, (value & ((1 << (8 * size)) - 1))
                                       .to_bytes(size, "little"))
        except BaseException as exc:
            self._fail(exc)

    # --- running -------------------------------------------------------------------------

    def run(self, max_insts: int, *, timeout: float | None = None) -> int:
        """Emulate at most ``max_insts`` instructions; returns how many completed. Ends
        early before a wait instruction, when the machine is asked to stop, or on an error
        (raised here, with the context still consistent at the last instruction).
        ``timeout``: host seconds, then :class:`RunTimeoutError` (status 124)."""
        uc, glue, cpu = self.uc, self.glue, self.cpu
        if uc is None or glue is None or cpu is None:
            raise HandoverError("the emulated CPU runs no vCPU: call take_over_from first")
        if max_insts < 0:
            raise ValueError("max_insts must be >= 0")
        self._budget, self._done = max_insts, 0
        self.stop_reason = "instruction budget reached"
        self._error = None
        self._deadline = None if timeout is None else time.monotonic() + timeout
        t0 = time.monotonic_ns()
        m = self.machine
        try:
            while self._done < self._budget and self._error is None:
                if m.stop_requested:
                    self.stop_reason = "machine stop requested"
                    break
                before = self._done
                self._stopped_on_purpose = False
                self._rewind = None
                try:
                    # count=0 is "no limit" in Unicorn; the code hook enforces the budget
                    uc.emu_start(glue.pc(uc), -1 & 0xFFFFFFFFFFFFFFFF, 0, 0)
                except Exception as exc:  # UcError: the guest did what Unicorn cannot
                    if self._error is None and self._last_pc is not None and \
                            "INSN_INVALID" in str(getattr(exc, "args", [""])) + repr(exc):
                        # an instruction Unicorn does not know (or #UD): KVM runs it
                        self._hand_back(uc, "an instruction the emulator does not model")
                        break
                    if self._error is None:
                        raise HandoverError(
                            f"vcpu {cpu.id}: the emulator failed at pc {glue.pc(uc):#x} "
                            f"after {self._done} instructions: {exc}") from None
                if self._rewind is not None:
                    glue.set_pc(uc, self._rewind)
                if self._stopped_on_purpose:
                    break
                if self._done == before:
                    break
        finally:
            self.host_ns += time.monotonic_ns() - t0
            self.instructions += self._done
            st = insts_stats(m, cpu)
            st["emulated"] += self._done
            if st["method"] == "none":
                st["method"] = "emulated"
            eq = m.eventq
            eq.cur_tick += self._done * self.ticks_per_inst
        if self._error is not None:
            raise self._error
        if self._deadline is not None and self.stop_reason == "host timeout":
            m.request_exit(124, f"host timeout of {timeout:g} s reached")
            raise RunTimeoutError(m.exit_reason)
        return self._done

    _stopped_on_purpose = False
    _rewind: int | None = None
    _last_pc: int | None = None

    def _hand_back(self, uc: Any, why: str) -> None:
        """The instruction at the last code-hook address raised an exception or interrupt
        (``int n``, a fault, an unknown opcode): it is not counted, the PC goes back to it
        and the slice ends, so KVM executes it and delivers the event through the guest's
        own tables (the emulator never synthesises an IDT/vector-table entry)."""
        self._done -= 1
        self._rewind = self._last_pc
        if self.glue is not None and self._last_pc is not None:
            self.glue.set_pc(uc, self._last_pc)
        self._stop(f"{why} (left for KVM)")

    def _on_intr(self, uc: Any, intno: int, _data: Any) -> None:
        self._hand_back(uc, f"exception/interrupt {intno}")
    _deadline: float | None = None

    def _stop(self, reason: str) -> None:
        self.stop_reason = reason
        self._stopped_on_purpose = True
        self.uc.emu_stop()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._stop(f"error: {exc}")

    def _on_code(self, uc: Any, address: int, size: int, _data: Any) -> None:
        if self._done >= self._budget or self.machine.stop_requested:
            self._stop("instruction budget reached" if self._done >= self._budget
                       else "machine stop requested")
            return
        if self._deadline is not None and not self._done & 0xFFF \
                and time.monotonic() > self._deadline:
            self._stop("host timeout")
            return
        assert self.glue is not None
        code = self._code(uc, address, size)
        if self.glue.is_wait(code):
            self._stop("wait instruction (left for KVM)")
            return
        for fn in self._insn_hooks:
            try:
                fn(self, address, size)
            except BaseException as exc:
                self._fail(exc)
                return
        if self.trace is not None:
            self._trace(uc, address, code)
        self._last_pc = address
        self._done += 1

    def _code(self, uc: Any, address: int, size: int) -> bytes:
        """The bytes of the instruction at virtual ``address``: Unicorn reads physical
        memory, so the glue translates (``code_address``) when paging is on; a page's
        translation is kept until the glue's translation key (e.g. CR3) changes or the
        next hand-over."""
        if size > 16:
            return b""
        fn = getattr(self.glue, "code_address", None)
        if fn is None:
            return bytes(uc.mem_read(address, size))
        page, off = address & ~(PAGE - 1), address & (PAGE - 1)
        if off + size > PAGE:  # crossing a page: both halves
            first = PAGE - off
            return self._code(uc, address, first) + self._code(uc, page + PAGE, size - first)
        key = getattr(self.glue, "translation_key", lambda _u: None)(uc)
        if key != self._tkey:
            self._tcache.clear()
            self._tkey = key
        phys = self._tcache.get(page)
        if phys is None:
            phys = fn(uc, page)
            if phys is None:
                return b""
            if len(self._tcache) >= 4096:
                self._tcache.clear()
            self._tcache[page] = phys
        try:
            return bytes(uc.mem_read(phys + off, size))
        except Exception:  # an instruction fetched from a device page: no bytes to show
            return b""

    def _trace(self, uc: Any, address: int, code: bytes) -> None:
        assert self.glue is not None and self.trace is not None
        mode = self.glue.mode(uc)
        if self._cs is None or mode != self._cs_mode:
            self._cs, self._cs_mode = self.glue.disassembler(uc), mode
        text = "(unknown)"
        for insn in self._cs.disasm(code, address, 1):
            text = f"{insn.mnemonic} {insn.op_str}".strip()
        regs = self.glue.registers(uc) if self.trace.registers else None
        self.trace.emit(TraceRecord(self.instructions + self._done, address, code, text, regs))

    def _on_mem(self, uc: Any, access: int, address: int, size: int, value: int,
                _data: Any) -> None:
        import unicorn
        kind = "write" if access == unicorn.UC_MEM_WRITE else "read"
        for fn in self._mem_hooks:
            try:
                fn(self, kind, address, size, value if kind == "write" else 0)
            except BaseException as exc:
                self._fail(exc)

    def _on_unmapped(self, uc: Any, access: int, address: int, size: int, value: int,
                     _data: Any) -> bool:
        self._fail(HandoverError(
            f"emulated access to unmapped address {address:#x} (size {size}): neither RAM "
            "nor a device on the MMIO bus"))
        return False

    def close(self) -> None:
        if self.cpu is not None:
            self.switch_out()
        self._engines.clear()
        if self.trace is not None:
            self.trace.close()


def insts_stats(machine: Machine, cpu: KvmCPU) -> dict[str, Any]:
    """``cpu``'s instruction counts by provenance, the stats group ``system.cpu<i>.insts``
    (registered on first use): ``measured`` (a perf counter on KVM), ``emulated`` (counted
    by the emulated CPU), ``estimated`` (none yet), ``method`` (how the last exact stop was
    reached), ``requested`` (instructions asked of exact stops)."""
    d: dict[str, Any] | None = getattr(cpu, "insts_stats", None)
    if d is None:
        d = {"measured": 0, "emulated": 0, "estimated": 0, "method": "none",
             "requested": 0}
        cpu.insts_stats = d  # type: ignore[attr-defined]
        stats = d
        machine.stats.add(f"system.cpu{cpu.id}.insts", lambda: dict(stats), None)
    return d


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Consecutive page numbers as (first, count) runs."""
    out: list[tuple[int, int]] = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def emulate(machine: Machine, insts: int, *, cpu: int = 0, trace: Trace | None = None,
            emu: EmulatedCPU | None = None, drain: bool = True) -> int:
    """Switch vCPU ``cpu`` to an emulated CPU, run ``insts`` instructions exactly (fewer if
    it reaches a wait instruction or the machine stops) and switch it back to KVM; returns
    the number emulated. ``drain=False``: called inside a stopped run (the GDB stub)."""
    if not 0 <= cpu < len(machine.cpus):
        raise StateError(f"no vcpu {cpu} (the machine has {len(machine.cpus)})")
    e = emu
    if e is None:
        # one emulator per machine, kept between calls: its engines (and their mapped
        # RAM) are reused, which makes a round trip cheap
        e = getattr(machine, "_emulated_cpu", None)
        if e is None:
            e = EmulatedCPU(machine)
            machine._emulated_cpu = e  # type: ignore[attr-defined]
        e.trace = trace
    kcpu = machine.cpus[cpu]
    if drain:
        # between runs the flag still says why the last run stopped: this slice starts
        # afresh (a device or the guest may stop it again)
        machine.stop_requested = False
    e.take_over_from(kcpu, drain=drain)
    try:
        return e.run(insts)
    finally:
        e.switch_out()  # (the trace stays open: its owner closes it)
        if emu is None:
            e.trace = None

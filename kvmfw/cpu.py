"""``KvmCPU``: the run loop of one vCPU (gem5's ``BaseKvmCPU``), ISA-neutral.

State machine (gem5 names)::

    IDLE --activate()--> RUNNING --exit--> RUNNING_SERVICE
     ^                    ^  |                  |--IO/MMIO done--> RUNNING_SERVICE_COMPLETION
     |                    |  +--INTR (kick,     |--HLT--> IDLE (until wakeup())
     |                    |      run timer)     |--timing MMIO--> RUNNING_MMIO_PENDING
     +--suspend()/halt()--+                     +--anything else--> RUNNING
    RUNNING_MMIO_PENDING --finish_mmio_pending()--> RUNNING_SERVICE_COMPLETION
    RUNNING_SERVICE_COMPLETION --next entry completes the access--> RUNNING_SERVICE

``tick()`` is the CPU's event. Each call runs KVM slices bounded by the next event in the
queue, servicing exits in between, until an event is due, the CPU goes idle, or the
machine stops. The exit path is the hot path: one table lookup, no pluggy call, no
allocation beyond the IO tuple; an MMIO exit, or a single port access with
``direct_port_io``, to an address the bus has cached is serviced in the loop's own frame
(the device called from there; :class:`~kvmfw.bus.AddressSpace` judges odd answers). The
entry itself is C (``kvmfw_run_ctx``): it reads the clock, counts exits and time in KVM
(folded into the stats when ``tick`` returns), leaves the exit reason and the simulated
tick of the exit in machine words the loop indexes (``FastState.words``), and answers the
exits the bus's compiled-path table covers without returning to Python
(:mod:`kvmfw.fastpath`). ``exit_table`` swaps in another exit table (the profiler's,
:mod:`kvmfw.profile`), so the plain path tests no profiling flag.

Thread context: the arch plugin's register cache. Two flags make sync lazy (gem5):
``_tc_dirty`` (someone changed the context: push before the next entry) and
``_pulled_level`` (how much was read back since KVM last ran: pull only on demand).
"""

from __future__ import annotations

import enum
import errno
import struct
import threading
import time
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from kvmfw.abi import ExitReason, InternalError, SystemEvent, address_of, constants, lib
from kvmfw.bus import PendingAccess
from kvmfw.coalesced import CURSOR as RING_CURSOR
from kvmfw.coalesced import pending as ring_pending
from kvmfw.coalesced import take as ring_take
from kvmfw.debug import DEBUG, get_logger
from kvmfw.errors import (
    EmulationFailureError,
    EntryFailureError,
    GuestCrashError,
    GuestError,
    GuestExceptionError,
    InternalKvmError,
    KvmError,
    KvmfwError,
    PluginHookError,
    StateError,
    TripleFaultError,
    UnhandledExitError,
)
from kvmfw.eventq import PRIO_CPU_TICK, Event
from kvmfw.fastpath import LATCHED, NOW, RANGE_COUNTS, REASON, T1, FastState, FastTable
from kvmfw.hookspecs import SyncLevel
from kvmfw.stats import KvmCpuStats
from kvmfw.timer import CycleSource, RunTimer
from kvmfw.vcpu import KICK_SIGNAL, MMIO_DATA, RUN_PAYLOAD

if TYPE_CHECKING:
    from kvmfw.machine import Machine
    from kvmfw.plugins import BoundHooks
    from kvmfw.vcpu import VCpu

log = get_logger("kvmfw.cpu")
log_run = get_logger("kvmfw.run")
log_io = get_logger("kvmfw.io")
log_ctx = get_logger("kvmfw.context")

_EINTR = -errno.EINTR
_SYNC_NONE = SyncLevel.NONE
_now = time.monotonic_ns
_run_ctx = lib.kvmfw_run_ctx
_STALE = object()
_EAGAIN = -errno.EAGAIN
_RING_PENDING = lib.KVMFW_RING_PENDING
_unpack_io = struct.Struct("<BBHIQ").unpack_from
_unpack_mmio = struct.Struct("<Q8sIB").unpack_from
_unpack_mmio_head = struct.Struct("<Q8xIB").unpack_from  # (phys_addr, len, is_write)
_NUM_EXIT_SLOTS = 64


class CpuStatus(enum.Enum):
    """The five states of gem5's ``BaseKvmCPU::_status``."""

    IDLE = "Idle"
    RUNNING = "Running"
    RUNNING_SERVICE = "RunningService"
    RUNNING_MMIO_PENDING = "RunningMMIOPending"
    RUNNING_SERVICE_COMPLETION = "RunningServiceCompletion"


IDLE = CpuStatus.IDLE
RUNNING = CpuStatus.RUNNING
RUNNING_SERVICE = CpuStatus.RUNNING_SERVICE
RUNNING_MMIO_PENDING = CpuStatus.RUNNING_MMIO_PENDING
RUNNING_SERVICE_COMPLETION = CpuStatus.RUNNING_SERVICE_COMPLETION


class IoExit(tuple):  # type: ignore[type-arg]
    """A ``KVM_EXIT_IO``: the tuple ``(direction, size, port, count, data_offset)``, with
    those names as attributes too; ``data_offset`` is into the vCPU mapping
    (``vcpu.run_map``). Built from one iterable, ``IoExit((1, 1, 0x3f8, 1, 4096))``: a
    plain tuple subclass is built in C (a ``NamedTuple``'s Python ``__new__`` cost a
    quarter of a port exit's Python time)."""

    __slots__ = ()
    _fields = ("direction", "size", "port", "count", "data_offset")
    direction = property(itemgetter(0), doc="KVM_EXIT_IO_OUT (1) or KVM_EXIT_IO_IN (0)")
    size = property(itemgetter(1), doc="bytes per access (1, 2 or 4)")
    port = property(itemgetter(2))
    count = property(itemgetter(3), doc="accesses (> 1: string IO)")  # type: ignore[assignment]
    data_offset = property(itemgetter(4))

    @property
    def is_write(self) -> bool:
        return self[0] == constants.KVM_EXIT_IO_OUT

    def __repr__(self) -> str:
        return "IoExit(" + ", ".join(f"{n}={v}" for n, v in zip(self._fields, self,
                                                                    strict=True)) + ")"


class KvmCPU:
    """One vCPU and its run loop."""

    def __init__(self, machine: Machine, vcpu: VCpu, hooks: BoundHooks, *,
                 always_sync: bool = False, host_factor: float = 1.0,
                 use_coalesced_mmio: bool = False) -> None:
        self.machine = machine
        self.vcpu = vcpu
        self.id = vcpu.id
        self.hooks = hooks
        self.eventq = machine.eventq
        self._always_sync = always_sync
        self.host_factor = host_factor
        self._extras = True
        """Whether entries and exits need their cold parts (see :meth:`_run_slice`)."""
        self._no_fast = always_sync
        self._pre_run: Any = None
        self._post_run: Any = None
        self._trace = False
        self._use_coalesced_mmio = (use_coalesced_mmio or bool(vcpu.vm.coalesced_zones)) \
            and bool(vcpu.coalesced_ring_offset)
        self.status = IDLE
        self.stats = KvmCpuStats()
        self._runs = 0  # half entries (KVM_RUN calls of the run loop are counted in C)
        self.context: Any = None
        self._tc_dirty = True
        self._pulled_level = SyncLevel.NONE
        self.interrupt_pending = False
        """Set by an interrupt controller (``post_interrupt``); the arch clears it."""
        self.halted = False
        """Suspended by HLT: waits for :meth:`wakeup`."""
        self.drain_pending = False
        self.start_active = vcpu.id == 0
        """Whether :meth:`Machine.run` activates this CPU at the first run (default: the boot
        CPU only). Archs whose secondary CPUs wait inside KVM_RUN for a start-up IPI or
        PSCI CPU_ON set it for every CPU in ``vcpu_init``."""
        self.parallel = False
        """True while the machine runs each vCPU on its own host thread."""
        self._wake = threading.Event()
        self.tick_event = Event(self.tick, f"cpu{self.id}.tick", PRIO_CPU_TICK)
        self._timer: RunTimer | None = None
        self._armed_bound: int | None = None
        self._armed_clock: Any = None
        self.cycle_source: CycleSource | None = None
        self.cycle_source_reason = ""
        self._dispatch: list[Any] = []
        self.exit_table: list[Any] | None = None
        """A replacement exit table (the profiler's, :mod:`kvmfw.profile`), taken from the
        next :meth:`tick` on; None: the plain one."""
        self._cycles: Any = None
        self._insns: Any = None
        self._fd = vcpu.fd
        self._run: Any = vcpu.run
        self._map: Any = vcpu.run_map
        self._view: Any = vcpu.run_view  # (unpacking from it is faster than from the mmap)
        self._run_addr = address_of(vcpu.run)
        self._run_size = len(vcpu.run_map)
        self._bus = machine.bus
        opt = machine.config.options.get("fastpath", True)
        self.fastpath = opt is True or str(opt).lower() in ("on", "1", "true", "yes")
        """Answer the exits the bus's table covers in C (:mod:`kvmfw.fastpath`);
        ``--option fastpath=off`` sends every exit to Python."""
        self._fs = FastState(vcpu.fd, self._run_addr, self._run_size)
        self._ctx = self._fs.ctx
        self._fast_table: Any = _STALE
        """The bus table the compiled path uses (refreshed when the bus drops it)."""
        self._ticks_per_cycle = 1000.0 * host_factor
        self._cycles_per_ns = 1.0
        """The cycle source's cycles per ns when the C entry times them (see
        :meth:`bind_thread`; 1: the monotonic clock), 0 when Python reads the source."""
        self._ctx.ticks_per_ns = self._ticks_per_cycle
        self.last_exit: int | None = None
        self.mmio_remap = True
        """False once the arch said (in ``vcpu_init``) that ``finalize_mmio_address`` never
        changes this vCPU's addresses: the hook is then not called on each MMIO exit."""
        self.direct_port_io = False
        """True once the arch said (in ``vcpu_init``) that its ``handle_exit_io`` does for a
        single port access outside its reserved ports (:meth:`AddressSpace.reserve
        <kvmfw.bus.AddressSpace.reserve>`) only what the bus does: such exits then go
        straight to the bus, as MMIO exits do, without the hook or an :class:`IoExit`
        (string IO and reserved ports still reach it). The compiled exit path already
        treats those ports so."""
        self.suspended_ticks = 0
        """Simulated ticks spent IDLE (halted or suspended), as gem5 accounts them."""
        self._idle_since: int | None = None
        self.switched_out = False
        """True while an emulated CPU (:mod:`kvmfw.emu`) runs this vCPU: KVM must not."""

    # --- start-up --------------------------------------------------------------------

    def startup(self) -> None:
        """Bind hooks, initialise the vCPU (arch hook) and its thread context."""
        h = self.hooks
        self.bind_hooks()
        self._dispatch = self._build_dispatch()
        h.call("vcpu_init", cpu=self)
        self.context = h.call("create_thread_context", cpu=self)
        if self.context is None:
            raise StateError("the architecture plugin did not create a thread context")
        self._pulled_level = SyncLevel.FULL  # a new context holds the vCPU's initial state

    def bind_hooks(self) -> None:
        """Resolve the run-loop hooks (again): called at start-up and by the machine each
        time a device registers, so a device's ``pre_run``/``post_run`` take part from the
        next entry on. Rebinding replaces plain attributes, so a vCPU thread that is
        running sees either the old or the new set, never a mix within one hook."""
        h = self.hooks
        self._update_kvm_state = h.bind("update_kvm_state")
        self._update_thread_context = h.bind("update_thread_context")
        self._pre_run = h.bind("pre_run")
        self._post_run = h.bind("post_run")
        self._deliver_interrupts = h.bind("deliver_interrupts")
        self._handle_exit_io = h.bind("handle_exit_io")
        self._handle_arch_exit = h.bind("handle_arch_exit")
        self._finalize_mmio = h.bind("finalize_mmio_address")
        self._update_extras()

    def bind_thread(self, cycle_source: CycleSource, reason: str) -> None:
        """Called on the thread that will run this vCPU: signals, run timer, cycle source.

        A vCPU is bound to the thread that runs it for as long as it runs there
        (:meth:`Machine.run`, :meth:`Machine.drain`, a parallel vCPU thread); the previous
        binding's timer and perf counters are released first."""
        self.vcpu.bind_thread()
        if self._timer is not None:
            self._timer.close()
        self._timer = RunTimer(KICK_SIGNAL, self.vcpu.thread_tid or 0, self.stats)
        if self.cycle_source is not None and self.cycle_source is not cycle_source:
            self.cycle_source.close()
        self.cycle_source = cycle_source
        self.cycle_source_reason = reason
        # a source of host cycles (the monotonic clock, the TSC) counts, around KVM_RUN, the
        # time the C entry already takes with CLOCK_MONOTONIC: the C entry accounts it (ns,
        # scaled to the source's cycles when folded) and the exit path reads no counter; a
        # guest-only counter (perf) is read around each entry
        timed = not cycle_source.counts_guest_only and cycle_source.instructions is None
        self._cycles = None if timed else cycle_source.read
        self._insns = cycle_source.instructions
        self._ticks_per_cycle = cycle_source.ticks(1_000_000, self.host_factor) / 1_000_000
        self._cycles_per_ns = cycle_source.frequency_hz / 1e9 if timed else 0.0
        self._ctx.ticks_per_ns = self._ticks_per_cycle * self._cycles_per_ns

    @property
    def runs(self) -> int:
        """Entries into KVM so far (never reset): a cache can tell whether KVM ran since."""
        return self._runs + int(self._ctx.entries)

    @runs.setter
    def runs(self, value: int) -> None:
        self._runs = value - int(self._ctx.entries)

    def fold_stats(self) -> None:
        """Move the counts the C entry keeps (exits, time in KVM) into :attr:`stats`. The
        run loop does it whenever :meth:`tick` returns (on the vCPU's thread, after each
        entry in parallel mode); readers of the stats registry get it first."""
        if self._fs.counts[0]:
            self._fold_fast()
        c = self._ctx
        n = c.exits
        if n:
            st = self.stats
            st.vm_exits += n
            st.host_ns_in_kvm += c.ns
            cycles = c.cycles  # (ns of a source of host cycles: in its cycles)
            st.cycles += cycles if self._cycles_per_ns == 1.0 else \
                int(cycles * self._cycles_per_ns)
            st.ticks_in_kvm += c.ticks
            st.io += c.io
            st.mmio += c.mmio
            c.exits = c.ns = c.cycles = c.ticks = c.io = c.mmio = 0

    def reset_stats(self) -> None:
        """Zero the stats (and the counts not yet folded into them)."""
        if not self.parallel:
            self.fold_stats()
        self.stats.reset()

    def stats_dict(self) -> dict[str, int]:
        """The stats registry's view of this vCPU (counts kept in C folded in first, unless
        another thread is running the vCPU: then as of its last fold)."""
        if not self.parallel:
            self.fold_stats()
        return self.stats.as_dict()

    def unbind_thread(self) -> None:
        """Called on the bound thread when it stops running this vCPU: the run timer is
        deleted (it signals this thread only) and the kick slot released."""
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        self.vcpu.unbind_thread()

    @property
    def bound_here(self) -> bool:
        """Whether the calling thread is bound to run this vCPU."""
        return self.vcpu.bound_here

    def _build_dispatch(self) -> list[Any]:
        table: list[Any] = [self._exit_arch_or_unexpected] * _NUM_EXIT_SLOTS
        E = ExitReason
        table[E.UNKNOWN] = self._exit_unknown
        table[E.EXCEPTION] = self._exit_exception
        table[E.IO] = self._exit_io
        table[E.HLT] = self._exit_hlt
        table[E.MMIO] = self._exit_mmio
        table[E.IRQ_WINDOW_OPEN] = self._exit_irq_window
        table[E.SHUTDOWN] = self._exit_shutdown
        table[E.FAIL_ENTRY] = self._exit_fail_entry
        table[E.INTR] = self._exit_intr
        table[E.INTERNAL_ERROR] = self._exit_internal_error
        table[E.SYSTEM_EVENT] = self._exit_system_event
        table[E.HYPERCALL] = self._exit_hypercall
        table[E.DEBUG] = self._exit_debug
        return table

    # --- thread context (lazy two-way sync) ---------------------------------------------

    def get_context(self, level: SyncLevel = SyncLevel.FULL) -> Any:
        """The thread context, pulled from KVM first if KVM ran since the last pull at
        ``level`` (never pulls twice for one run)."""
        if self._pulled_level < level:
            self._pull(level)
        return self.context

    @property
    def regs(self) -> Any:
        """The thread context with at least the registers current (``get_context`` at
        RUNTIME level): read ``cpu.regs.rip``; a write (``cpu.regs.rax = 1``) reaches KVM
        before the vCPU runs again (the arch's context marks itself dirty)."""
        return self.get_context(SyncLevel.RUNTIME)

    def _pull(self, level: SyncLevel) -> None:
        if self._tc_dirty:
            # the context holds unpushed writes: push them so the pull cannot lose them
            self.sync_kvm_state()
        fn = self._update_thread_context
        if fn is not None:
            n = self._call_hook("update_thread_context", fn, self, self.context, level)
            if type(n) is int:  # the ioctls it made (bool True/None: not counted)
                self.stats.sync_ioctls_from_kvm += n
                if n:
                    self.stats.syncs_from_kvm += 1
            else:
                self.stats.syncs_from_kvm += 1
            if log_ctx.isEnabledFor(DEBUG):
                log_ctx.debug("cpu%d: pulled context at level %s (%s ioctls)", self.id,
                              level.name, n)
        self._pulled_level = level

    def mark_context_dirty(self) -> None:
        """Say the context was changed: it is pushed to KVM before the next entry."""
        self._tc_dirty = True

    def sync_kvm_state(self, level: SyncLevel = SyncLevel.RUNTIME) -> None:
        """Push the context into KVM now if it is dirty (or ``level`` is FULL)."""
        if not (self._tc_dirty or level >= SyncLevel.FULL):
            return
        fn = self._update_kvm_state
        if fn is not None:
            n = self._call_hook("update_kvm_state", fn, self, self.context, level)
            if type(n) is int:
                self.stats.sync_ioctls_to_kvm += n
                if n:
                    self.stats.syncs_to_kvm += 1
            else:
                self.stats.syncs_to_kvm += 1
            if log_ctx.isEnabledFor(DEBUG):
                log_ctx.debug("cpu%d: pushed context at level %s (%s ioctls)", self.id,
                              level.name, n)
        self._tc_dirty = False

    def _call_hook(self, name: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except KvmfwError:
            raise
        except Exception as exc:
            raise PluginHookError(name, _owner(fn), exc) from exc

    # --- state machine -------------------------------------------------------------------

    def activate(self, delay: int = 0) -> None:
        """IDLE -> RUNNING, and schedule ``tick``."""
        if self.status is not IDLE:
            return
        if self._idle_since is not None:
            self.suspended_ticks += self.eventq.cur_tick - self._idle_since
            self._idle_since = None
        self.status = RUNNING
        self.halted = False
        self._schedule_tick(self.eventq.cur_tick + delay)

    def suspend(self) -> None:
        """Any state -> IDLE; the tick is descheduled."""
        if self.status is IDLE:
            return
        self.status = IDLE
        self._idle_since = self.eventq.cur_tick
        if not self.parallel and self.tick_event.scheduled:
            self.eventq.deschedule(self.tick_event)
        if self._timer is not None:
            self._timer.disarm()

    def halt(self) -> None:
        """Suspend until an interrupt :meth:`wakeup`\\ s the CPU (guest HLT)."""
        self.suspend()
        self.halted = True

    def wakeup(self) -> None:
        """An interrupt arrived: reactivate a halted CPU, or kick a running one."""
        if self.status is IDLE and self.halted:
            self.activate()
            self._wake.set()
        else:
            self.kick()

    def post_interrupt(self) -> None:
        """Called by a userspace interrupt controller: deliver before the next entry."""
        self.interrupt_pending = True
        self.wakeup()

    def kick(self) -> None:
        """Make a running KVM_RUN return (``KVM_EXIT_INTR``), or the next one at once."""
        if self._run is not None:  # closed: nothing to kick
            self.vcpu.kick()

    def count_interrupt(self, n: int = 1) -> None:
        """Called by the arch for each interrupt or NMI it injects from userspace."""
        self.stats.interrupts += n

    def finish_mmio_pending(self) -> None:
        """RUNNING_MMIO_PENDING -> RUNNING_SERVICE_COMPLETION (timing-mode accesses done)."""
        if self.status is not RUNNING_MMIO_PENDING:
            raise StateError(f"cpu{self.id} is {self.status.value}, not RunningMMIOPending")
        self.status = RUNNING_SERVICE_COMPLETION
        self._schedule_tick(self.eventq.cur_tick)

    def _schedule_tick(self, when: int) -> None:
        if self.parallel:
            self._wake.set()  # the vCPU thread, not the event queue, drives this CPU
            return
        eq = self.eventq
        if self.tick_event.scheduled:
            eq.reschedule(self.tick_event, max(when, eq.cur_tick))
        else:
            eq.schedule(self.tick_event, max(when, eq.cur_tick))

    # --- the run loop --------------------------------------------------------------------

    def tick(self) -> None:
        """Run and service until an event is due, the CPU idles, or the machine stops."""
        self._trace = log_run.isEnabledFor(DEBUG) or log_io.isEnabledFor(DEBUG)
        self._update_extras()
        # the exit table for this call: the plain one, or one that traces each IO/MMIO exit
        # (so the plain handlers test no flag)
        dispatch = self.exit_table or self._dispatch
        if self._trace:
            dispatch = self._traced_dispatch(dispatch)
        try:
            self._loop(dispatch, None)
        finally:
            self.fold_stats()

    def run_thread(self) -> None:
        """The loop of a vCPU that has its own host thread (parallel mode).

        Enters KVM without holding the machine lock; services each exit under it, so
        devices and the event queue see one caller at a time. Returns when the machine
        stops; an error is left in ``machine`` for the main thread to raise.
        """
        m = self.machine
        lock = m.lock
        try:
            while not m.stop_requested:
                st = self.status
                if st is IDLE or st is RUNNING_MMIO_PENDING:
                    self._wake.wait(0.05)
                    self._wake.clear()
                elif st is RUNNING_SERVICE:
                    with lock:
                        m.sync_clock()
                        self._dispatch_exit()
                elif self.drain_pending:
                    with lock:
                        self.run_drain()
                else:
                    self._loop(None, None)
        except BaseException as exc:  # handed to the main thread
            m.thread_failed(exc)

    def run_slice(self, ticks: int | None) -> None:
        """Enter KVM once for at most ``ticks`` simulated ticks (None: until an exit) and
        leave the exit unserviced (status RUNNING_SERVICE, or RUNNING after a kick). For
        arch plugins driving a vCPU towards a drainable point (``kvm_run_drain``)."""
        self._loop(None, ticks)

    _run_slice = run_slice

    def _loop(self, dispatch: list[Any] | None, ticks: int | None) -> None:
        """Enter KVM, account the time, service the exit; again.

        With a ``dispatch`` table (:meth:`tick`): slices bounded by the next event, each
        exit serviced at once (as gem5 does: it happened before any event now due), until
        an event is due, the CPU idles or the machine stops. Without (:meth:`run_slice`):
        one entry for at most ``ticks`` ticks (None: until an exit), left unserviced.

        The hot path, one frame per exit: what stays fixed while it runs is bound to
        locals once (the clock base too: :meth:`Machine._start_clock` moves it between
        runs only); what only some entries need (a dirty context, an interrupt to deliver,
        ``always_sync``, ``pre_run``/``post_run`` hooks, the coalesced ring, tracing) sits
        behind one flag each side (``_extras``), so a plain exit pays for none of it."""
        eq = self.eventq
        heap = eq._heap
        machine = self.machine
        bus = self._bus
        ctx = self._ctx
        words = self._fs.words
        timer = self._timer
        src = self._cycles  # None: the C entry times the cycles (see bind_thread)
        stats = self.stats
        parallel = self.parallel  # (fixed for a run: set before the vCPU threads start)
        table: list[Any] = dispatch if dispatch is not None else []
        serve = dispatch is not None
        host0 = tick0 = per_int = 0
        per_ns = 1.0
        if not parallel:  # (a vCPU thread of a parallel run accounts no time itself)
            clock = machine._clock
            host0, tick0, per_ns = clock
            # whole ticks per ns (host_factor 1: 1000): the C entry then computes the tick
            # at each exit (words[NOW], -1 past 64 bits: 2**63 ps are 106 days)
            if per_ns.is_integer() and 0 < per_ns < 1 << 20 and 0 <= tick0 < 1 << 62:
                per_int = int(per_ns)
                ctx.host0, ctx.tick0 = host0, tick0
            if self._armed_clock is not clock:
                self._armed_bound = None  # armed in another run: its deadline is stale
        ctx.ticks_per_ns_int = per_int
        # Bus accesses are serviced in this frame when the core's own handler would take
        # them (MMIO unless the arch remaps addresses; single port accesses with
        # direct_port_io): fixed for the loop, as all three are set up before a run
        mmio, pio = bus.mmio, bus.pio
        mhits, phits = mmio._cache, pio._cache
        view, mm = self._view, self._map
        inline_mmio = serve and table[6] == self._exit_mmio and (
            self._finalize_mmio is None or not self.mmio_remap)
        inline_pio = serve and table[2] == self._exit_io and self.direct_port_io
        bound: int | None = None
        while True:
            if serve:
                st = self.status
                if st is RUNNING_SERVICE_COMPLETION or st is RUNNING:
                    if self.drain_pending:
                        self.run_drain()
                        enter = False
                    elif heap:
                        # eq.next_tick(), inlined for a live head (the common case)
                        when, _, seq, ev = heap[0]
                        bound = when if ev._seq == seq and ev.when == when else eq.next_tick()
                        enter = bound is None or bound > eq.cur_tick  # else: an event is due
                    else:
                        bound = None
                        enter = True
                elif st is RUNNING_SERVICE:
                    enter = False  # an exit left unserviced (a half entry, a kick)
                else:
                    return  # IDLE or MMIO pending: someone else reschedules us
            else:
                bound = None if ticks is None else eq.cur_tick + ticks
                enter = True
            if enter:
                if self._tc_dirty or self.interrupt_pending or self._extras:
                    if self._before_entry():  # delivery suspended the CPU (x86 INIT)
                        if serve:
                            continue
                        return
                if timer is not None:
                    if bound is None:
                        if timer.deadline_ns is not None:
                            timer.disarm()
                    elif bound != self._armed_bound or timer.deadline_ns is None:
                        self._arm(timer, bound)
                if self._fast_table is not bus.fast:
                    self._refresh_fast()
                if src is None:
                    r = _run_ctx(ctx)
                else:
                    insns = self._insns  # (a perf counter: then also instructions)
                    i0 = insns() if insns is not None else 0
                    c0 = src()
                    r = _run_ctx(ctx)
                    cycles = src() - c0
                    if insns is not None:
                        stats.instructions += insns() - i0
                    stats.cycles += cycles
                    stats.ticks_in_kvm += int(cycles * self._ticks_per_cycle)
                self._pulled_level = _SYNC_NONE
                # r > 0: exits the compiled path answered before this one; < 0: -errno
                reason = self._run_returned(r) if r else words[REASON]
                self.last_exit = reason
                if self._extras:
                    self._after_exit(reason, bound, words[T1])
                if reason == 10:  # KVM_EXIT_INTR
                    fired = self._interrupted(timer, bound)
                else:
                    fired = False
                    self.status = RUNNING_SERVICE
                if parallel:
                    self.fold_stats()  # here, on the vCPU's thread: nobody else touches them
                else:
                    # simulated time follows host time since the run began (service time
                    # included) but never passes the event that bounded the slice; when the
                    # slice timer ended the run, time is at that event (gem5's rule)
                    now = words[NOW] if per_int else -1
                    if now < 0:
                        now = tick0 + int((words[T1] - host0) * per_ns)
                    if bound is not None and (fired or now > bound):
                        now = bound
                    if now > eq.cur_tick:
                        eq.cur_tick = now
                if not serve:
                    return
            if self.status is RUNNING_SERVICE:
                # service the exit at once (it happened before any event now due); the
                # table call is inline, as in _dispatch_exit: one frame less per exit
                try:
                    last = self.last_exit
                    # the handlers' common case, here: an access to an address the bus has
                    # cached as (device, base, end, mapping), the device called from this
                    # frame (the handler's and the bus's frames would cost a sixth of the
                    # exit's Python time). The bus still judges odd answers; anything else
                    # (uncached, unclaimed, across a range's end, reserved by the arch,
                    # string IO) goes to the handler.
                    if last == 6 and inline_mmio:  # KVM_EXIT_MMIO
                        addr, size, is_write = _unpack_mmio_head(view, RUN_PAYLOAD)
                        hit = mhits.get(addr) if size <= 8 else None
                        space, off = mmio, MMIO_DATA
                    elif last == 2 and inline_pio:  # KVM_EXIT_IO
                        is_write, size, addr, count, off = _unpack_io(view, RUN_PAYLOAD)
                        hit = phits.get(addr) if count == 1 and addr not in pio.reserved_ports \
                            else None
                        space = pio
                    else:
                        hit = None
                    if hit is None or addr + size > hit[2]:
                        table[last]()  # type: ignore[index]
                    else:
                        device, base, _, mp = hit
                        ans: Any
                        try:
                            if is_write:
                                ans = device.write(addr - base, mm[off:off + size])
                            else:
                                ans = device.read(addr - base, size)
                        except GuestError:
                            raise
                        except Exception as exc:
                            raise space.device_raised(mp, addr, size,
                                                      "write" if is_write else "read",
                                                      exc) from exc
                        if is_write:
                            if ans is not None:
                                ans = space.write_result(mp, ans)
                        else:
                            if ans.__class__ is not bytes or len(ans) != size:
                                ans = space.odd_answer(mp, addr, size, ans)
                            if ans.__class__ is not PendingAccess:
                                mm[off:off + size] = ans
                                ans = None
                        if ans is not None:
                            self._wait_mmio(ans)
                        elif self.status is RUNNING_SERVICE:
                            self.status = RUNNING_SERVICE_COMPLETION
                except KvmfwError:
                    raise
                except Exception as exc:
                    self._dispatch_failed(exc)
            if machine.stop_requested:
                if self.status is not IDLE:
                    self._schedule_tick(eq.cur_tick)
                return
            if heap and heap[0][0] <= eq.cur_tick:
                if self.status is not IDLE and self.status is not RUNNING_MMIO_PENDING:
                    self._schedule_tick(eq.cur_tick)
                return

    def _run_returned(self, r: int) -> int:
        """The exit reason after ``kvmfw_run_ctx`` returned ``r`` != 0: > 0 after exits the
        compiled path answered (their coalescible writes delivered here; their counts wait
        in C for :meth:`fold_stats`) or
        with writes waiting in the coalesced ring (replayed here, after those: they came
        later), both before the exit is serviced; -EINTR/-EAGAIN (a kick): KVM_EXIT_INTR,
        the ring replayed too (a stop must not leave writes in it); any other -errno is
        an error."""
        if self._fs.counts[LATCHED]:  # coalesced writes the compiled path latched: first
            self._deliver_latched()
        if r > 0:
            if r & _RING_PENDING:
                self._drain_coalesced_mmio()
            return int(self._fs.words[REASON])  # (left by the C entry, as for r == 0)
        if r != _EINTR and r != _EAGAIN:
            raise KvmError("KVM_RUN", -r, f"vcpu {self.id}")
        if self._use_coalesced_mmio:
            self._drain_coalesced_mmio()
        return 10  # KVM_EXIT_INTR

    def _arm(self, timer: RunTimer, bound: int) -> None:
        """Arm the run timer for the host instant that maps to the bounding event, from
        the run's fixed clock base: the same event gives the same deadline, so the timer
        is armed once per event (and its deadline computed once), not on every exit."""
        clock = self._armed_clock = self.machine._clock
        host0, tick0, per_ns = clock
        timer.arm_at(host0 - int((tick0 - bound) // per_ns))
        self._armed_bound = bound

    def _interrupted(self, timer: RunTimer | None, bound: int | None) -> bool:
        """A ``KVM_EXIT_INTR`` (a kick or the run timer): True if the timer bounding the
        slice has fired.

        A kick or the run timer set immediate_exit: clear it or every entry returns at
        once. Kicks are requests whose state (stop, interrupt, event) the loop checks
        before the next entry; the one kick that carries no state is the timer's expiry,
        so if the deadline has passed, it is treated as fired whether its signal ended
        this run or lands now, just before or after the clear."""
        self.stats.exit_signal += 1
        self.status = RUNNING
        self._run.immediate_exit = 0
        if timer is not None and timer.deadline_ns is not None and _now() >= timer.deadline_ns:
            timer.deadline_ns = None  # one-shot: it has fired
            return bound is not None
        return False

    def _before_entry(self) -> bool:
        """The cold part of an entry: push a dirty context, deliver interrupts, ``pre_run``.
        True when the CPU must not enter (interrupt delivery suspended it)."""
        if self._tc_dirty or self.always_sync:
            self.sync_kvm_state(SyncLevel.FULL if self.always_sync else SyncLevel.RUNTIME)
        if self.interrupt_pending and self._deliver_interrupts is not None:
            if self.parallel:
                with self.machine.lock:
                    self._call_hook("deliver_interrupts", self._deliver_interrupts, self)
            else:
                self._call_hook("deliver_interrupts", self._deliver_interrupts, self)
            if self.status is IDLE:
                return True
        if self._pre_run is not None:
            try:
                self._pre_run(self)
            except KvmfwError:
                raise
            except Exception as exc:
                raise PluginHookError("pre_run", _culprit(exc), exc) from exc
        return False

    def _after_exit(self, reason: int, bound: int | None, t1: int) -> None:
        """The cold part of an exit: ``always_sync``'s pull, ``post_run``, the trace. (The
        coalesced ring is not: the C entry reports writes waiting in it, see
        :meth:`_run_returned`, so an exit with an empty ring pays nothing for it.)"""
        if self.always_sync:
            self._pull(SyncLevel.FULL)
        if self._post_run is not None:
            try:
                self._post_run(self, reason)
            except KvmfwError:
                raise
            except Exception as exc:
                raise PluginHookError("post_run", _culprit(exc), exc) from exc
        if self._trace:
            log_run.debug("cpu%d: ran until at most tick %s, exit %s at host %d ns", self.id,
                          bound, _exit_name(reason), t1)

    def _update_extras(self) -> None:
        self._extras = bool(self._always_sync or self._pre_run is not None
                            or self._post_run is not None or self._trace)
        # the C entry looks at the coalesced ring after each KVM_RUN (0: it does not); the
        # offset is the kernel's, bounded here by the run area it has to lie in
        off = self.vcpu.coalesced_ring_offset if self._use_coalesced_mmio else 0
        ok = 0 < off and off + RING_CURSOR + 4 <= self._run_size
        self._ctx.ring_off = off if ok else 0
        self._ctx.cursor_off = off + RING_CURSOR if ok else 0
        no_fast = bool(self._always_sync or self._trace)
        if no_fast != self._no_fast:
            self._no_fast = no_fast
            self._fast_table = _STALE

    @property
    def always_sync(self) -> bool:
        """Push the whole context before every entry and pull it after every exit (each
        exit then reaches Python: the compiled path is not used)."""
        return self._always_sync

    @always_sync.setter
    def always_sync(self, on: bool) -> None:
        self._always_sync = on
        self._update_extras()

    @property
    def use_coalesced_mmio(self) -> bool:
        """Replay the VM's coalesced-MMIO ring after each exit that finds writes in it
        (forced on once a zone is registered: its writes would otherwise be lost)."""
        return self._use_coalesced_mmio

    @use_coalesced_mmio.setter
    def use_coalesced_mmio(self, on: bool) -> None:
        self._use_coalesced_mmio = on
        self._update_extras()

    def set_fastpath(self, on: bool) -> None:
        """Switch the compiled exit path on or off from the next entry (a tool that must
        see every access, such as :func:`kvmfw.testing.trace`, switches it off)."""
        self.fastpath = on
        self._fast_table = _STALE

    def _refresh_fast(self) -> None:
        """Point the compiled path at the bus's current table (built now if needed), or
        switch it off (``fastpath=off``, tracing, ``always_sync``)."""
        if self._fs.counts[0]:  # the counters are per row of the table being replaced
            self._fold_fast()
        if self.fastpath and not self._no_fast:
            tbl: Any = self._bus.fast_table()
            self._fs.use(tbl)
        else:
            tbl = self._bus.fast
            self._fs.use(None)
        self._fast_table = tbl

    def _fold_fast(self) -> None:
        """Account the exits the compiled path answered since the last fold: the vCPU's
        and the bus's counters, the profile's rows. Not on every exit (the counters add up
        in C): with :meth:`fold_stats` and before the table changes."""
        fs = self._fs
        tbl = fs.table
        c = fs.take()
        if tbl is None:
            return
        stats = self.stats
        stats.fast_exits += c[0]  # (vm_exits and the time: counted by the C entry)
        stats.io += c[1]
        stats.mmio += c[2]
        bus = self._bus
        by = fs.by_entry
        for i, e in enumerate(tbl.entries):
            reads, writes = c[RANGE_COUNTS + 2 * i], c[RANGE_COUNTS + 1 + 2 * i]
            if not (reads or writes):
                continue
            key = (e.space, e.name)
            tot = by.get(key)
            if tot is None:
                tot = by[key] = [0, 0]
            tot[0] += reads
            tot[1] += writes
            if e.mapping is None:  # unclaimed: counted as the bus's own path counts them
                space = bus.pio if e.space == "pio" else bus.mmio
                space.unclaimed_reads += reads
                space.unclaimed_writes += writes

    def _deliver_latched(self) -> None:
        """Deliver the coalescible writes the compiled path latched (before Python
        services the exit that ended its call)."""
        fs = self._fs
        fs.counts[LATCHED] = 0
        tbl = fs.table
        if tbl is None:
            return
        if self.parallel:
            with self.machine.lock:
                self._write_latched(fs, tbl)
        else:
            self._write_latched(fs, tbl)

    def _write_latched(self, fs: FastState, tbl: FastTable) -> None:
        for i in tbl.latch_rows:
            la = fs.latches[i]
            if la.set:
                la.set = 0
                n = min(int(la.len), 8)
                e = tbl.entries[i]
                (self._bus.pio if e.space == "pio" else self._bus.mmio).write(
                    int(la.addr), bytes(la.data[0:n]))

    def half_entry(self) -> None:
        """Enter KVM only to complete a pending IO/MMIO (``immediate_exit``), then exit.

        A kick that lands before or during the half entry stays pending (the C helper
        clears ``immediate_exit`` only if it still holds the half entry's own value)."""
        if self._tc_dirty:
            self.sync_kvm_state()
        if self.vcpu.fd < 0 or self._run is None:  # the C helper would touch an unmapped area
            raise KvmError("KVM_RUN", errno.EBADF, f"half entry: vcpu {self.id} is closed")
        r = lib.kvmfw_half_entry(self.vcpu.fd, self._run_addr)
        self.stats.vm_half_entries += 1
        self._runs += 1
        self._pulled_level = SyncLevel.NONE
        if r < 0 and r != _EINTR and r != _EAGAIN:
            raise KvmError("KVM_RUN", -r, "half entry")
        if self.status is RUNNING_SERVICE_COMPLETION:
            self.status = RUNNING

    def _dispatch_exit(self) -> None:
        try:
            (self.exit_table or self._dispatch)[self.last_exit]()  # type: ignore[index]
        except KvmfwError:
            raise
        except Exception as exc:
            self._dispatch_failed(exc)

    def _dispatch_failed(self, exc: Exception) -> None:
        """An exit handler raised (or the reason is beyond the table: the arch's)."""
        reason = self.last_exit or 0
        if isinstance(exc, IndexError | TypeError) and exc.__traceback__ is not None \
                and exc.__traceback__.tb_next is None:  # the table lookup itself failed
            try:
                self._exit_arch_or_unexpected()
            except KvmfwError:
                raise
            except Exception as exc2:
                raise PluginHookError(f"exit handler for {_exit_name(reason)}",
                                      _culprit(exc2), exc2) from exc2
            return
        raise PluginHookError(f"exit handler for {_exit_name(reason)}",
                              _culprit(exc), exc) from exc

    def _traced_dispatch(self, plain: list[Any]) -> list[Any]:
        table = list(plain)
        io, mmio = table[ExitReason.IO], table[ExitReason.MMIO]

        def traced_io() -> None:
            d, size, port, count, _ = _unpack_io(self._map, RUN_PAYLOAD)
            log_io.debug("cpu%d: io %s port %#x size %d count %d", self.id,
                         "out" if d == constants.KVM_EXIT_IO_OUT else "in", port, size, count)
            io()

        def traced_mmio() -> None:
            addr, _, length, is_write = _unpack_mmio(self._map, RUN_PAYLOAD)
            log_io.debug("cpu%d: mmio %s %#x size %d", self.id, "write" if is_write else "read",
                         addr, length)
            mmio()

        table[ExitReason.IO], table[ExitReason.MMIO] = traced_io, traced_mmio
        return table

    # --- exit handlers (one per reason; the table is built in _build_dispatch) ---------

    def _exit_intr(self) -> None:
        self.status = RUNNING

    def _exit_io(self) -> None:
        # (counted by the C entry: stats.io)
        t = _unpack_io(self._view, RUN_PAYLOAD)
        if self.direct_port_io and t[3] == 1:
            direction, size, port, _, off = t
            pio = self._bus.pio
            if port not in pio.reserved_ports:
                mm = self._map
                if direction:
                    pio.write(port, mm[off:off + size])
                else:
                    mm[off:off + size] = pio.read(port, size)
                if self.status is RUNNING_SERVICE:
                    self.status = RUNNING_SERVICE_COMPLETION
                return
        io = IoExit(t)
        fn = self._handle_exit_io
        if fn is None or fn(self, io) is None:
            raise self._error(UnhandledExitError, ExitReason.IO,
                              f"port IO {'out' if io.is_write else 'in'} at port {io.port:#x} "
                              f"(size {io.size}, count {io.count}) that no plugin handles",
                              port=io.port, size=io.size, count=io.count,
                              direction="out" if io.is_write else "in")
        if self.status is RUNNING_SERVICE:
            self.status = RUNNING_SERVICE_COMPLETION

    def _exit_mmio(self) -> None:
        # (counted by the C entry: stats.mmio)
        addr, data, length, is_write = _unpack_mmio(self._view, RUN_PAYLOAD)
        if self._finalize_mmio is not None and self.mmio_remap:
            new = self._finalize_mmio(self, addr)
            if new is not None:
                addr = new
        mmio = self._bus.mmio
        if length > 8:  # the kernel's field is 8 bytes: a larger length is a corrupt exit
            raise self._error(UnhandledExitError, ExitReason.MMIO,
                              f"MMIO exit with length {length} (> 8)", address=addr)
        pending: Any
        if is_write:
            pending = mmio.write(addr, data[:length])
        else:
            pending = mmio.read_or_pending(addr, length)
            if pending.__class__ is not PendingAccess:
                self._map[MMIO_DATA:MMIO_DATA + length] = pending
                pending = None
        if pending is not None:
            self._wait_mmio(pending)
        elif self.status is RUNNING_SERVICE:
            self.status = RUNNING_SERVICE_COMPLETION

    def _wait_mmio(self, pending: PendingAccess) -> None:
        """A device answers later: RUNNING_MMIO_PENDING until it completes the access."""
        self.stats.mmio_pending += 1
        self.status = RUNNING_MMIO_PENDING
        if pending.done:  # completed before we started waiting
            self._mmio_completed(pending)
        else:
            pending.waiter = self._mmio_completed

    def _mmio_completed(self, pending: PendingAccess) -> None:
        if self.status is not RUNNING_MMIO_PENDING:
            return  # the machine was reset or closed meanwhile
        if not pending.is_write:
            self._map[MMIO_DATA:MMIO_DATA + pending.size] = pending.data
        self.finish_mmio_pending()

    def _drain_coalesced_mmio(self) -> None:
        """Replay the VM-wide coalesced-MMIO ring (every vCPU maps the same page).

        One drainer at a time, under the machine lock (devices are only called under it
        from vCPU threads): each entry is consumed before it is delivered and the next
        is read afresh, so none is replayed twice, also when a device replays the ring
        itself from the write delivered to it (the lock is reentrant). :mod:`kvmfw.coalesced`
        reads the ring so that none is lost on kernels whose test for room is wrong."""
        ring = self.vcpu.coalesced_ring
        if ring is None or not ring_pending(ring):
            return  # the common case, without the lock
        with self.machine.lock:
            bus = self.machine.bus
            stats = self.stats
            while (entry := ring_take(ring)) is not None:
                addr, data, pio = entry
                (bus.pio if pio else bus.mmio).write(addr, data)
                stats.coalesced_mmio += 1

    def _exit_hlt(self) -> None:
        self.stats.halt += 1
        if self.interrupt_pending:
            self.status = RUNNING
            return
        log.debug("cpu%d: halted", self.id)
        self.halt()

    def _exit_irq_window(self) -> None:
        self.status = RUNNING
        if self._deliver_interrupts is not None:
            self._call_hook("deliver_interrupts", self._deliver_interrupts, self)

    def _exit_hypercall(self) -> None:
        self.stats.hypercalls += 1
        if self._arch_exit(ExitReason.HYPERCALL):
            return
        hc = self.vcpu.run.hypercall
        raise self._error(UnhandledExitError, ExitReason.HYPERCALL,
                          f"hypercall {hc.nr} that no plugin handles", nr=int(hc.nr),
                          args=[int(a) for a in hc.args])

    def _exit_debug(self) -> None:
        """Breakpoint, watchpoint or single step: to the attached debugger (which stops
        the machine until GDB resumes it); without one, as any unexpected exit."""
        gdb = self.machine.gdb
        if gdb is None:
            self._exit_arch_or_unexpected()
            return
        self.status = RUNNING
        gdb.debug_exit(self)

    def _exit_unknown(self) -> None:
        if self._arch_exit(ExitReason.UNKNOWN):
            return
        hw = int(self.vcpu.run.hw.hardware_exit_reason)
        raise self._error(UnhandledExitError, ExitReason.UNKNOWN,
                          f"KVM_EXIT_UNKNOWN with hardware exit reason {hw:#x}",
                          hardware_exit_reason=hw)

    def _exit_exception(self) -> None:
        if self._arch_exit(ExitReason.EXCEPTION):
            return
        ex = self.vcpu.run.ex
        raise self._error(GuestExceptionError, ExitReason.EXCEPTION,
                          f"guest exception {int(ex.exception)} (error code "
                          f"{int(ex.error_code):#x}) handed to userspace",
                          exception=int(ex.exception), error_code=int(ex.error_code))

    def _exit_shutdown(self) -> None:
        if self.machine.can_reboot():  # a PC resets on a triple fault (QEMU reboots)
            self.stats.system_events += 1
            self.machine.request_reset("the guest triple-faulted (KVM_EXIT_SHUTDOWN)")
            self.status = RUNNING
            return
        raise self._error(TripleFaultError, ExitReason.SHUTDOWN,
                          "the guest triple-faulted (KVM_EXIT_SHUTDOWN): an exception occurred "
                          "while the CPU could not deliver one (bad IDT, GDT or stack)")

    def _exit_fail_entry(self) -> None:
        fe = self.vcpu.run.fail_entry
        code = int(fe.hardware_entry_failure_reason)
        raise self._error(EntryFailureError, ExitReason.FAIL_ENTRY,
                          f"KVM could not enter the guest: hardware entry failure reason "
                          f"{code:#x} on host cpu {int(fe.cpu)} (the vCPU state is invalid)",
                          hardware_entry_failure_reason=code, cpu=int(fe.cpu))

    def _exit_internal_error(self) -> None:
        run = self.vcpu.run
        sub = int(run.internal.suberror)
        ndata = int(run.internal.ndata)
        data = [int(run.internal.data[i]) for i in range(min(ndata, 16))]
        try:
            sub_name = InternalError(sub).name
        except ValueError:
            sub_name = str(sub)
        details: dict[str, Any] = {"suberror": sub, "suberror_name": sub_name, "data": data}
        pc = self._pc()
        where = f" at pc {pc:#x}" if pc is not None else ""
        if sub == InternalError.EMULATION:
            ef = run.emulation_failure
            insn = b""
            has_bytes = constants.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
            if ndata >= 2 and int(ef.flags) & has_bytes:
                n = min(int(ef.insn_size), 15)
                insn = bytes(ef.insn_bytes[0:n])
            details["insn_bytes"] = insn.hex(" ")
            details["pc"] = pc
            shown = f", instruction bytes {insn.hex(' ')}" if insn else ""
            raise self._error(EmulationFailureError, ExitReason.INTERNAL_ERROR,
                              f"KVM's instruction emulator failed{where}{shown} "
                              f"(KVM_INTERNAL_ERROR_EMULATION): this KVM cannot emulate that "
                              f"instruction in this mode", **details)
        raise self._error(InternalKvmError, ExitReason.INTERNAL_ERROR,
                          f"KVM internal error {sub_name}{where} (data "
                          f"{' '.join(hex(d) for d in data) or 'none'})", **details)

    def _exit_system_event(self) -> None:
        self.stats.system_events += 1
        se = self.vcpu.run.system_event
        kind = int(se.type)
        if kind == SystemEvent.SHUTDOWN:
            self.machine.request_exit(0, "guest powered off (system event)")
        elif kind == SystemEvent.RESET:
            self.machine.request_reset("guest requested a reset (system event)")
        elif kind == SystemEvent.CRASH:
            raise self._error(GuestCrashError, ExitReason.SYSTEM_EVENT,
                              "the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)")
        elif kind == SystemEvent.SUSPEND:
            self.halt()
            return
        elif kind == SystemEvent.WAKEUP:
            pass
        elif not self._arch_exit(ExitReason.SYSTEM_EVENT):
            raise self._error(UnhandledExitError, ExitReason.SYSTEM_EVENT,
                              f"unknown system event type {kind}")
        self.status = RUNNING

    def _exit_arch_or_unexpected(self) -> None:
        reason = self.last_exit or 0
        if self._arch_exit(reason):
            return
        raise self._error(UnhandledExitError, reason,
                          f"unexpected exit {_exit_name(reason)} that neither the core nor a "
                          "plugin handles")

    def _arch_exit(self, reason: int) -> bool:
        fn = self._handle_arch_exit
        if fn is None or not fn(self, reason):
            return False
        if self.status is RUNNING_SERVICE:
            self.status = RUNNING
        return True

    # --- CPU-model switching (gem5's switchOut/takeOverFrom; kvmfw.emu) -------------------

    def switch_out(self, *, drain: bool = True) -> None:
        """Stop running this vCPU on KVM so another CPU model can take it over (gem5's
        ``switchOut``): drain the machine (``drain=False``, inside a stopped run: only
        refuse a pending IO/MMIO completion), pull the context in full, mark it
        ``switched_out``. The other model's ``take_over_from(cpu)`` follows."""
        if self.switched_out:
            raise StateError(f"vcpu {self.id} is already switched out")
        if drain:
            self.machine.drain()
        elif self.status in (RUNNING_SERVICE_COMPLETION, RUNNING_MMIO_PENDING) or (
                self.status is RUNNING_SERVICE and self.last_exit in (ExitReason.IO,
                                                                       ExitReason.MMIO)):
            raise StateError(f"vcpu {self.id} is in the middle of an IO/MMIO access; step "
                             "it on KVM first")
        self.get_context(SyncLevel.FULL)
        self.switched_out = True

    def take_over_from(self, other: Any) -> None:
        """Take this vCPU back from the CPU model running it (gem5's ``takeOverFrom``):
        ``other`` (an :class:`kvmfw.emu.EmulatedCPU`) writes its state into the context,
        which is pushed at the next entry."""
        if getattr(other, "cpu", None) is not self:
            raise StateError(f"vcpu {self.id} is not run by {other!r}")
        other.switch_out()

    # --- drain -----------------------------------------------------------------------

    def is_drained(self) -> bool:
        """True when nothing is in flight: no pending IO/MMIO completion and the arch says
        no event is injected or pending inside KVM."""
        if self.status in (RUNNING_SERVICE, RUNNING_SERVICE_COMPLETION, RUNNING_MMIO_PENDING):
            return False
        r = self.hooks.call("arch_is_drained", cpu=self)
        return r is None or bool(r)

    def run_drain(self) -> None:
        """One step towards a drained state (arch ``kvm_run_drain`` or a half entry).

        A pending MMIO access is not entered for: the caller runs events until the device
        completes it (:meth:`Machine.drain`)."""
        if self.status is RUNNING_MMIO_PENDING:
            return
        if self.status is RUNNING_SERVICE:
            self._dispatch_exit()
        if self.status is RUNNING_SERVICE_COMPLETION:
            self.half_entry()
        if self.hooks.call("arch_is_drained", cpu=self) is False:
            if not self.hooks.call("kvm_run_drain", cpu=self):
                self.half_entry()
        if self.is_drained():
            self.drain_pending = False
            self.get_context(SyncLevel.FULL)

    # --- errors and dumps -----------------------------------------------------------------

    def _pc(self) -> int | None:
        try:
            ctx = self.get_context(SyncLevel.RUNTIME)
            pc = getattr(ctx, "pc", None)
            return int(pc) if pc is not None else None
        except Exception:
            return None

    def dump_state(self) -> str:
        """The arch's register dump (``dump_state`` hook), or a note why there is none."""
        try:
            self.get_context(SyncLevel.FULL)
        except Exception as exc:  # a dump must never hide the original error
            return f"(register dump failed: {type(exc).__name__}: {exc})"
        parts: list[str] = []
        arch_seen = False
        for impl in self.hooks.impls("dump_state"):  # the arch's first, then devices
            is_arch = str(impl.plugin_name).startswith("arch:")
            try:
                text = impl.function(*[{"cpu": self}[a] for a in impl.argnames])
            except Exception as exc:
                text = f"(dump by {impl.plugin_name} failed: {type(exc).__name__}: {exc})"
            if is_arch:
                arch_seen = arch_seen or bool(text)
            if text:
                parts.append(text if is_arch else f"--- {impl.plugin_name} ---\n{text}")
        if not arch_seen:
            parts.insert(0, "(the architecture plugin provides no register dump)")
        return "\n".join(parts)

    def _error(self, cls: type[GuestError], reason: int, message: str,
               **details: Any) -> GuestError:
        details.setdefault("vcpu", self.id)
        details.setdefault("exit", _exit_name(reason))
        return cls(f"vcpu {self.id}: {message}", exit_reason=int(reason), details=details,
                   dump=self.dump_state())

    def close(self) -> None:
        """Drop the run-area references (so the vCPU can unmap), the run timer and the
        cycle source's counters; release the kick slot if this thread holds it."""
        if self.vcpu.bound_here:
            self.vcpu.unbind_thread()
        self._run = None
        self._map = self._view = None
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        if self.cycle_source is not None:
            self.cycle_source.close()


def _exit_name(reason: int) -> str:
    try:
        return f"KVM_EXIT_{ExitReason(reason).name}"
    except ValueError:
        return f"exit reason {reason}"


def _owner(fn: Any) -> str:
    mod = getattr(fn, "__module__", None) or getattr(getattr(fn, "__func__", None),
                                                     "__module__", "?")
    return str(mod).split(".")[0]


def _culprit(exc: BaseException) -> str:
    tb = exc.__traceback__
    name = "?"
    while tb is not None:
        mod = tb.tb_frame.f_globals.get("__name__", "?")
        if not str(mod).startswith("kvmfw."):
            name = str(mod)
        tb = tb.tb_next
    return name

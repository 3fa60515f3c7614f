"""``kvmfw run --profile``: where a run's exits go and what they cost.

:class:`ExitProfile` swaps a timing exit table into each vCPU (``KvmCPU.exit_table``) and
timing wrappers around the thread-context sync hooks; without it the run loop pays
nothing (the plain table has no profiling branch). At the end, :meth:`ExitProfile.report`
gives a table of exits by reason and by device (count, share, host time servicing them),
the exits the compiled path answered (:mod:`kvmfw.fastpath`), the sync and run-timer
costs, time in KVM, and the busiest ports and MMIO addresses; and, where KVM has binary
statistics (:mod:`kvmfw.kvmstats`), the kernel's own counters over the run: every exit,
including the ones KVM handled itself (halts, interrupt windows, page faults, in-kernel
devices and emulation), which never reach kvmfw.
"""

from __future__ import annotations

import struct
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from kvmfw.abi import ExitReason, lib
from kvmfw.kvmstats import KvmStats, KvmStatsError
from kvmfw.vcpu import KICK_SIGNAL, RUN_PAYLOAD

if TYPE_CHECKING:
    from kvmfw.cpu import KvmCPU
    from kvmfw.machine import Machine

_now = time.perf_counter_ns
_unpack_io = struct.Struct("<BBHIQ").unpack_from
_unpack_mmio = struct.Struct("<Q8sIB").unpack_from
TOP = 8
"""Ports and addresses listed."""
KERNEL_TOP = 20
"""KVM counters listed (the largest; how many more there are is said)."""


def _reason_name(reason: int) -> str:
    try:
        return ExitReason(reason).name
    except ValueError:
        return str(reason)


class ExitProfile:
    """Exit counts and host time per reason, device, port and address for one machine."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.by_reason: dict[int, list[int]] = {}
        """reason -> [count, ns servicing]"""
        self.by_device: dict[tuple[str, str], list[int]] = {}
        """(space, device) -> [count, ns servicing]"""
        self.ports: Counter[int] = Counter()
        self.addresses: Counter[int] = Counter()
        self.sync: dict[str, list[int]] = {"push (update_kvm_state)": [0, 0],
                                           "pull (update_thread_context)": [0, 0]}
        self.wall_ns = 0
        self._t0 = 0
        self._cpus: list[KvmCPU] = []
        self._kstats: list[tuple[str, KvmStats, dict[str, int]]] = []
        """("vm" or "vcpu", its statistics, their values at the start)"""
        self.kernel: dict[str, dict[str, int]] = {"vm": {}, "vcpu": {}}
        """KVM's counters over the run (set by :meth:`stop`): cumulative ones as the
        change, the others (pages mapped, peaks) as at the end; vCPUs summed."""
        self._kernel_ns: set[str] = set()
        """The counters that are times in nanoseconds."""

    # --- installing ----------------------------------------------------------------------

    def install(self) -> None:
        """Start profiling every vCPU (call before :meth:`Machine.run`)."""
        for cpu in self.machine.cpus:
            self._install(cpu)
        self._open_kernel_stats()
        self._t0 = _now()

    def _open_kernel_stats(self) -> None:
        """Open KVM's statistics of the VM and each vCPU (before the run: on a vCPU the
        ioctl waits for KVM_RUN to return) and note where they start."""
        vm = self.machine.vm
        if vm is None:
            return
        owners = [("vm", vm.fd)] + [("vcpu", c.vcpu.fd) for c in self.machine.cpus]
        try:
            for kind, fd in owners:
                st = KvmStats.open(fd, vm.kvm)
                if st is None:
                    break
                self._kstats.append((kind, st, st.read()))
        except KvmStatsError:
            self._close_kernel_stats()

    def _install(self, cpu: KvmCPU) -> None:
        plain = cpu._dispatch
        table = [self._timed(cpu, reason, fn) for reason, fn in enumerate(plain)]
        cpu.exit_table = table
        for attr, key in (("_update_kvm_state", "push (update_kvm_state)"),
                          ("_update_thread_context", "pull (update_thread_context)")):
            fn = getattr(cpu, attr)
            if fn is not None and not getattr(fn, "_kvmfw_profiled", False):
                setattr(cpu, attr, self._timed_sync(fn, self.sync[key]))
        self._cpus.append(cpu)

    def _timed(self, cpu: KvmCPU, reason: int, fn: Any) -> Any:
        rec = self.by_reason.setdefault(reason, [0, 0])
        bus = self.machine.bus
        if reason in (ExitReason.IO, ExitReason.MMIO):
            # one timed wrapper for both: where the access went (port or address) and the
            # space its device sits in are all that differ
            if reason == ExitReason.IO:
                space, counts = bus.pio, self.ports

                def where() -> int:
                    return int(_unpack_io(cpu._map, RUN_PAYLOAD)[2])
            else:
                space, counts = bus.mmio, self.addresses

                def where() -> int:
                    return int(_unpack_mmio(cpu._map, RUN_PAYLOAD)[0])

            def access() -> None:
                at = where()
                t0 = _now()
                try:
                    fn()
                finally:
                    dt = _now() - t0
                    rec[0] += 1
                    rec[1] += dt
                    counts[at] += 1
                    self._device(space.name, space, at, dt)
            return access

        def other() -> None:
            t0 = _now()
            try:
                fn()
            finally:
                rec[0] += 1
                rec[1] += _now() - t0
        return other

    def _device(self, space_name: str, space: Any, addr: int, dt: int) -> None:
        m = space.lookup(addr)
        if m is not None:
            name = m.name
        else:
            name = next((n for b, e, n in space.reserved() if b <= addr < e), "unclaimed")
        rec = self.by_device.get((space_name, name))
        if rec is None:
            rec = self.by_device[(space_name, name)] = [0, 0]
        rec[0] += 1
        rec[1] += dt

    @staticmethod
    def _timed_sync(fn: Any, rec: list[int]) -> Any:
        def timed(*args: Any) -> Any:
            t0 = _now()
            try:
                return fn(*args)
            finally:
                rec[0] += 1
                rec[1] += _now() - t0
        timed._kvmfw_profiled = True  # type: ignore[attr-defined]
        timed.__module__ = getattr(fn, "__module__", __name__)  # errors name the plugin
        return timed

    def stop(self) -> None:
        """End profiling (the plain exit table again)."""
        self.wall_ns = _now() - self._t0
        for cpu in self._cpus:
            cpu.exit_table = None
            cpu.bind_hooks()  # the plain sync hooks
        try:
            for kind, st, start in self._kstats:
                sums = self.kernel[kind]
                cumulative = {d.name for d in st.descriptors if d.cumulative}
                self._kernel_ns.update(d.name for d in st.descriptors if d.nanoseconds)
                for name, value in st.read().items():
                    v = value - start.get(name, 0) if name in cumulative else value
                    sums[name] = sums.get(name, 0) + v
        except KvmStatsError:
            self.kernel = {"vm": {}, "vcpu": {}}
        finally:
            self._close_kernel_stats()

    def _close_kernel_stats(self) -> None:
        for _, st, _ in self._kstats:
            st.close()
        self._kstats = []

    # --- the report ------------------------------------------------------------------------

    def report(self) -> str:
        """The profile as a text table."""
        if not self.wall_ns:
            self.wall_ns = _now() - self._t0
        cpus = self.machine.cpus
        for c in cpus:
            if not c.parallel:
                c.fold_stats()
        st = [c.stats for c in cpus]
        exits = sum(s.vm_exits for s in st)
        fast = sum(s.fast_exits for s in st)
        in_kvm = sum(s.host_ns_in_kvm for s in st)
        serviced = sum(r[1] for r in self.by_reason.values())
        lines = [f"exit profile: {exits} exits in {self.wall_ns / 1e9:.3f} s host time "
                 f"({fast} answered by the compiled path)",
                 f"  in KVM_RUN {in_kvm / 1e9:.3f} s, servicing exits in Python "
                 f"{serviced / 1e9:.3f} s, run loop and events "
                 f"{max(0, self.wall_ns - in_kvm - serviced) / 1e9:.3f} s"]

        def table(title: str, rows: list[tuple[str, int, int]]) -> None:
            lines.append(f"  {title:<34} {'count':>10} {'share':>7} {'host ms':>10} "
                         f"{'us/exit':>8}")
            for name, n, ns in sorted(rows, key=lambda r: (-r[1], r[0])):
                share = 100.0 * n / exits if exits else 0.0
                per = ns / n / 1000 if n and ns >= 0 else 0.0
                ms = f"{ns / 1e6:10.1f}" if ns >= 0 else f"{'-':>10}"
                lines.append(f"  {name:<34} {n:>10} {share:>6.1f}% {ms} {per:>8.1f}")

        by_reason = [(_reason_name(r), v[0], v[1]) for r, v in self.by_reason.items() if v[0]]
        if fast:
            by_reason.append(("answered in C (compiled path)", fast, -1))
        table("exits by reason", by_reason)
        rows = [(f"{sp} {name}", v[0], v[1]) for (sp, name), v in self.by_device.items()]
        compiled: dict[tuple[str, str], int] = {}
        for c in cpus:
            for key, (reads, writes) in c._fs.by_entry.items():
                compiled[key] = compiled.get(key, 0) + reads + writes
        rows += [(f"{sp} {name} (in C)", n, -1) for (sp, name), n in compiled.items() if n]
        table("exits by device", rows)
        lines.append(f"  {'sync with KVM':<34} {'calls':>10} {'':>7} {'host ms':>10} "
                     f"{'us/call':>8}")
        for name, (n, ns) in self.sync.items():
            lines.append(f"  {name:<34} {n:>10} {'':>7} {ns / 1e6:10.1f} "
                         f"{(ns / n / 1000 if n else 0.0):>8.1f}")
        settime = sum(s.timer_settime for s in st)
        signals = sum(s.exit_signal for s in st)
        per = timer_settime_ns()
        lines.append(f"  run timer: {settime} timer_settime calls (~{per / 1000:.1f} us each, "
                     f"~{settime * per / 1e6:.1f} ms); {signals} exits by kick or timer signal")
        for title, counter, width in (("ports", self.ports, 4), ("addresses", self.addresses, 8)):
            if counter:
                top = ", ".join(f"{a:#0{width + 2}x} {n}" for a, n in counter.most_common(TOP))
                lines.append(f"  top {title} (Python-serviced): {top}")
        lines += self._kernel_lines()
        return "\n".join(lines)

    def _kernel_lines(self) -> list[str]:
        """KVM's own counters: counts largest first, then times (ms), then the VM's page
        mappings."""
        vcpu, vm = self.kernel["vcpu"], self.kernel["vm"]
        if not vcpu:
            return []
        rows = sorted(((n, v) for n, v in vcpu.items() if v and n not in self._kernel_ns),
                      key=lambda r: (-r[1], r[0]))
        shown = [f"{n} {v}" for n, v in rows[:KERNEL_TOP]]
        if len(rows) > KERNEL_TOP:
            shown.append(f"{len(rows) - KERNEL_TOP} others")
        shown += [f"{n.removesuffix('_ns')} {v / 1e6:.1f} ms" for n, v in sorted(vcpu.items())
                  if v and n in self._kernel_ns]
        out = ["  KVM's own counters over the run (all vCPUs; every exit, the ones KVM "
               "handled itself included):"]
        line = "   "
        for item in shown or ["(all zero)"]:
            if len(line) + len(item) + 2 > 96:
                out.append(line.rstrip(","))
                line = "   "
            line += f" {item},"
        out.append(line.rstrip(","))
        pages = [f"{k.removeprefix('pages_')} {vm[k]}" for k in ("pages_4k", "pages_2m", "pages_1g")
                 if vm.get(k)]
        if pages:
            out.append(f"    guest RAM mapped by KVM at the end, in pages: {', '.join(pages)}")
        return out


def timer_settime_ns(n: int = 200) -> float:
    """What one run-timer ``timer_settime`` costs on this host (measured now)."""
    t = lib.kvmfw_timer_create(KICK_SIGNAL, lib.kvmfw_gettid())
    if t < 0:
        return 0.0
    try:
        far = time.monotonic_ns() + 3600 * 10**9
        t0 = _now()
        for i in range(n):
            lib.kvmfw_timer_arm(t, far + i)
        return (_now() - t0) / n
    finally:
        lib.kvmfw_timer_disarm(t)
        lib.kvmfw_timer_delete(t)

"""Rule-based fuzzing of every device model except fw_cfg and virtio (issue 10).

One hypothesis state machine per device drives it the way a hostile guest and an unlucky
host could: accesses of every size (1-8 bytes, odd ones included) at every offset of its
ranges, through a real :class:`~kvmfw.bus.Bus` and directly, interleaved with simulated
time, host input, save/restore into a fresh device and reset. After every step:

* nothing but a typed kvmfw error escapes (the bus wraps the rest: the cause is checked);
* reads return exactly ``size`` bytes and the device never sees an offset outside its range;
* every interrupt line's level is what the device state says, and no line is raised or
  lowered twice in a row (a lost or doubled edge);
* no list/bytearray/deque/dict inside the device grows past a fixed bound;
* ``save()`` is plain JSON, restores into a fresh device that saves identically and answers
  identically, and ``reset()`` gives the power-on state.

Run ``pytest --hypothesis-show-statistics`` for the number of cases;
``KVMFW_FUZZ_EXAMPLES=1000`` runs a longer campaign (default 80 cases of 40 steps each).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import deque
from typing import Any, ClassVar

import pytest
from conftest import Harness, make_harness
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from kvmfw.bus import AddressSpace
from kvmfw.device import Device
from kvmfw.errors import CheckpointError, DeviceError, KvmfwError
from kvmfw.fastpath import LiveConstant

from kvmfw_devices import acpi_pm as pm
from kvmfw_devices import i8042 as kbd
from kvmfw_devices import mc146818 as rtc
from kvmfw_devices import pci_host as pci
from kvmfw_devices import pl011 as pl
from kvmfw_devices import pseudo_op as po
from kvmfw_devices import uart16550 as u
from kvmfw_devices.debug_exit import DebugExit

SIZES = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8])
VALUES = st.one_of(st.integers(0, (1 << 64) - 1), st.sampled_from([0, 0xFF, 0xFFFF_FFFF,
                                                                     (1 << 64) - 1]),
                   st.integers(0, 0xFF))
TICKS = st.sampled_from([0, 1, 1000, 10**6, 10**8, 10**9, 10**10, 10**11])
CONTAINER_LIMIT = 4096
"""No guest-grown container may exceed this (or its power-on length, if larger)."""
HOST_QUEUE_BOUND = u.HOST_QUEUE_LIMIT
"""The UARTs' host-input queues: the console input holds the rest back."""

FUZZ_SETTINGS = settings(max_examples=int(os.environ.get("KVMFW_FUZZ_EXAMPLES", "80")),
                         stateful_step_count=40, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.filter_too_much])


class Spy:
    """Sits between the bus and a device: checks every access the bus hands over."""

    def __init__(self, owner: DeviceMachine, size: int) -> None:
        self.owner, self.size = owner, size

    def read(self, offset: int, size: int) -> bytes:
        assert 0 <= offset and offset + size <= self.size, (offset, size)
        return self.owner.dev.read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        assert 0 <= offset and offset + len(data) <= self.size, (offset, len(data))
        self.owner.dev.write(offset, data)


def _containers(obj: Any, path: str, depth: int = 0) -> list[tuple[str, int]]:
    """(path, len) of every container reachable from a device's attributes."""
    out: list[tuple[str, int]] = []
    items = vars(obj).items() if hasattr(obj, "__dict__") else ()
    for name, value in items:
        if name in ("ctx", "log", "params", "stats", "config", "output", "input") \
                or name.startswith("__"):
            continue
        p = f"{path}.{name}"
        if isinstance(value, list | bytearray | bytes | deque | dict | set | str):
            out.append((p, len(value)))
            if isinstance(value, dict) and depth < 2:
                for k, v in value.items():
                    if isinstance(v, list | bytearray | deque | dict):
                        out.append((f"{p}[{k}]", len(v)))
                    elif type(v).__module__.startswith("kvmfw_devices"):
                        out += _containers(v, f"{p}[{k}]", depth + 1)
        elif type(value).__module__.startswith("kvmfw_devices") and depth < 2:
            out += _containers(value, p, depth + 1)
    return out


class DeviceMachine(RuleBasedStateMachine):
    """The rules every device gets; subclasses name the device and its state-derived IRQs."""

    cls: ClassVar[type[Device]]
    params: ClassVar[dict[str, Any]] = {}
    registers: ClassVar[list[int]] = [0]
    """Offsets worth hitting often (the register map); the whole range is drawn too."""
    base: ClassVar[int] = 0x1000
    reset_ignores: ClassVar[tuple[str, ...]] = ()
    """save() keys reset() keeps by design (e.g. the RTC's battery-backed time)."""

    def __init__(self) -> None:
        super().__init__()
        self.h, self.dev = self.build()
        self.range_size = self.dev.ranges()[0].size
        self.bus = AddressSpace("mmio", unclaimed="ignore", limit=1 << 64)
        self.bus.register(self.base, self.range_size, Spy(self, self.range_size), "dut")
        self.bounds = {p: max(n, CONTAINER_LIMIT) for p, n in _containers(self.dev, "dev")}
        self.typed_errors = 0
        self.levels: dict[int, int] = {}
        """The last level each IRQ line was driven to (to catch doubled edges)."""

    # --- building -----------------------------------------------------------------------

    def make_params(self) -> dict[str, Any]:
        return dict(self.params)

    def build(self, cur_tick: int = 0) -> tuple[Harness, Device]:
        h = make_harness()
        h.ctx.eventq.cur_tick = cur_tick
        return h, self.cls(h.ctx, **self.make_params())

    def teardown(self) -> None:
        self.dev.close()
        self.h.ctx.memory.close()

    # --- what the device state says the lines are ------------------------------------------

    def expected_irqs(self) -> dict[int, bool]:
        return {}

    # --- accesses -------------------------------------------------------------------------

    def offsets(self) -> st.SearchStrategy[int]:
        regs = [r for r in self.registers if r < self.range_size]
        return st.one_of(st.sampled_from(regs), st.integers(0, self.range_size - 1),
                         st.integers(0, min(self.range_size, 0x100) - 1))

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except DeviceError as exc:
            # the bus wraps whatever a device raises: only typed errors are allowed inside
            assert isinstance(exc.__cause__, KvmfwError | None), repr(exc.__cause__)
            self.typed_errors += 1
        except KvmfwError:
            self.typed_errors += 1
        return None

    @rule(data=st.data(), size=SIZES, value=VALUES, via_bus=st.booleans())
    def write(self, data: st.DataObject, size: int, value: int, via_bus: bool) -> None:
        off = min(data.draw(self.offsets(), label="offset"), max(self.range_size - size, 0))
        raw = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if via_bus:
            self._call(self.bus.write, self.base + off, raw)
        else:
            self._call(self.dev.write, off, raw)

    @rule(data=st.data(), size=SIZES, via_bus=st.booleans())
    def read(self, data: st.DataObject, size: int, via_bus: bool) -> None:
        off = min(data.draw(self.offsets(), label="offset"), max(self.range_size - size, 0))
        got = self._call(self.bus.read, self.base + off, size) if via_bus else \
            self._call(self.dev.read, off, size)
        if got is not None:
            assert isinstance(got, bytes) and len(got) == size, (off, size, got)

    @rule(delta=st.integers(-16, 16), size=SIZES, value=VALUES)
    def straddle_the_edges(self, delta: int, size: int, value: int) -> None:
        """Accesses across either end of the range: the device must not see them."""
        for edge in (self.base, self.base + self.range_size):
            addr = edge + delta
            self._call(self.bus.write, addr, bytes(size))
            got = self._call(self.bus.read, addr, size)
            assert got is None or len(got) == size

    @rule(ticks=TICKS)
    def advance(self, ticks: int) -> None:
        eq = self.h.ctx.eventq
        eq.cur_tick += ticks
        self._call(eq.service_due)

    @rule(n=st.integers(1, 4))
    def next_events(self, n: int) -> None:
        eq = self.h.ctx.eventq
        for _ in range(n):
            nt = eq.next_tick()
            if nt is None or nt - eq.cur_tick > 5 * 10**12:
                return
            self._call(eq.service_one)

    # --- state --------------------------------------------------------------------------------

    @rule()
    def save_restore_into_a_fresh_device(self) -> None:
        saved = self.dev.save()
        text = json.dumps(saved)
        assert json.loads(text) == saved, "save() must be plain JSON data"
        lines = {n: line.level for n, line in self.h.irqs.items()}
        h, other = self.build(self.h.ctx.eventq.cur_tick)
        other.restore(json.loads(text))
        assert other.save() == saved
        other.restore(json.loads(text))  # restoring twice changes nothing
        assert other.save() == saved
        for n, level in lines.items():
            assert h.irq(n).level == level, f"IRQ {n} differs after restore"
        self.dev.close()
        self.h.ctx.memory.close()
        self.h, self.dev = h, other
        for n, line in h.irqs.items():
            line.history.clear()  # restore may re-drive a line to its level: allowed
            self.levels[n] = line.level

    @rule(data=st.data())
    def restore_hostile_state(self, data: st.DataObject) -> None:
        """A corrupt or hostile checkpoint: restore() takes it or raises a typed error, and
        a device that took it stays bounded and keeps answering."""
        state = json.loads(json.dumps(self.dev.save()))
        for _ in range(data.draw(st.integers(1, 3), label="mutations")):
            _mutate(state, data)
        h, other = self.build(self.h.ctx.eventq.cur_tick)
        try:
            try:
                other.restore(state)
            except KvmfwError:
                return
            for p, n in _containers(other, "dev"):
                assert n <= self.bounds.get(p, CONTAINER_LIMIT), f"restore let {p} grow to {n}"
            for off in sorted({0, self.range_size - 1, *self.registers[:16]}):
                if off < self.range_size:
                    assert len(other.read(off, 1)) == 1
                    other.write(off, b"\x00")
            h.ctx.eventq.cur_tick += 10**10
            h.ctx.eventq.service_due()
            json.dumps(other.save())
        finally:
            other.close()
            h.ctx.memory.close()

    @rule()
    def reset(self) -> None:
        self.dev.reset()
        _, fresh = self.build(self.h.ctx.eventq.cur_tick)
        want, got = fresh.save(), self.dev.save()
        for key in self.reset_ignores:
            want.pop(key, None)
            got.pop(key, None)
        assert got == want, "reset() must give the power-on state"
        fresh.close()

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def irq_lines_follow_the_state(self) -> None:
        for n, line in self.h.irqs.items():
            last = self.levels.get(n, 0)
            for level in line.history:
                assert level != last, f"IRQ {n} driven to {level} twice in a row"
                last = level
            line.history.clear()
            self.levels[n] = last
        for n, level in self.expected_irqs().items():
            assert self.h.irq(n).level == int(level), f"IRQ {n} is {self.h.irq(n).level}, " \
                f"the state says {int(level)}"

    @invariant()
    def the_compiled_path_reads_what_the_device_reads(self) -> None:
        """Each read the compiled path would answer from a declared constant (one register
        or its start, every byte open) returns what the device's own read returns now."""
        start = self.dev.ranges()[0].base
        for fr in self.dev.fast_ranges():
            if fr.constant is None:
                continue
            live = fr.constant.snapshot() if isinstance(fr.constant, LiveConstant) else \
                list(fr.constant)
            width = fr.width or 1
            for off in range(0, fr.size, width):
                for size in (1, 2, 4, 8):
                    want = live[off:off + size]
                    if size > width or len(want) < size or None in want:
                        break
                    got = self.dev.read(fr.base - start + off, size)
                    assert got == bytes(want), (hex(off), size, got, want)  # type: ignore[arg-type]

    @invariant()
    def containers_stay_bounded(self) -> None:
        for p, n in _containers(self.dev, "dev"):
            assert n <= self.bounds.get(p, CONTAINER_LIMIT), f"{p} grew to {n}"


HOSTILE = st.one_of(
    st.none(), st.booleans(), st.sampled_from([-1, -(1 << 70), 1 << 64, 1 << 200, 1.5, 1e308,
                                               float("inf"), float("nan"), "", "zz", "0" * 9]),
    st.integers(), st.text(max_size=8), st.builds(lambda: [0] * 100_000),
    st.builds(lambda: ["x"]), st.builds(lambda: {"a": 1}), st.just("00" * 200_000),
    st.lists(st.integers(-300, 300), max_size=40))
"""Fresh objects each draw (``_mutate`` changes nested dicts in place)."""


def _mutate(state: Any, data: st.DataObject) -> None:
    """Replace, drop or corrupt one value somewhere in a saved state (nested dicts too)."""
    node = state
    while isinstance(node, dict) and node:
        key = data.draw(st.sampled_from(sorted(node)), label="key")
        child = node[key]
        if isinstance(child, dict) and child and data.draw(st.booleans(), label="descend"):
            node = child
            continue
        how = data.draw(st.sampled_from(["replace", "drop", "extend"]), label="how")
        if how == "drop":
            del node[key]
        elif how == "extend" and isinstance(child, list):
            node[key] = child + [data.draw(HOSTILE, label="item")] * 3
        else:
            node[key] = data.draw(HOSTILE, label="value")
        return


# --- the devices ---------------------------------------------------------------------------


class Uart16550Machine(DeviceMachine):
    cls = u.Uart16550
    params = {"irq": 4, "output": "none", "input": "none"}
    registers = list(range(8))

    def expected_irqs(self) -> dict[int, bool]:
        return {4: self.dev._interrupt_id() != u.IIR_NONE}  # type: ignore[attr-defined]

    @rule(data=st.one_of(st.binary(max_size=40), st.just(bytes(HOST_QUEUE_BOUND + 100))))
    def host_types(self, data: bytes) -> None:
        taken = self.dev.enqueue(data)  # type: ignore[attr-defined]
        assert 0 <= taken <= len(data)

    @rule(n=st.integers(1, 200), value=st.integers(0, 255), mcr=st.integers(0, 0x1F),
          fcr=st.integers(0, 0xFF))
    def flood_thr(self, n: int, value: int, mcr: int, fcr: int) -> None:
        """A guest hammering THR (in loopback or not) must not grow any buffer."""
        dev = self.dev
        dev.write(u.LCR, b"\x03")
        dev.write(u.MCR, bytes((mcr,)))
        dev.write(u.FCR, bytes((fcr,)))
        for _ in range(n):
            dev.write(u.THR, bytes((value,)))
        assert len(dev.rx_fifo) <= u.FIFO_SIZE  # type: ignore[attr-defined]

    @invariant()
    def fifo_within_capacity(self) -> None:
        dev: Any = self.dev
        assert len(dev.rx_fifo) <= u.FIFO_SIZE
        assert bool(dev.lsr & u.LSR_DR) == bool(dev.rx_fifo) or dev.lsr & u.LSR_DR == 0


class RtcMachine(DeviceMachine):
    cls = rtc.Mc146818
    params = {"irq": 8, "clock": "fixed"}
    registers = [0, 1]
    reset_ignores = ("offset",)  # the time survives a reset, as on the battery-backed part

    @rule(index=st.one_of(st.integers(0, 0xFF), st.sampled_from(
        [rtc.REG_A, rtc.REG_B, rtc.REG_C, rtc.REG_D, rtc.REG_SECONDS, rtc.REG_HOURS,
         rtc.REG_CENTURY, rtc.REG_YEAR])), value=st.integers(0, 0xFF), read_back=st.booleans())
    def register_access(self, index: int, value: int, read_back: bool) -> None:
        """An index/data pair, the way every guest drives the part."""
        self.dev.write(0, bytes((index,)))
        if read_back:
            assert len(self.dev.read(1, 1)) == 1
        else:
            self.dev.write(1, bytes((value,)))

    def expected_irqs(self) -> dict[int, bool]:
        return {8: bool(self.dev.cmos[rtc.REG_C] & rtc.C_IRQF)}  # type: ignore[attr-defined]

    @invariant()
    def cmos_is_bytes(self) -> None:
        cmos = self.dev.cmos  # type: ignore[attr-defined]
        assert len(cmos) == rtc.CMOS_SIZE and all(0 <= v <= 0xFF for v in cmos)


class I8042Machine(DeviceMachine):
    cls = kbd.I8042
    params = {"irq": 1, "aux_irq": 12}
    registers = [0, 4]

    def expected_irqs(self) -> dict[int, bool]:
        dev: Any = self.dev
        head = dev.obuf[0] if dev.obuf else None
        return {1: head is not None and not head[1] and bool(dev.command_byte & kbd.CB_KBD_INT),
                12: head is not None and head[1] and bool(dev.command_byte & kbd.CB_AUX_INT)}

    @rule(cmd=st.one_of(st.integers(0, 0xFF), st.sampled_from(
        [kbd.CMD_READ_CB, kbd.CMD_WRITE_CB, kbd.CMD_WRITE_KBD_OBUF, kbd.CMD_WRITE_AUX_OBUF,
         kbd.CMD_WRITE_OUTPORT, kbd.CMD_SELF_TEST, kbd.CMD_RESET])),
        arg=st.integers(0, 0xFF), n=st.integers(1, 40))
    def command_flood(self, cmd: int, arg: int, n: int) -> None:
        for _ in range(n):
            self.dev.write(4, bytes((cmd,)))
            self.dev.write(0, bytes((arg,)))
        assert len(self.dev.obuf) <= kbd.OBUF_LIMIT  # type: ignore[attr-defined]


class AcpiPmMachine(DeviceMachine):
    cls = pm.AcpiPm
    params = {"irq": 9, "clock": "fixed"}
    registers = list(range(pm.RANGE_SIZE))

    def expected_irqs(self) -> dict[int, bool]:
        dev: Any = self.dev
        return {9: bool(dev.sts & dev.en & pm.SCI_SOURCES)}

    @rule()
    def power_button(self) -> None:
        self.dev.power_button()  # type: ignore[attr-defined]

    @rule(size=st.sampled_from([1, 2, 4]))
    def timer_reads_are_monotonic(self, size: int) -> None:
        a = int.from_bytes(self.dev.read(pm.REG_TMR, 4), "little")
        self.h.ctx.eventq.cur_tick += 10**6  # 1 us: 3.58 timer ticks
        b = int.from_bytes(self.dev.read(pm.REG_TMR, 4), "little")
        assert (b - a) & 0xFFFFFF in (3, 4)
        assert len(self.dev.read(pm.REG_TMR, size)) == size


class PciHostMachine(DeviceMachine):
    cls = pci.PciHost
    params = {"ecam": True, "testdev": True, "mmio_base": 0xC0000000, "mmio_size": 0x10000000}
    base = 0xC0000000

    def __init__(self) -> None:
        super().__init__()
        self.cam = pci.ConfigMechanism1(self.dev)  # type: ignore[arg-type]

    def offsets(self) -> st.SearchStrategy[int]:
        dev: Any = self.dev
        near: list[int] = [0, pci.ECAM_BUS_SIZE, 1 << 15, 1 << 12]
        for f in dev.functions.values():
            for i, bar in f.bars.items():
                a = f.bar_address(i) - self.base
                if 0 <= a < self.range_size:
                    near += [a, a + bar.size - 1, a + bar.size]
        near = [n for n in near if 0 <= n < self.range_size]
        return st.one_of(st.sampled_from(near), st.integers(0, self.range_size - 1),
                         st.integers(0, pci.ECAM_BUS_SIZE - 1),
                         st.builds(lambda a, d: a + d, st.sampled_from(near),
                                   st.integers(0, 0x40)).filter(lambda o: o < self.range_size))

    cfg_offsets = st.one_of(st.integers(0, 0x1003), st.sampled_from(
        [pci.CFG_COMMAND, pci.CFG_STATUS, pci.CFG_BAR0, pci.CFG_BAR0 + 8, pci.CFG_BAR0 + 12,
         pci.CFG_INT_LINE, 0xFC, 0xFE, 0xFF, 0x100]))

    @rule(bus=st.sampled_from([0, 0, 0, 1, 255]), dev=st.sampled_from([0, 1, 1, 2, 31]),
          fn=st.sampled_from([0, 0, 1, 7]), offset=cfg_offsets, size=SIZES, value=VALUES,
          is_write=st.booleans())
    def config_access(self, bus: int, dev: int, fn: int, offset: int, size: int, value: int,
                      is_write: bool) -> None:
        host: Any = self.dev
        if is_write:
            host.config_write(bus, dev, fn, offset, size, value & ((1 << (8 * size)) - 1))
        else:
            got = host.config_read(bus, dev, fn, offset, size)
            assert 0 <= got < 1 << (8 * size)

    @rule(bar=st.sampled_from([0, 2]), where=st.integers(0, 0x0FFFFFFF),
          high=st.sampled_from([0, 0, 1, 0xFFFFFFFF]), enable=st.booleans())
    def program_bar(self, bar: int, where: int, high: int, enable: bool) -> None:
        """Place the test device's BARs (in or out of the aperture) and toggle decoding."""
        host: Any = self.dev
        addr = (self.base + where) & 0xFFFFFFF0
        host.config_write(0, 1, 0, pci.CFG_BAR0 + 4 * bar, 4, addr)
        if bar == 2:
            host.config_write(0, 1, 0, pci.CFG_BAR0 + 12, 4, high)
        host.config_write(0, 1, 0, pci.CFG_COMMAND, 2, pci.CMD_MEM if enable else 0)

    @rule(offset=st.integers(0, 7), size=SIZES, value=VALUES, is_write=st.booleans())
    def mechanism1(self, offset: int, size: int, value: int, is_write: bool) -> None:
        size = min(size, 8 - offset) or 1
        if is_write:
            self.cam.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        else:
            assert len(self.cam.read(offset, size)) == size

    @rule()
    def save_restore_into_a_fresh_device(self) -> None:
        super().save_restore_into_a_fresh_device()
        address = self.cam.address
        self.cam = pci.ConfigMechanism1(self.dev)  # type: ignore[arg-type]
        self.cam.address = address

    @invariant()
    def config_space_is_256_bytes(self) -> None:
        for f in self.dev.functions.values():  # type: ignore[attr-defined]
            assert len(f.config) == pci.CFG_SIZE


class Pl011Machine(DeviceMachine):
    cls = pl.Pl011
    params = {"irq": 1, "output": "none", "input": "none"}
    registers = [pl.DR, pl.RSR, pl.FR, pl.ILPR, pl.IBRD, pl.FBRD, pl.LCR_H, pl.CR, pl.IFLS,
                 pl.IMSC, pl.RIS, pl.MIS, pl.ICR, pl.DMACR, 0xFE0, 0xFFC, 0xFFF]

    def expected_irqs(self) -> dict[int, bool]:
        dev: Any = self.dev
        return {1: bool(dev.ris & dev.imsc)}

    @rule(data=st.one_of(st.binary(max_size=40), st.just(bytes(HOST_QUEUE_BOUND + 100))))
    def host_types(self, data: bytes) -> None:
        taken = self.dev.enqueue(data)  # type: ignore[attr-defined]
        assert 0 <= taken <= len(data)

    @rule(n=st.integers(1, 200), loop=st.booleans())
    def flood_dr(self, n: int, loop: bool) -> None:
        dev: Any = self.dev
        dev.write(pl.CR, (0x381 if loop else 0x301).to_bytes(4, "little"))
        for i in range(n):
            dev.write(pl.DR, bytes((i & 0xFF,)))
        assert len(dev.rx_fifo) <= pl.FIFO_DEPTH

    @invariant()
    def fifo_within_capacity(self) -> None:
        assert len(self.dev.rx_fifo) <= pl.FIFO_DEPTH  # type: ignore[attr-defined]


PSEUDO_OP_DIR = tempfile.mkdtemp(prefix="kvmfw-stateful-pseudo-op-")


class PseudoOpMachine(DeviceMachine):
    cls = po.PseudoOp
    base = po.WINDOW_SIZE * 16
    registers = [0, 8, 0x28, po.REG_RESULT, po.REG_MAGIC, po.BUF_OFFSET, po.WINDOW_SIZE - 8,
                 po.WINDOW_SIZE - 1] + [op << 8 for op in po.OP_NAMES if op != po.OP_EXIT]

    def make_params(self) -> dict[str, Any]:
        return {"dir": PSEUDO_OP_DIR, "base": self.base}

    @rule(op=st.sampled_from(sorted(po.OP_NAMES)), args=st.lists(VALUES, min_size=6,
          max_size=6), n=st.integers(1, 64))
    def operation(self, op: int, args: list[int], n: int) -> None:
        """An operation with chosen arguments, repeated (work ids vary, as a flood would)."""
        dev: Any = self.dev
        for i in range(n):
            dev.args = [(a + i) & po.MASK64 for a in args]
            got = dev.read(op << 8, 8)
            assert len(got) == 8

    @invariant()
    def args_are_u64(self) -> None:
        dev: Any = self.dev
        assert len(dev.args) == po.NUM_ARGS and all(0 <= a <= po.MASK64 for a in dev.args)
        assert len(dev.buffer) == po.BUF_SIZE


class DebugExitMachine(DeviceMachine):
    cls = DebugExit
    params = {"width": 4}
    registers = [0, 1, 2, 3]

    @invariant()
    def every_write_asks_to_exit(self) -> None:
        assert len(self.h.exits) == self.dev.stats["exits"]


def _case(machine: type[DeviceMachine]) -> Any:
    case = machine.TestCase
    case.settings = FUZZ_SETTINGS
    return case


TestUart16550 = _case(Uart16550Machine)
TestRtc = _case(RtcMachine)
TestI8042 = _case(I8042Machine)
TestAcpiPm = _case(AcpiPmMachine)
TestPciHost = _case(PciHostMachine)
TestPl011 = _case(Pl011Machine)
TestPseudoOp = _case(PseudoOpMachine)
TestDebugExit = _case(DebugExitMachine)


# --- regression tests for what the machines found ------------------------------------------

MACHINES: list[type[DeviceMachine]] = [Uart16550Machine, RtcMachine, I8042Machine,
                                       AcpiPmMachine, PciHostMachine, Pl011Machine,
                                       PseudoOpMachine, DebugExitMachine]


def _fresh(machine: type[DeviceMachine]) -> Device:
    return machine.build(machine.__new__(machine))[1]


@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.cls.name)
@pytest.mark.parametrize("corrupt", ["not a mapping", "wrong types", "huge lists"])
def test_corrupt_saved_state_is_a_checkpoint_error(machine: type[DeviceMachine],
                                                   corrupt: str) -> None:
    """Missing keys, wrong types and oversized lists were KeyError/ValueError/TypeError (or
    silently accepted, growing host memory); now a CheckpointError that changes nothing."""
    dev = _fresh(machine)
    good = dev.save()
    if corrupt == "not a mapping":
        bad: Any = [good]
    elif corrupt == "wrong types":
        bad = {k: "zz" for k in good} or {"last_value": "zz"}
    else:
        bad = {k: [0] * 100_000 if isinstance(v, list) else v for k, v in good.items()}
        if bad == good:
            bad = {k: 1 << 80 for k in good}
        if "functions" in bad:
            bad = {"functions": {"0": {"config": "00" * 100_000}}}
    with pytest.raises(CheckpointError, match=dev.name):
        dev.restore(bad)
    assert dev.save() == good, "a refused state must leave the device as it was"
    dev.close()


def test_refused_restore_is_atomic() -> None:
    dev = _fresh(Uart16550Machine)
    good = dev.save()
    bad = {**good, "scr": 0x5A, "host_queue": "x"}  # a valid register before a bad key
    with pytest.raises(CheckpointError):
        dev.restore(bad)
    assert dev.save() == good


def test_uart_fifos_restore_within_the_hardware() -> None:
    """A checkpoint could put 100000 bytes in a 16-byte FIFO (old: accepted)."""
    for machine, key in ((Uart16550Machine, "rx_fifo"), (Pl011Machine, "rx_fifo")):
        dev = _fresh(machine)
        with pytest.raises(CheckpointError, match=key):
            dev.restore({**dev.save(), key: [0x41] * 17})


def test_pl011_registers_restore_within_their_widths() -> None:
    """Old: ``int(state[key])`` unmasked, so IBRD = -1 or 2**80 was taken as is."""
    dev = _fresh(Pl011Machine)
    for value in (-1, 1 << 80):
        with pytest.raises(CheckpointError, match="ibrd"):
            dev.restore({**dev.save(), "ibrd": value})


def test_rtc_clock_offset_is_bounded_on_restore() -> None:
    """Old: an offset of 1e300 was taken and the next time read raised OverflowError."""
    dev = _fresh(RtcMachine)
    for value in (1e300, float("nan"), -1e15):
        with pytest.raises(CheckpointError, match="offset"):
            dev.restore({**dev.save(), "offset": value})
    dev.write(0, b"\x00")
    assert len(dev.read(1, 1)) == 1


def test_pci_host_refuses_a_foreign_function() -> None:
    dev = _fresh(PciHostMachine)
    state = dev.save()
    state["functions"]["99"] = state["functions"]["0"]
    with pytest.raises(CheckpointError, match="99"):
        dev.restore(state)


def test_pseudo_op_work_items_are_bounded() -> None:
    """A guest beginning work items it never ends grew ``work`` without limit."""
    dev: Any = _fresh(PseudoOpMachine)
    for i in range(po.MAX_WORK_ITEMS + 500):
        dev.args[0], dev.args[1] = i, 7
        dev.read(po.OP_WORK_BEGIN << 8, 8)
    assert len(dev.work) == po.MAX_WORK_ITEMS
    assert dev.result == po.FAILED  # the 1025th open item fails
    dev.args[0] = 0
    assert dev.read(po.OP_WORK_END << 8, 8) == bytes(8)  # ending one frees a slot
    dev.args[0] = 99_999
    assert dev.read(po.OP_WORK_BEGIN << 8, 8) == bytes(8)


def _drain_uart(dev: Any, h: Harness, n: int) -> bytes:
    """Read ``n`` bytes through RBR as a polling guest would (servicing host input)."""
    got = bytearray()
    eq = h.ctx.eventq
    idle = 0
    while len(got) < n and idle < 10_000:
        eq.service_due()
        if dev.read(u.LSR, 1)[0] & u.LSR_DR:
            got += dev.read(u.RBR, 1)
            idle = 0
        else:
            idle += 1
    return bytes(got)


def test_console_input_is_throttled_not_piled_up_or_lost() -> None:
    """64 KiB of console input went into the UART's host queue at once (old: the queue grew
    with whatever the host sent, without bound); now at most HOST_QUEUE_LIMIT bytes wait in
    the device, the rest in the console input, and every byte arrives in order."""
    from kvmfw_devices.console import ConsoleInput

    data = bytes((i * 7 + i // 256) & 0xFF for i in range(64 * 1024))
    h = make_harness()
    h.ctx.console_input = data
    dev: Any = u.Uart16550(h.ctx, output="none", input="console")
    dev.write(u.FCR, b"\x01")
    h.ctx.eventq.service_due()
    assert len(dev.host_queue) <= 4096 and u.HOST_QUEUE_LIMIT <= 4096
    assert isinstance(dev.input, ConsoleInput)
    assert _drain_uart(dev, h, len(data)) == data
    dev.close()


def test_a_fast_input_file_is_read_at_the_guests_pace(tmp_path: Any) -> None:
    """``input=file:`` of a large file (or /dev/zero) made the reader thread pile the whole
    file into host memory; now it stops at INBOX_LIMIT and resumes as the guest reads."""
    import time

    from kvmfw_devices import console

    path = tmp_path / "input.bin"
    data = bytes((i * 13 + i // 512) & 0xFF for i in range(1 << 20))
    path.write_bytes(data)
    h = make_harness()
    dev: Any = u.Uart16550(h.ctx, output="none", input=f"file:{path}")
    try:
        deadline = time.monotonic() + 60
        while len(dev.input._inbox) < console.INBOX_LIMIT and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # a reader that does not stop would read on meanwhile
        assert len(dev.input._inbox) <= console.INBOX_LIMIT + console.READ_CHUNK
        n = console.INBOX_LIMIT + 2 * u.HOST_QUEUE_LIMIT + 100  # beyond what was read ahead
        got = bytearray()
        while len(got) < n and time.monotonic() < deadline:
            got += _drain_uart(dev, h, n - len(got))
        assert bytes(got) == data[:n]
        assert len(dev.input._inbox) <= console.INBOX_LIMIT + console.READ_CHUNK
    finally:
        dev.close()


def _pseudo_op_call(dev: Any, op: int, *args: int) -> int:
    dev.args = list(args) + [0] * (po.NUM_ARGS - len(args))
    return int.from_bytes(dev.read(op << 8, 8), "little")


def test_pseudo_op_readfile_reads_straight_into_guest_ram(tmp_path: Any) -> None:
    """readfile allocated a host copy as large as the guest asked for (up to guest RAM) before
    copying it in; now the file is read into guest RAM directly."""
    import tracemalloc

    (tmp_path / "big").write_bytes(bytes(range(256)) * 2048)  # 512 KiB
    h = make_harness()
    dev: Any = po.PseudoOp(h.ctx, dir=str(tmp_path))
    h.ctx.memory.write(0x100, b"big\0")
    tracemalloc.start()
    try:
        assert _pseudo_op_call(dev, po.OP_READ_FILE, 0x10000, 512 * 1024, 0, 0x100) == 512 * 1024
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"{peak} bytes allocated for a 512 KiB readfile"
    assert h.ctx.memory.read(0x10000 + 1000, 4) == bytes((1000 + i) & 0xFF for i in range(4))
    assert _pseudo_op_call(dev, po.OP_WRITE_FILE, 0x10000, 4096, 8, 0x100) == 4096
    assert (tmp_path / "big").read_bytes()[8:8 + 4096] == (bytes(range(256)) * 16)


def test_pseudo_op_file_ops_refuse_a_fifo(tmp_path: Any) -> None:
    """A named pipe in the pseudo-op directory blocked the machine thread in open() forever
    (readfile with no writer, writefile with no reader); now the operation fails at once."""
    import os
    import threading

    os.mkfifo(tmp_path / "pipe")
    h = make_harness()
    dev: Any = po.PseudoOp(h.ctx, dir=str(tmp_path))
    h.ctx.memory.write(0x100, b"pipe\0")
    results: list[int] = []

    def ops() -> None:
        results.append(_pseudo_op_call(dev, po.OP_READ_FILE, 0x1000, 16, 0, 0x100))
        results.append(_pseudo_op_call(dev, po.OP_WRITE_FILE, 0x1000, 16, 0, 0x100))

    t = threading.Thread(target=ops, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "a pseudo-op file operation blocked on a FIFO"
    assert results == [po.FAILED, po.FAILED]


def test_pseudo_op_warnings_do_not_flood_the_log(tmp_path: Any, caplog: Any) -> None:
    """Every refused file name or missing service logged a warning: a guest in a loop could
    write the host's log without bound."""
    h = make_harness()
    h.ctx.services.clear()
    dev: Any = po.PseudoOp(h.ctx, dir=str(tmp_path))
    h.ctx.memory.write(0x100, b"../escape\0")
    with caplog.at_level("WARNING"):
        for _ in range(500):
            assert _pseudo_op_call(dev, po.OP_READ_FILE, 0x1000, 4, 0, 0x100) == po.FAILED
            assert _pseudo_op_call(dev, po.OP_DUMP_STATS) == po.FAILED
    assert len(caplog.records) <= 2 * po.WARN_LIMIT
    assert dev.stats["warnings"] == 1000


@pytest.mark.parametrize(("cls", "params"), [
    (kbd.I8042, {"reset_status": "-1"}),
    (kbd.I8042, {"reset_status": "99999999999999999999"}),
    (pm.AcpiPm, {"s5_typ": "99"}),
    (DebugExit, {"width": "3"}),
    (DebugExit, {"iosize": "0x10000"}),
    (po.PseudoOp, {"dir": "/nonexistent/kvmfw-pseudo-op"}),
], ids=lambda v: str(v))
def test_device_keys_out_of_range_are_config_errors(cls: type[Device],
                                                     params: dict[str, str]) -> None:
    """These were accepted silently: an exit status the OS truncates, an S5 type that can
    never match, a register width QEMU does not have, a directory that does not exist."""
    from kvmfw.errors import ConfigError

    h = make_harness()
    with pytest.raises(ConfigError, match=cls.name):
        cls(h.ctx, **params)

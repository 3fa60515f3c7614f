"""AArch32 guests (``arm_features=el1_32bit``): the register view, ELF32/zImage parsing
(any host) and, on a real arm64 KVM, the 32-bit test guest (guests/a32guest.S): VFP/NEON
result on the PL011, PSCI, an SPI and the virtual timer through the vGICv3, and its state
through save/restore. Where the host CPU has no AArch32 EL1 the refusal is what is tested."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from kvmfw_armv8 import aarch32, guests
from kvmfw_armv8.context import ArmV8Context

from kvmfw.errors import ImageError

# --- pure logic ----------------------------------------------------------------------------


def test_banked_registers_map_onto_kvm_regs_as_regmap_c() -> None:
    ctx = ArmV8Context()
    ctx.x[:] = list(range(100, 131))
    v = aarch32.A32View(ctx)
    ctx.pstate = 0x1D3  # svc
    assert (v.mode, v.r(0), v.r(12), v.r(13), v.r(14)) == ("svc", 100, 112, 119, 118)
    assert (v.r(13, "usr"), v.r(14, "sys"), v.r(13, "irq"), v.r(14, "irq")) == (113, 114, 117, 116)
    assert (v.r(13, "abt"), v.r(14, "und"), v.r(13, "hyp")) == (121, 122, 115)
    assert [v.r(n, "fiq") for n in range(8, 15)] == list(range(124, 131))
    assert v.r(8, "irq") == 108
    v.set_r(13, 0xDEAD, "irq")
    assert ctx.x[17] == 0xDEAD
    ctx.clean(ctx.dirty)
    v.set_r(15, 0x4000_0001)
    assert ctx.pc == 0x4000_0001 and ctx.dirty
    with pytest.raises(ValueError):
        v.r(16)
    with pytest.raises(ValueError):
        v.r(1, "bogus")


def test_vfp_spsr_fpscr_cp15_views() -> None:
    ctx = ArmV8Context()
    v = aarch32.A32View(ctx)
    ctx.v[3] = (0x1111 << 64) | 0x2222
    assert (v.d(6), v.d(7), v.q(3)) == (0x2222, 0x1111, ctx.v[3])
    v.set_d(7, 0xABC)
    assert ctx.v[3] == (0xABC << 64) | 0x2222
    v.fpscr = 0xF8C0_009F | 0x0040_0000
    assert (ctx.fpsr, ctx.fpcr, v.fpscr) == (0xF800009F, 0x00C00000, 0xF8C0009F)
    for i, mode in enumerate(aarch32.SPSR_MODES):
        v.set_spsr(0x10 + i, mode)
    assert list(ctx.spsr) == [0x10, 0x11, 0x12, 0x13, 0x14]
    with pytest.raises(ValueError):
        v.spsr("usr")
    from kvmfw_armv8 import regs
    ctx.sysregs[regs.id_of("FAR_EL1")] = (0x1234 << 32) | 0x5678
    ctx.sysregs[regs.id_of("MAIR_EL1")] = 0
    assert (v.cp15("DFAR"), v.cp15("ifar")) == (0x5678, 0x1234)
    v.set_cp15("NMRR", 0xFF)
    assert ctx.sysregs.by_name("MAIR_EL1") == 0xFF << 32
    with pytest.raises(ValueError):
        v.cp15("NOPE")
    d = v.as_dict()
    assert d["d7"] == 0xABC and d["spsr_fiq"] == 0x14 and d["dfar"] == 0x5678
    assert "AArch32" in aarch32.format_context(ctx)


def test_elf32_guest_parses_and_bad_elf32_is_an_image_error() -> None:
    data = guests.A32GUEST_ELF.read_bytes()
    entry, segs = aarch32.parse_elf32(data)
    assert entry == guests.LOAD_ADDR and segs[0].addr == guests.LOAD_ADDR
    assert guests.A32GUEST_BIN.read_bytes().startswith(segs[0].data[:64])
    bad = bytearray(data)
    struct.pack_into("<H", bad, 18, 183)  # EM_AARCH64
    with pytest.raises(ImageError, match="not ARM"):
        aarch32.parse_elf32(bytes(bad))
    bad = bytearray(data)
    struct.pack_into("<H", bad, 44, 0xFFFF)  # phnum
    with pytest.raises(ImageError):
        aarch32.parse_elf32(bytes(bad))
    with pytest.raises(ImageError):
        aarch32.parse_elf32(data[:40])


def test_zimage_header_checked() -> None:
    img = bytearray(0x1000)
    struct.pack_into("<III", img, 0x24, aarch32.ZIMAGE_MAGIC, 0, len(img))
    assert aarch32.is_zimage(bytes(img)) and aarch32.parse_zimage(bytes(img)) == (0, 0x1000)
    struct.pack_into("<II", img, 0x28, 0x1000, 0x10)  # end < start
    with pytest.raises(ImageError, match="does not describe"):
        aarch32.parse_zimage(bytes(img))
    with pytest.raises(ImageError, match="not an ARM zImage"):
        aarch32.parse_zimage(bytes(0x100))


def test_boot_registers_linux_arm_protocol() -> None:
    ctx = ArmV8Context()
    aarch32.boot_registers(ctx, 0x4000_8001, 0x4400_0000)
    v = aarch32.A32View(ctx)
    assert (v.r(0), v.r(1), v.r(2), v.pc, v.mode) == (0, 0xFFFFFFFF, 0x4400_0000, 0x4000_8000,
                                                      "svc")
    assert v.cpsr & aarch32.CPSR_T and v.cpsr & 0x1C0 == 0x1C0


# --- on a real arm64 KVM -------------------------------------------------------------------------

RAM = 0x4000_0000
STOP_AT_CHECKPOINT = 0x28


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)

    def flush(self) -> None:
        pass


def _host_has_el1_32bit() -> tuple[bool, str]:
    from kvmfw_armv8.testing import arm64_kvm_unavailable_reason
    if arm64_kvm_unavailable_reason() is not None:
        return False, "no arm64 KVM"
    import fcntl
    import os
    fd = os.open("/dev/kvm", os.O_RDWR)
    try:
        ok = fcntl.ioctl(fd, 0xAE03, aarch32.abi.KVM_CAP_ARM_EL1_32BIT) > 0  # CHECK_EXTENSION
    finally:
        os.close(fd)
    return ok, ""


@pytest.fixture
def build() -> Iterator[Any]:
    """``build(image, stop_at_checkpoint=False)`` -> (machine, test device, console)."""
    from kvmfw_armv8 import plugin
    from kvmfw_armv8.testing import TestDevice, host_gic

    from kvmfw.device import Range
    from kvmfw.machine import Machine, MachineConfig

    made: list[Any] = []

    def make(image: str = str(guests.A32GUEST_ELF),
             stop_at_checkpoint: bool = False) -> tuple[Any, Any, Sink]:
        sink = Sink()
        cfg = MachineConfig(arch="armv8", memory=64 << 20, cpus=1, use_perf=False,
                            options={"arm_features": "el1_32bit", "gic": host_gic(),
                                     "console_output": sink})
        m = Machine(cfg, arch_plugin=plugin, arch_name="armv8")
        made.append(m)
        dev = TestDevice(m, pause=False)  # 0x28 is this guest's own stop point
        spi = plugin.irq_line(machine=m, number=guests.TEST_SPI)
        dev.on_ready = spi.raise_
        dev.on_irq = lambda intid: spi.lower() if intid == 32 + guests.TEST_SPI else None
        if stop_at_checkpoint:
            plain = dev.write

            def write(offset: int, data: bytes) -> None:
                plain(offset, data)
                if offset == STOP_AT_CHECKPOINT:
                    m.request_exit(0, "checkpoint")
            dev.write = write  # type: ignore[method-assign]
        m.map_device(Range("mmio", guests.TESTDEV_BASE, 0x1000, "testdev"), dev)
        m.hooks.call("load_guest", machine=m, image=image, options={})
        return m, dev, sink

    yield make
    for m in made:
        m.close()


def _reports(dev: Any) -> str:
    return str([(hex(o), hex(v)) for o, v in dev.writes])


@pytest.mark.arm64_kvm
def test_el1_32bit_refused_cleanly_where_the_host_cpu_lacks_it(build: Any) -> None:
    """Where KVM does not report KVM_CAP_ARM_EL1_32BIT, the machine is refused with the
    host requirement (status 8), before any guest code runs."""
    ok, _ = _host_has_el1_32bit()
    if ok:
        pytest.skip("this host CPU implements AArch32 EL1 (the guest tests run instead)")
    from kvmfw_armv8.plugin import ArmFeatureError
    with pytest.raises(ArmFeatureError, match="AArch32 at EL1") as exc:
        build()
    assert exc.value.exit_status == 8 and "KVM_CAP_ARM_EL1_32BIT" in str(exc.value)


def _need_el1_32bit() -> None:
    ok, _ = _host_has_el1_32bit()
    if not ok:
        pytest.skip("host CPU without AArch32 EL1: the refusal test covers it")


@pytest.mark.arm64_kvm
def test_a32_guest_vfp_neon_pl011_psci_spi_and_timer(build: Any) -> None:
    _need_el1_32bit()
    from kvmfw.errors import RunTimeoutError

    m, dev, sink = build()
    try:
        res = m.run(timeout=120)
    except RunTimeoutError:
        pytest.fail(f"no power-off in 120 s; reports {_reports(dev)}; console {bytes(sink.data)!r}"
                    f"\n{m.cpus[0].dump_state()}")
    assert res.status == 0, f"{res.reason}; reports {_reports(dev)}\n{m.cpus[0].dump_state()}"
    assert b"A32 RESULT 465\n" in sink.data, bytes(sink.data)
    assert dev.results == [guests.A32_RESULT, guests.A32_STATE_OK], _reports(dev)
    psci = dev.value(0x30)
    assert psci is not None and (psci >> 16, psci & 0xFFFF) >= (0, 2), hex(psci or 0)  # 1.1 here
    assert dev.irqs == [32 + guests.TEST_SPI, 27], _reports(dev)
    assert dev.value(0x08) is not None and dev.value(0x50) is None
    text = m.cpus[0].dump_state()
    assert "AArch32: PC" in text and "spsr_irq" in text


@pytest.mark.arm64_kvm
def test_a32_state_round_trips_through_save_restore(build: Any) -> None:
    """Stop at the guest's checkpoint write, save the vCPU and RAM, restore both into a new
    machine, resume there: the guest finds every register it set (banked IRQ r13/r14, SPSR,
    d8-d15, FPSCR) and runs to the end."""
    _need_el1_32bit()
    from kvmfw_armv8.aarch32 import A32View

    from kvmfw.hookspecs import SyncLevel

    m1, dev1, _ = build(stop_at_checkpoint=True)
    res = m1.run(timeout=120)
    assert res.reason == "checkpoint", f"{res.reason}; {_reports(dev1)}"
    cpu = m1.cpus[0]
    state = m1.hooks.call("save_arch_state", cpu=cpu)
    v1 = A32View(cpu.get_context(SyncLevel.FULL)).as_dict()
    assert (v1["r4"], v1["r11"], v1["r14_irq"], v1["spsr_irq"], v1["fpscr"]) == (
        4, 0xB0B0B0B0, 0x1414, 0x600001D3, 0x00C00000)
    assert v1["d8"] == 0x1234567812345678 and v1["sctlr"] & 1 == 0
    ram = m1.memory.read(RAM, 1 << 20)

    m2, dev2, sink2 = build()
    m2.memory.write(RAM, ram)
    m2.hooks.call("restore_arch_state", cpu=m2.cpus[0], state=state)
    assert A32View(m2.cpus[0].get_context(SyncLevel.FULL)).as_dict() == v1
    res = m2.run(timeout=120)
    assert res.status == 0, f"{res.reason}; {_reports(dev2)}\n{m2.cpus[0].dump_state()}"
    assert dev2.results == [guests.A32_STATE_OK], _reports(dev2)
    assert dev2.irqs == [32 + guests.TEST_SPI, 27]


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")
def test_host_support_asks_kvm_and_states_the_cpu_requirement() -> None:
    """The capability check is KVM's answer (any host's /dev/kvm): where it is 0 (x86, or
    an AArch64-only arm64 CPU) the reason names what the host CPU must offer."""
    import platform

    from kvmfw.kvm import Kvm

    with Kvm() as kvm:
        ok, why = aarch32.host_support(kvm)
    if platform.machine() == "x86_64":
        assert not ok
    if not ok:
        assert "KVM_CAP_ARM_EL1_32BIT" in why and "AArch32 at EL1" in why

"""Real guests in each mode compute and report a known result; loaders set the entry state."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import GUESTS, requires_kvm
from kvmfw.device import Range
from kvmfw.errors import TripleFaultError

from kvmfw_x86 import loaders
from kvmfw_x86.plugin import GUESTS as EMBEDDED

pytestmark = [requires_kvm, pytest.mark.kvm]


def test_real_mode_flat_binary(machine_factory) -> None:
    m, rep = machine_factory()
    loaders.load(m, str(GUESTS / "real.bin"), {"load_addr": 0x7C00})
    m.cpus[0].get_context().rbx = 41  # host write the guest reads
    r = m.run(timeout=10)
    assert r.reason == "reporter: guest done"
    assert rep.values == [5050, 42]
    assert m.cpus[0].get_context().mode == "real"


def test_protected_mode_elf32(machine_factory) -> None:
    m, rep = machine_factory()
    loaders.load(m, str(GUESTS / "prot32.elf"), {})
    m.run(timeout=10)
    assert rep.values[0] == 3628800  # 10!
    assert rep.values[1] == loaders.SEL_CODE
    assert rep.values[2] & 1  # CR0.PE
    assert not rep.values[2] & (1 << 31)  # paging off


def test_long_mode_elf64(machine_factory) -> None:
    m, rep = machine_factory()
    loaders.load(m, str(GUESTS / "long64.elf"), {})
    m.run(timeout=10)
    assert rep.values[0] | rep.values[1] << 32 == 1548008755920  # fib(60)
    assert rep.values[2] & loaders.CR4_PAE
    assert m.cpus[0].get_context().mode == "long64"


def test_multiboot_like_qemu(machine_factory, tmp_path: Path) -> None:
    mod = tmp_path / "module.bin"
    mod.write_bytes(b"\x78\x56\x34\x12" + b"payload")
    m, rep = machine_factory(memory=64 << 20)
    image = str(GUESTS / "multiboot.elf")
    loaders.load(m, image, {"cmdline": "console=ttyS0 x=1", "initrd": f"{mod} modarg"})
    ctx = m.cpus[0].get_context()
    assert ctx.mode == "protected32" and not ctx.cr0 & (1 << 31) and not ctx.rflags & 0x200
    assert tuple(ctx.idt) == (0, 0x3FF)  # QEMU's ROM leaves the BIOS's real-mode IVT
    m.run(timeout=10)
    v = rep.values
    assert v[0] == 0x2BADB002 and v[1] == loaders.MBI_ADDR
    assert v[2] == 0x24F  # mem, boot device, cmdline, mods, mmap, boot loader name
    assert v[3] == 640 and v[4] == (64 << 10) - 1024
    assert v[5] == sum(f"{image} console=ttyS0 x=1".encode())  # QEMU's "<file> <cmdline>"
    assert v[6] == 1 and v[7] == 0x12345678  # module 0 = --initrd
    assert v[8] == 4 * 24 and v[9] == 1  # e820-style map, first entry RAM
    mbi = m.memory.read(loaders.MBI_ADDR, 0x58)
    mods_addr = int.from_bytes(mbi[24:28], "little")
    mod_cmd = int.from_bytes(m.memory.read(mods_addr + 8, 4), "little")
    assert m.memory.read(mod_cmd, len(f"{mod} modarg")) == f"{mod} modarg".encode()
    name_addr = int.from_bytes(mbi[64:68], "little")
    assert m.memory.read(name_addr, 5) == b"qemu\0"  # the boot loader name QEMU reports


def test_multiboot_kernel_linked_low_keeps_its_bytes_in_big_real_mode(machine_factory) -> None:
    """Issue 10 item 11a: a multiboot kernel at 16 KiB (kvm-unit-tests' realmode test)
    that drops to big real mode and calls through a register hung: the loader wrote the
    multiboot information at 0x9000 over the kernel's own function table. The image
    wins (as QEMU's multiboot ROM copies the kernel last); the information moves."""
    m, rep = machine_factory(memory=16 << 20)
    mbi = loaders.load_multiboot(m, (GUESTS / "bigreal.elf").read_bytes(),
                                 str(GUESTS / "bigreal.elf"), {})
    m.run(timeout=20)
    v = rep.values
    assert v[:2] == [0x12345678, 0xC0FFEE]  # big real mode data access; the call returned
    assert v[2] == 0x1717  # int $0x50 through the real-mode IVT
    assert v[3] == mbi and not 0x4000 <= mbi < 0xA020  # the info follows the kernel
    assert v[4] == 0x24F  # and is intact
    assert m.memory.read(0x9010, 4) == (0xA00C).to_bytes(4, "little")


@pytest.mark.parametrize("bits", [32, 64])
def test_elf_linked_over_the_boot_structures_keeps_its_bytes(machine_factory, bits: int) -> None:
    """GDT, page tables and stack are never written over the image: an ELF covering
    0x500-0x10000 gets them in the reserved firmware area instead."""
    from kvmfw_x86.loaders import _Segment

    m, _ = machine_factory(memory=16 << 20)
    body = bytes(range(256)) * 0x100  # 64 KiB of a known pattern
    seg = _Segment(0x0, 0x0, body, 0, len(body), len(body))
    loaders._load_segments(m, [seg])
    if bits == 64:
        loaders.enter_long_mode(m, 0x1000, image=[(0, len(body))])
    else:
        loaders.enter_protected_mode(m, 0x1000, image=[(0, len(body))])
    assert m.memory.read(0, len(body)) == body
    ctx = m.cpus[0].get_context()
    assert ctx.gdt[0] == loaders.ALT_GDT_ADDR
    if bits == 64:
        assert ctx.cr3 == loaders.ALT_PML4_ADDR and ctx.rsp == loaders.ALT_STACK_TOP


class FakeUart:
    """LSR always says 'transmitter empty'; bytes written to THR are collected."""

    def __init__(self) -> None:
        self.out = bytearray()

    def read(self, offset: int, size: int) -> bytes:
        return b"\x60" if offset == 5 else b"\0"

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0:
            self.out += data


def test_default_guest_prints_and_exits(machine_factory) -> None:
    m, _ = machine_factory()
    uart = FakeUart()
    m.map_device(Range("pio", 0x3F8, 8, "uart"), uart)
    path = m.hooks.call("default_guest", machine=m)
    assert Path(path).is_relative_to(Path(EMBEDDED))
    assert m.hooks.call("load_guest", machine=m, image=path, options={"cmdline": "quiet"})
    r = m.run(timeout=20)
    assert r.status == 0
    text = uart.out.decode()
    assert "Hello from kvmfw" in text and "quiet" in text and "exiting" in text


def test_triple_fault_ends_the_run_with_a_dump(machine_factory) -> None:
    """With ``reboot=off`` (QEMU's ``-no-reboot``) a triple fault ends the run."""
    m, _ = machine_factory(reboot="off")
    loaders.load(m, str(GUESTS / "triple.elf"), {})
    with pytest.raises(TripleFaultError) as ei:
        m.run(timeout=10)
    dump = ei.value.dump
    if "re-initialised this vCPU at the shutdown" in dump:
        # AMD SVM: KVM INITs the vCPU on a shutdown, so the faulting state is gone; the dump
        # says so and shows the last state kvmfw saw (the entry point, before `xor; div`)
        assert dump.startswith("vcpu 0 (real mode)")
        assert "last state kvmfw saw before the final entry: long64 mode" in dump
        assert "code there: 31 c9 f7 f1" in dump
    else:  # Intel VMX, kvm_pvm: KVM keeps the state at the fault
        assert "long64 mode" in dump and "code at rip: f7 f1" in dump


def test_default_guest_on_the_default_board() -> None:
    """With kvmfw-devices installed: the real 16550 and pseudo-op device, exit status 0."""
    pytest.importorskip("kvmfw_devices", reason="kvmfw-devices is not installed")
    import io

    from kvmfw.machine import Machine, MachineConfig

    from kvmfw_x86.plugin import X86Plugin

    out = io.BytesIO()
    cfg = MachineConfig(arch="x86", memory=64 << 20,
                        options={"console_output": out})
    with Machine(cfg, arch_plugin=X86Plugin(), arch_name="x86") as m:
        assert any(d.name.startswith("uart") for d in m.devices)
        path = m.hooks.call("default_guest", machine=m)
        m.hooks.call("load_guest", machine=m, image=path, options={})
        r = m.run(timeout=20)
    assert r.status == 0, r.reason
    assert b"Hello from kvmfw" in out.getvalue()


def test_dump_names_an_svm_style_reset_at_shutdown(machine_factory) -> None:
    """What AMD SVM does at a triple fault (KVM INITs the vCPU), made on any KVM: the
    dump says the registers are the INIT state and shows the last state kvmfw saw."""
    from kvmfw_x86.interrupts import reset_to_init

    m, _ = machine_factory()
    loaders.load(m, str(GUESTS / "triple.elf"), {})
    cpu = m.cpus[0]
    entry = cpu.get_context().rip
    cpu.sync_kvm_state()
    cpu.half_entry()  # KVM "ran": the next read fetches, keeping the loader's state
    ctx = cpu.get_context()
    assert ctx.previous_state() == {"mode": "long64", "rip": entry, "pc": entry,
                                    "cr0": ctx.cr0, "cr3": loaders.PML4_ADDR}
    reset_to_init(ctx)
    cpu.sync_kvm_state()
    cpu.last_exit = 8  # KVM_EXIT_SHUTDOWN
    text = cpu.dump_state()
    assert text.startswith("vcpu 0 (real mode)\n  KVM re-initialised this vCPU")
    assert f"before the final entry: long64 mode rip={entry:#x}" in text
    assert "code there: 31 c9 f7 f1" in text


# --- reboot and S3 (issue 10 item 11c/d) -------------------------------------------------

RESET_METHODS = {"i8042": 1, "cf9": 2, "acpi-reset-register": 3, "triple-fault": 4}


@pytest.mark.parametrize("irqchip", ["userspace", "kernel"])
@pytest.mark.parametrize("method", list(RESET_METHODS))
def test_guest_reset_reboots_the_machine_by_default(machine_factory, method: str,
                                                    irqchip: str) -> None:
    """QEMU reboots on a guest reset unless told ``-no-reboot``: the guest is loaded again
    and its vCPU starts from the power-on state (an MSR the first boot set reads 0), RAM
    outside the image keeps the boot counter; the second boot ends the run."""
    m, rep = machine_factory(irqchip=irqchip)
    m.add_device_spec("i8042")
    m.memory.write(0x7000, (0).to_bytes(4, "little") + RESET_METHODS[method].to_bytes(4, "little"))
    m.load_guest(str(GUESTS / "reset.elf"))
    r = m.run(timeout=30)
    assert r.reason == "reporter: guest done"
    assert rep.values == [1, 0, 2, 0]  # boot 1, MSR 0; boot 2, MSR 0 again (not 0x1234)
    stats = m.stats.snapshot()["system.reset"]
    assert stats["reboots"] == 1 and stats["resets_ending_run"] == 0


@pytest.mark.parametrize("method", ["i8042", "cf9", "triple-fault"])
def test_reboot_off_ends_the_run_at_the_reset(machine_factory, method: str) -> None:
    """``reboot=off`` (the CLI's ``--no-reboot``): the reset ends the run, as before."""
    from kvmfw.errors import TripleFaultError

    m, rep = machine_factory(reboot=False)
    m.add_device_spec("i8042")
    m.memory.write(0x7000, (0).to_bytes(4, "little") + RESET_METHODS[method].to_bytes(4, "little"))
    m.load_guest(str(GUESTS / "reset.elf"))
    if method == "triple-fault":
        with pytest.raises(TripleFaultError):
            m.run(timeout=30)
    else:
        r = m.run(timeout=30)
        assert r.status == 0 and "reset" in r.reason
    assert rep.values == [1, 0]


def test_a_reset_loop_is_bounded_and_counted(machine_factory) -> None:
    """A guest that resets at every boot: the run ends after ``reboot_limit`` reboots
    with a reason that names the loop; every reboot is counted."""
    m, rep = machine_factory(reboot_limit=3)
    m.memory.write(0x7000, (0).to_bytes(4, "little") + (2).to_bytes(4, "little"))
    m.load_guest(str(GUESTS / "reset.elf"))

    def again() -> None:  # each boot sees counter 1 again: it resets every time
        m.memory.write(0x7000, (0).to_bytes(4, "little"))

    orig = m.reset

    def reset(*, wakeup: bool = False) -> None:
        again()
        orig(wakeup=wakeup)

    m.reset = reset  # type: ignore[method-assign]
    r = m.run(timeout=60)
    assert "reset loop" in r.reason and "reboot_limit=3" in r.reason
    stats = m.stats.snapshot()["system.reset"]
    assert stats["reboots"] == 3 and stats["resets_ending_run"] == 1
    assert rep.values == [1, 0] * 4


def test_reboot_option_refuses_unknown_values(machine_factory) -> None:
    from kvmfw.errors import ConfigError

    m, _ = machine_factory(reboot="sometimes")
    with pytest.raises(ConfigError, match="reboot must be on or off"):
        m.reboot_enabled()


@pytest.mark.parametrize("irqchip", ["userspace", "kernel"])
def test_acpi_s3_resumes_at_the_facs_waking_vector(machine_factory, irqchip: str) -> None:
    """QEMU resumes an S3 sleep at the FACS firmware waking vector in real mode; RAM and
    device state are kept and WAK_STS is set. kvmfw used to ignore S3 (the guest ran on)."""
    m, rep = machine_factory(irqchip=irqchip)
    pm = m.add_device_spec("acpi-pm")
    m.load_guest(str(GUESTS / "s3.elf"))
    r = m.run(timeout=30)
    assert r.reason == "reporter: guest done"
    v = rep.values
    assert v[0] == 1 and v[1] == 0x5353, [hex(x) for x in v]  # slept, woke in the stub
    assert v[2] == 0x5EED  # RAM kept
    assert v[3] & 0x8000  # WAK_STS
    assert v[4] == 0x100  # PM1a_EN kept (device state survives S3)
    assert v[5] & 1 == 0  # real mode
    assert pm.stats["s3_suspends"] == 1
    assert m.stats.snapshot()["system.reset"]["wakeups"] == 1


def test_reset_restores_the_in_kernel_pic_ioapic_and_pit(machine_factory) -> None:
    """What the guest programmed into the in-kernel PICs, IO-APIC and PIT is back at its
    power-on value after a reset (QEMU resets them with the machine)."""
    from kvmfw.abi import ioctl

    from kvmfw_x86 import reset
    from kvmfw_x86.abi import addr
    from kvmfw_x86.plugin import X86Plugin

    m, _ = machine_factory(irqchip="kernel")
    st = X86Plugin.state(m.hooks.pm.get_plugin("arch:x86"), m)  # type: ignore[arg-type]
    before = reset.record(m, True)
    changed = bytearray(before.irqchips[0])
    changed[8 + 3] ^= 0x5A  # PIC master IMR (struct kvm_pic_state: ..., imr at 3)
    b = reset._buf(reset.KVMIO_IRQCHIP_SIZE, bytes(changed))
    ioctl(m.vm.fd, reset.KVM_SET_IRQCHIP, addr(b))
    pit = bytearray(before.pit or b"")
    pit[0:4] = (1234).to_bytes(4, "little")  # channel 0 count
    b = reset._buf(reset.KVM_PIT_STATE2_SIZE, bytes(pit))
    ioctl(m.vm.fd, reset.KVM_SET_PIT2, addr(b))
    assert reset.record(m, True).irqchips[0] == bytes(changed)
    reset.reset_vm(m, st.power_on)
    after = reset.record(m, True)
    assert after.irqchips == before.irqchips
    assert after.pit is not None and after.pit[0:4] == before.pit[0:4]  # type: ignore[index]


def test_wakeup_without_a_waking_vector_reboots(machine_factory) -> None:
    """No FACS waking vector set: the wake-up becomes a reboot (as SeaBIOS does)."""
    m, rep = machine_factory()
    m.load_guest(str(GUESTS / "prot32.elf"))
    m.run(timeout=10)
    assert rep.values[0] == 3628800
    m.reset(wakeup=True)
    m.run(timeout=10)
    assert rep.values[3] == 3628800  # the guest ran again from its entry
    st = m.stats.snapshot()["system.reset"]
    assert st["reboots"] == 1 and st["wakeups"] == 0


@pytest.mark.parametrize("extra, status", [([], 5), (["--option", "reboot=off"], 0)])
def test_kvmfw_run_reboots_on_reboot_k_unless_reboot_off(extra: list[str], status: int) -> None:
    """`kvmfw run` on the default PC board (in-kernel irqchip): the i8042 reset (Linux's
    reboot=k) reboots the machine and the second boot exits through debug-exit with its
    boot count (2 -> status 5); with ``reboot=off`` (``--no-reboot``) the reset ends the
    run with status 0, as before."""
    import subprocess
    import sys

    pytest.importorskip("kvmfw_devices", reason="kvmfw-devices is not installed")
    r = subprocess.run([sys.executable, "-m", "kvmfw.cli", "run", "--kernel",
                        str(GUESTS / "reboot_k.elf"), "--device", "debug-exit",
                        "--timeout", "60", *extra], capture_output=True, text=True,
                       timeout=120, cwd="/", stdin=subprocess.DEVNULL)
    assert r.returncode == status, r.stderr

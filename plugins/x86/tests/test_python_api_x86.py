"""The Python API on the x86 plugin (real guests on /dev/kvm): the default board through
the ``kvmfw.boards`` entry point, ``load`` with a command line, registers read and
written through ``cpu.regs``, and kvmfw.testing's fixtures as a plugin author uses them."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvmfw import Machine, RunEnd
from kvmfw.errors import ImageError

pytestmark = pytest.mark.kvm


def test_default_board_comes_from_the_boards_entry_point(kvmfw_kvm: None) -> None:
    pytest.importorskip("kvmfw_devices", reason="the x86 board is kvmfw-devices' entry point")
    with Machine(arch="x86", memory="64M") as m:
        names = [d.name for d in m.devices]
        assert names[0] == "uart16550" and "pseudo-op" in names
        m.load(cmdline="console=ttyS0 from-python")  # no kernel: the embedded default guest
        r = m.run(timeout=30)
        assert (r.end, r.status) == (RunEnd.GUEST, 0)
        assert "default.elf console=ttyS0 from-python\n" in m.console.text  # as multiboot passes it
        assert "system.uart16550_0.writes" in m.dump_stats()


def test_cli_board_option(kvmfw_kvm: None) -> None:
    import shutil
    import subprocess

    pytest.importorskip("kvmfw_devices", reason="the boards are kvmfw-devices' entry points")
    exe = shutil.which("kvmfw")
    if exe is None:
        pytest.skip("the kvmfw command is not installed")
    r = subprocess.run([exe, "run", "-o", "board=nope"], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 2
    assert "no board 'nope' is installed (installed: armv8, microvm, x86" in r.stderr
    # another arch's board lacks what the embedded guest talks to: refused, not a hang
    r = subprocess.run([exe, "run", "-o", "board=armv8"], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 2 and "the embedded guest needs the default board's" in r.stderr
    r = subprocess.run([exe, "run", "-o", "board=x86", "--no-summary", "--console", "none"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                       check=False)
    assert r.returncode == 0, r.stderr


def test_load_refuses_a_missing_image(kvmfw_kvm: None, tmp_path: Path) -> None:
    with Machine(arch="x86", memory="64M", default_devices=False) as m:
        with pytest.raises(ImageError, match="no such file"):
            m.load(tmp_path / "nope.elf")


GUEST64 = """
    .code64
    .globl _start
_start:
    mov %rbx, %rax          /* the host put a value in RBX */
    out %eax, $0x80
    mov $0xd0000000, %edi
    movl $0x1234, (%rdi)
    mov $0x7, %al
    out %al, $0xf4          /* debug-exit: status 15 */
    hlt
"""


def test_run_guest_fixture_traces_ports_mmio_and_registers(kvmfw_run_guest) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("kvmfw_devices", reason="debug-exit is kvmfw-devices'")

    def setup(m: Machine) -> None:
        m.bus.mmio.register(0xD0000000, 0x10, _Sink(), "sink")

    run = kvmfw_run_guest(GUEST64, bits=64, arch="x86", devices=["debug-exit"], setup=setup)
    assert run.status == 15 and run.result.end is RunEnd.GUEST
    assert [a.addr for a in run.trace.pio] == [0x80, 0xF4]  # 0x80: nobody's (traced too)
    assert run.trace.pio[0].device is None
    assert run.trace.writes("mmio", 0xD0000000)[0].value == 0x1234
    assert run.exits["io"] >= 2 and run.exits["mmio"] >= 1


def test_regs_written_before_a_run_reach_the_guest(kvmfw_machine_factory, kvmfw_assemble) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("kvmfw_devices", reason="debug-exit is kvmfw-devices'")
    m = kvmfw_machine_factory(arch="x86", devices=["debug-exit"])
    m.load(kvmfw_assemble(GUEST64.replace("mov %rbx, %rax", "mov %rbx, %rax\n"
                                          "    out %al, $0xf4"), bits=64))
    m.cpus[0].regs.rbx = 0x21  # the guest writes RBX's low byte to debug-exit
    r = m.run(timeout=30)
    assert r.status == (0x21 << 1) | 1
    assert m.cpus[0].regs.rax == 0x21 and m.cpus[0].context.rbx == 0x21


class _Sink:
    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass

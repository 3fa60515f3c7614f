"""Real guests on /dev/kvm (through the x86 plugin) driving the devices.

Each guest is assembled from ``tests/guests/*.S`` at test time with GNU as/ld; the tests
need a usable ``/dev/kvm``, binutils and the ``kvmfw-x86`` plugin.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

x86 = pytest.importorskip("kvmfw_x86.plugin", reason="the kvmfw-x86 plugin is not installed")
loaders = pytest.importorskip("kvmfw_x86.loaders")

from kvmfw.machine import Machine, MachineConfig  # noqa: E402
from kvmfw.testing import assemble  # noqa: E402

GUESTS = Path(__file__).parent / "guests"
MiB = 1 << 20

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                       reason="needs a working /dev/kvm"),
    pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None,
                       reason="needs GNU as and ld to build the guests"),
]


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("guests")

    def make(name: str, *, flat: bool = False) -> Path:
        # kvmfw.testing.assemble: GNU as/ld, an ELF32 at 1 MiB or a flat binary at 0x7c00
        return assemble((GUESTS / f"{name}.S").read_text(), out_dir=out, name=name,
                        bits=16 if flat else 32, include=[GUESTS])
    return make


def run(image: Path, devices: list[str], *, load: dict[str, Any] | None = None,
        until: bytes | None = None, **options: Any) -> tuple[Any, bytes, Machine]:
    console = io.BytesIO()
    cfg = MachineConfig(arch="x86", memory=64 * MiB, devices=devices, default_devices=False,
                        options={"irqchip": "kernel", "console_output": console, **options})
    m = Machine(cfg, arch_plugin=x86.X86Plugin(), arch_name="x86")
    try:
        loaders.load(m, str(image), load or {})
        result = m.run(timeout=20, until=until)
    finally:
        m.close()
    return result, console.getvalue(), m


def test_16550_polling_and_debug_exit(build) -> None:  # type: ignore[no-untyped-def]
    result, out, _ = run(build("uart_poll"), ["uart16550", "debug-exit"])
    assert out == b"kvmfw 16550\n"
    assert result.status == (0x21 << 1) | 1


@pytest.mark.parametrize(("guest", "device", "printed", "status", "polls"), [
    ("uart_poll", "uart16550", b"kvmfw 16550\n", 0x21, 0),  # LSR before each byte
    ("pl011_poll", "pl011", b"kvmfw pl011\n", 0x11, 2),  # FR before each byte; CR, an ID
])
def test_console_polls_are_answered_in_c_and_the_guest_sees_the_same(  # type: ignore[no-untyped-def]
        build, guest: str, device: str, printed: bytes, status: int, polls: int) -> None:
    seen = {}
    for fast in (True, False):
        result, out, m = run(build(guest), [device, "debug-exit"], fastpath=fast)
        uart, cpu = m.devices[0], m.cpus[0].stats
        seen[fast] = (out, result.status, uart.stats["writes"], cpu.io + cpu.mmio)
        if fast:  # every poll (at least one a byte) and read stays in C
            assert cpu.fast_exits >= len(out) + polls and uart.stats["reads"] == 0
        else:
            assert cpu.fast_exits == 0 and uart.stats["reads"] >= len(out) + polls
    assert seen[True] == seen[False]
    assert seen[True][:3] == (printed, (status << 1) | 1, len(printed))


def test_16550_reads_wider_than_a_register_reach_the_device_as_without_the_fast_path(
        build) -> None:  # type: ignore[no-untyped-def]
    seen = {}
    for fast in (True, False):
        result, out, m = run(build("uart_wide"), ["uart16550", "debug-exit"], fastpath=fast)
        seen[fast] = (out, result.status, m.devices[0].stats["bad_accesses"])
    assert seen[True] == seen[False] == (b"\xff\xff\x0b", (0x21 << 1) | 1, 1)


def test_16550_interrupt_driven_output(build) -> None:  # type: ignore[no-untyped-def]
    result, out, m = run(build("uart_irq", flat=True), ["uart16550", "debug-exit"],
                         load={"load_addr": 0x7C00})
    assert out == b"irq-driven\n"
    interrupts = (result.status - 1) >> 1
    assert interrupts >= len(b"irq-driven\n") + 1  # one per character, one to finish
    uart = m.devices[0]
    assert uart.stats["interrupts"] >= interrupts


def test_rtc_read_by_guest(build) -> None:  # type: ignore[no-untyped-def]
    result, out, m = run(build("rtc"), ["uart16550", "debug-exit",
                                        "cmos-rtc,clock=fixed,time=2024-02-29T23:59:58"])
    assert result.status == 1
    # seconds, minutes, hours, day, month, year, century (BCD), A, B, then D
    assert out == bytes([0x58, 0x59, 0x23, 0x29, 0x02, 0x24, 0x20, 0x26, 0x02, 0x80])
    assert not m.devices[2].nmi_disabled


def test_i8042_reset_ends_the_run_cleanly(build) -> None:  # type: ignore[no-untyped-def]
    result, _, _ = run(build("reset"), ["i8042"])
    assert result.status == 0
    assert result.reason.startswith("reset")


def test_pci_enumeration_and_bar(build) -> None:  # type: ignore[no-untyped-def]
    result, out, _ = run(build("pci"), ["uart16550", "debug-exit", "pci-host,testdev=on"])
    assert result.status == 1
    assert out[:5] == b"\x00" + (0x00081B36).to_bytes(4, "little")  # 00.0 host bridge
    assert out[5:10] == b"\x01" + (0x00051B36).to_bytes(4, "little")  # 01.0 testdev
    assert out[10:14] == (0xFFFFF000).to_bytes(4, "little")  # BAR 0: 4 KiB
    assert out[14:18] == (0x12345678).to_bytes(4, "little")  # written and read via BAR


def test_virtio_blk_write_then_read_sector(build, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * 512))
    result, out, _ = run(build("virtio_blk"), [
        "uart16550", "debug-exit", f"virtio-blk,file={image},base=0xd0000000,irq=5"])
    assert result.status == 1, out
    assert out == b"\x00\x00\x01"  # OK, OK, data matched
    assert image.read_bytes()[512:1024] == bytes(range(256)) * 2


def test_every_pseudo_op(build, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)  # the checkpoint op's checkpoint goes to the current dir
    (tmp_path / "in.txt").write_bytes(b"from the host")
    result, out, m = run(build("pseudo_op"), ["uart16550", "debug-exit",
                                              f"pseudo-op,dir={tmp_path}"])
    assert result.status == 7 and "exit(7)" in result.reason
    ok, failed = 0, 0xFF
    checkpoint = ok if "checkpoint" in m.device_context().services else failed
    assert out[:8] == bytes([21, ok, ok, ok, checkpoint, ok, ok, 1])
    if checkpoint == ok:
        assert len(list(tmp_path.glob("cpt.*/manifest.json"))) == 1
    assert out[8] == 10 and out[9] == 13 and out[10:] == b"from the host"
    assert (tmp_path / "out.txt").read_bytes() == b"guest data"
    dev = m.devices[2]
    assert dev.stats["op_work_begin"] == dev.stats["op_work_end"] == 1


def test_fw_cfg_ports_and_dma(build) -> None:  # type: ignore[no-untyped-def]
    result, out, _ = run(build("fw_cfg"), ["uart16550", "debug-exit",
                                           "fw-cfg,name=opt/hello,string=world"])
    assert result.status == 1
    assert out[:4] == b"QEMU"
    assert out[4] == 3  # traditional + DMA
    d = out[5:25]
    assert d[:4] == b"\0\0\0\x01"  # one file (big-endian count)
    assert d[4:8] == b"\0\0\0\x05" and d[8:10] == b"\0\x20"  # size 5, selector 0x20
    assert d[12:20] == b"opt/hell"
    assert out[25:30] == b"world"
    assert out[30:34] == b"QEMU"  # read by DMA
    assert out[34:38] == bytes(4)  # control cleared: no error


def test_kvmfw_run_default_board(build, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``kvmfw run`` with no --device builds the default x86 board from kvmfw-devices."""
    kvmfw = shutil.which("kvmfw")
    if kvmfw is None:
        pytest.skip("the kvmfw command is not on PATH")
    console = tmp_path / "console.txt"
    proc = subprocess.run([kvmfw, "run", "--kernel", str(build("board")), "--console",
                           f"file:{console}", "--no-summary", "--timeout", "30"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 5, proc.stderr  # pseudo-op exit(5)
    out = console.read_bytes()
    assert out[0] == 0x80  # RTC register D
    assert out[1] & 0x10  # i8042: keyboard not inhibited
    assert out[2:6] == b"QEMU"  # fw_cfg
    assert out[6:10] == (0x00081B36).to_bytes(4, "little")  # PCI host bridge


def test_third_party_device_from_kvmfw_run(build, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from third_party import make_third_party

    kvmfw = shutil.which("kvmfw")
    if kvmfw is None:
        pytest.skip("the kvmfw command is not on PATH")
    env = make_third_party(tmp_path)
    proc = subprocess.run([kvmfw, "run", "--no-default-devices", "--no-summary",
                           "--device", "uart16550", "--device", "acme-stopper,code=0x2a",
                           "--kernel", str(build("uart_poll")), "--console", "none",
                           "--timeout", "30"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0x2A, proc.stderr

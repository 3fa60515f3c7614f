"""Pure logic: device tree generation (checked with dtc), Image/ELF parsing, IRQ encoding,
the thread context's dirty tracking. Runs on any host."""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
from pathlib import Path

import fdt
import pytest
from kvmfw_armv8 import abi, board, guests, loader
from kvmfw_armv8.context import ArmV8Context, Group

from kvmfw.errors import ConfigError, ImageError


def _spec(**kw: object) -> board.DeviceTreeSpec:
    args: dict[str, object] = dict(ram_base=board.RAM_BASE, ram_size=256 << 20,
                                   mpidrs=[0, 1, 0x100], cmdline="console=ttyAMA0 rdinit=/init",
                                   initrd=(0x4F00_0000, 0x4F10_0000), pmu=True, virtio=[0, 3])
    args.update(kw)
    return board.DeviceTreeSpec(**args)  # type: ignore[arg-type]


def test_dtb_parses_back_with_the_fdt_library() -> None:
    tree = fdt.parse_dtb(board.build_dtb(_spec()))
    assert tree.get_property("bootargs", "/chosen").value == "console=ttyAMA0 rdinit=/init"
    assert tree.get_property("reg", "/memory@40000000").data == [0, 0x4000_0000, 0, 256 << 20]
    cpus = tree.get_node("/cpus")
    assert [n.name for n in cpus.nodes] == ["cpu@0", "cpu@1", "cpu@100"]
    assert tree.get_property("enable-method", "/cpus/cpu@100").value == "psci"
    gic = tree.get_node("/intc@8000000")
    assert gic.get_property("compatible").value == "arm,gic-v3"
    assert gic.get_property("reg").data == [0, board.GICD_BASE, 0, board.GICD_SIZE,
                                            0, board.GICR_BASE, 0, 3 * board.GICR_STRIDE]
    assert tree.get_property("linux,initrd-start", "/chosen").data == [0, 0x4F00_0000]
    assert tree.get_property("interrupts", "/timer").data[:3] == [1, 13, 0xF04]


def test_dtb_gicv2_and_no_gic_variants() -> None:
    v2 = fdt.parse_dtb(board.build_dtb(_spec(gic="v2")))
    assert v2.get_property("compatible", "/intc@8000000").value == "arm,cortex-a15-gic"
    none = fdt.parse_dtb(board.build_dtb(_spec(gic="none", cmdline="", initrd=None)))
    assert none.get_property("bootargs", "/chosen") is None
    assert not none.exist_node("/intc@8000000")
    assert none.get_property("interrupt-parent", "/") is None


def test_dtb_carries_the_kaslr_seed_it_is_given() -> None:
    """``/chosen/kaslr-seed``, as QEMU's virt board gives one (the kernel randomizes its
    address with it): the option's seed drawn to a nonzero 64-bit value; none for
    ``kaslr=off``."""
    from kvmfw_armv8.plugin import _kaslr_seed

    tree = fdt.parse_dtb(board.build_dtb(_spec(kaslr_seed=0x0123_4567_89AB_CDEF)))
    assert tree.get_property("kaslr-seed", "/chosen").data == [0x0123_4567, 0x89AB_CDEF]
    assert fdt.parse_dtb(board.build_dtb(_spec())).get_property("kaslr-seed", "/chosen") is None
    seven = _kaslr_seed({"kaslr": "7"})
    assert seven == _kaslr_seed({"kaslr": "0x7"}) != _kaslr_seed({"kaslr": "8"})
    assert _kaslr_seed({"kaslr": "off"}) is None
    assert all(_kaslr_seed({}) for _ in range(8))  # random, never the "no seed" 0
    with pytest.raises(ConfigError, match="kaslr='x'"):
        _kaslr_seed({"kaslr": "x"})


@pytest.mark.skipif(shutil.which("dtc") is None,
                    reason="dtc not installed (apt-get install device-tree-compiler)")
def test_dtb_decompiles_cleanly_with_dtc(tmp_path: Path) -> None:
    blob = tmp_path / "board.dtb"
    blob.write_bytes(board.build_dtb(_spec()))
    out = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(blob)], capture_output=True,
                         text=True, check=True)
    assert out.stderr.strip() == "", out.stderr  # no warnings either
    dts = out.stdout
    for needle in ('compatible = "arm,gic-v3";', 'method = "hvc";', "interrupt-controller;",
                   'stdout-path = "/pl011@9000000";', 'compatible = "arm,armv8-pmuv3";',
                   "virtio_mmio@a000600", 'compatible = "arm,armv8-timer";'):
        assert needle in dts


def test_board_config_from_options() -> None:
    cfg = board.BoardConfig.from_options({"gic": "auto", "arm_features": "pmu, sve"})
    assert (cfg.gic, cfg.features, cfg.psci) == ("auto", frozenset({"pmu", "sve"}), True)
    with pytest.raises(ConfigError, match="unknown arm_features"):
        board.BoardConfig.from_options({"arm_features": ["mte"]})
    with pytest.raises(ConfigError, match="gic"):
        board.BoardConfig.from_options({"gic": "v4"})


def _image(text_offset: int = 0x80000, image_size: int = 0x1000, flags: int = 0xA,
           magic: int = loader.IMAGE_MAGIC) -> bytes:
    hdr = struct.pack("<IIQQQQQQII", 0x91005A4D, 0x14000000, text_offset, image_size, flags,
                      0, 0, 0, magic, 0)
    return hdr + bytes(0x1000 - len(hdr))


def test_image_header_parsing() -> None:
    hdr = loader.parse_image_header(_image())
    assert (hdr.text_offset, hdr.image_size, hdr.page_size, hdr.anywhere) == (
        0x80000, 0x1000, 4096, True)
    assert loader.image_load_address(hdr, 0x4000_0000) == 0x4008_0000
    assert loader.image_load_address(hdr, 0x4010_0000) == 0x4028_0000  # 2 MiB aligned
    legacy = loader.parse_image_header(_image(text_offset=0, image_size=0))
    assert legacy.text_offset == loader.LEGACY_TEXT_OFFSET


@pytest.mark.parametrize("data,match", [
    (_image(magic=0x12345678), "not an arm64 Image"),
    (_image(flags=1), "big-endian"),
    (_image(text_offset=0x80010), "not page aligned"),
    (b"short", "too short"),
])
def test_bad_image_headers_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        loader.parse_image_header(data)


def test_gzip_kernels_are_decompressed() -> None:
    raw = _image()
    assert loader.is_image(loader.maybe_decompress(gzip.compress(raw), 1 << 30))
    with pytest.raises(ImageError, match="gzip"):
        loader.maybe_decompress(b"\x1f\x8b" + b"garbage", 1 << 30)
    with pytest.raises(ImageError, match="truncated"):
        gz = gzip.compress(raw)
        loader.maybe_decompress(gz[:len(gz) // 2], 1 << 30)


def test_a_gzip_bomb_stops_at_the_guest_ram() -> None:
    """64 MiB of zeros for a 1 MiB guest: refused once 1 MiB + 1 byte is inflated."""
    import tracemalloc

    bomb = gzip.compress(bytes(64 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="more than the guest RAM"):
            loader.maybe_decompress(bomb, 1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_elf_parsing_of_the_test_guest() -> None:
    entry, segs = loader.parse_elf(guests.TESTGUEST_ELF.read_bytes())
    assert entry == guests.LOAD_ADDR
    assert segs[0].addr == guests.LOAD_ADDR
    assert segs[0].data[:len(guests.TESTGUEST_BIN.read_bytes())] == \
        guests.TESTGUEST_BIN.read_bytes()
    with pytest.raises(ImageError, match="not AArch64"):
        elf = bytearray(guests.TESTGUEST_ELF.read_bytes())
        elf[18:20] = (62).to_bytes(2, "little")  # EM_X86_64
        loader.parse_elf(bytes(elf))


def test_irq_line_encoding() -> None:
    assert abi.irq_line_number(abi.KVM_ARM_IRQ_TYPE_SPI, 37) == 0x0100_0025
    assert abi.irq_line_number(abi.KVM_ARM_IRQ_TYPE_PPI, 27, vcpu=3) == 0x0203_001B
    assert abi.irq_line_number(abi.KVM_ARM_IRQ_TYPE_CPU, 0, vcpu=1) == 0x0001_0000
    n = abi.irq_line_number(abi.KVM_ARM_IRQ_TYPE_PPI, 27, vcpu=0x3FF, layout2=True)
    assert n == 0x32FF_001B
    assert abi.decode_irq_line(n) == (abi.KVM_ARM_IRQ_TYPE_PPI, 0x3FF, 27)
    with pytest.raises(abi.IrqLineLayoutError, match="LAYOUT_2"):
        abi.irq_line_number(abi.KVM_ARM_IRQ_TYPE_PPI, 27, vcpu=256)
    with pytest.raises(abi.IrqLineLayoutError):
        abi.irq_line_number(abi.KVM_ARM_IRQ_TYPE_SPI, 5)


def test_arm_ioctl_numbers() -> None:
    assert abi.KVM_ARM_VCPU_INIT == 0x4020AEAE
    assert abi.KVM_ARM_PREFERRED_TARGET == 0x8020AEAF
    assert abi.KVM_GET_MP_STATE == 0x8004AE98
    assert abi.KVM_ARM_VCPU_FINALIZE == 0x4004AEC2


def test_mpidr_and_redist_attr() -> None:
    assert abi.mpidr_of(0) == 0
    assert abi.mpidr_of(17) == 0x101
    assert abi.vgic_v3_redist_attr(0x101, 0x10) == (0x101 << 32) | 0x10


def test_context_tracks_dirty_groups() -> None:
    calls: list[int] = []
    ctx = ArmV8Context(on_change=lambda: calls.append(1))
    assert ctx.dirty == Group.NONE
    ctx.x[3] = 7
    assert ctx.dirty == Group.GPR and calls
    ctx.spsr[4] = 1
    ctx.v[0] = 1 << 127
    assert ctx.dirty == Group.GPR | Group.EL1 | Group.FP
    ctx.sysregs[0x6030000000138080] = 5
    assert ctx.dirty_sysregs == {0x6030000000138080}
    ctx.clean(Group.ALL)
    assert ctx.dirty == Group.NONE and not ctx.dirty_sysregs
    ctx.load_scalar("pc", 0x1000)  # a pull marks nothing
    assert ctx.dirty == Group.NONE and ctx.get("PC") == 0x1000
    ctx.fpcr = 3
    assert ctx.dirty == Group.FP and ctx.get("fpcr") == 3
    with pytest.raises(TypeError):
        del ctx.x[0]
    with pytest.raises(ValueError):
        ctx.x[:] = [1, 2]


def test_context_plain_data_round_trip() -> None:
    a = ArmV8Context()
    a.x[:] = list(range(31))
    a.v[5] = (1 << 128) - 1
    a.pc, a.pstate, a.fpsr = 0x4000_0000, 0x3C5, 0x10
    a.sysregs[0x603000000013C005] = 0x8000_0001
    b = ArmV8Context()
    b.load_dict(a.as_dict())
    assert b.core_values() == a.core_values()
    assert dict(b.sysregs) == dict(a.sysregs)
    assert b.dirty == Group.ALL

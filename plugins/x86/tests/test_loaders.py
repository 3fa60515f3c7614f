"""Bad images fail with ImageError and a clear message; bzImage boot_params are right."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from conftest import GUESTS, requires_kvm
from kvmfw.errors import ImageError

from kvmfw_x86 import loaders

pytestmark = [requires_kvm, pytest.mark.kvm]


def _fail(m, tmp_path: Path, data: bytes, match: str, **opts) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "image"
    p.write_bytes(data)
    with pytest.raises(ImageError, match=match):
        loaders.load(m, str(p), opts)


def test_truncated_elf(machine_factory, tmp_path: Path) -> None:
    m, _ = machine_factory()
    data = (GUESTS / "long64.elf").read_bytes()
    _fail(m, tmp_path, data[:0x1010], "truncated ELF")
    _fail(m, tmp_path, data[:40], "ELF")


def test_wrong_magic_and_random_file(machine_factory, tmp_path: Path) -> None:
    m, _ = machine_factory()
    _fail(m, tmp_path, b"\x7fELG" + bytes(100), "unknown image format")
    _fail(m, tmp_path, bytes(range(256)) * 40, "unknown image format")
    with pytest.raises(ImageError, match="not an ELF"):
        loaders.parse_elf(b"MZ" + bytes(100))


def test_missing_files(machine_factory, tmp_path: Path) -> None:
    m, _ = machine_factory()
    with pytest.raises(ImageError, match="does not exist"):
        loaders.load(m, str(tmp_path / "nope"), {})
    with pytest.raises(ImageError, match="initrd.*does not exist"):
        loaders.load(m, str(GUESTS / "multiboot.elf"), {"initrd": str(tmp_path / "nope")})


def test_multiboot_elf64_refused_and_image_too_big(machine_factory, tmp_path: Path) -> None:
    m, _ = machine_factory(memory=2 << 20)
    hdr = struct.pack("<III", 0x1BADB002, 0, (-0x1BADB002) & 0xFFFFFFFF)
    elf64 = bytearray((GUESTS / "long64.elf").read_bytes())
    elf64[0x1000:0x100C] = hdr  # inside .text: a multiboot header in a 64-bit ELF
    _fail(m, tmp_path, bytes(elf64), "ELF32")
    with pytest.raises(ImageError, match="does not fit in guest RAM"):
        loaders.load_flat(m, b"\x90" * 16, 0x7C00) or loaders.write(
            m, 0x300000, b"x", "test blob")


def _bzimage(version: int = 0x20F, xload: int = 1, kernel: bytes = b"\x90" * 4096,
             syssize: int | None = None) -> bytes:
    setup_sects = 4
    img = bytearray((setup_sects + 1) * 512)
    img[0x1F1] = setup_sects
    struct.pack_into("<I", img, 0x1F4, (syssize if syssize is not None else len(kernel) // 16))
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    img[0x200] = 0xEB
    img[0x201] = 0x6A  # header ends at 0x26c
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, version)
    img[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", img, 0x22C, 0x37FFFFFF)  # initrd_addr_max
    struct.pack_into("<I", img, 0x230, 0x200000)  # kernel_alignment
    img[0x234] = 1  # relocatable
    struct.pack_into("<H", img, 0x236, xload)
    struct.pack_into("<I", img, 0x238, 2048)  # cmdline_size
    struct.pack_into("<Q", img, 0x258, 0x1000000)  # pref_address
    struct.pack_into("<I", img, 0x260, 0x10000)  # init_size
    return bytes(img) + kernel


def test_bzimage_errors(machine_factory, tmp_path: Path) -> None:
    m, _ = machine_factory()
    _fail(m, tmp_path, _bzimage(version=0x20A), "too old for the 64-bit entry")
    _fail(m, tmp_path, _bzimage(xload=0), "no 64-bit entry")
    _fail(m, tmp_path, _bzimage(syssize=0x10000), "truncated bzImage")
    _fail(m, tmp_path, _bzimage()[:0x210], "truncated bzImage")


def test_bzimage_boot_params_and_entry(machine_factory, tmp_path: Path) -> None:
    m, _ = machine_factory(memory=64 << 20)
    k = tmp_path / "bzImage"
    k.write_bytes(_bzimage())
    rd = tmp_path / "initrd"
    rd.write_bytes(b"INITRD" * 1000)
    loaders.load(m, str(k), {"cmdline": "console=ttyS0 panic=-1", "initrd": str(rd)})
    bp = m.memory.read(loaders.BOOT_PARAMS_ADDR, 4096)
    assert bp[0x202:0x206] == b"HdrS" and bp[0x210] == 0xFF  # type_of_loader
    cmd_ptr = struct.unpack_from("<I", bp, 0x228)[0]
    assert m.memory.read(cmd_ptr, 23) == b"console=ttyS0 panic=-1\0"
    rd_addr, rd_size = struct.unpack_from("<II", bp, 0x218)
    assert rd_size == 6000 and m.memory.read(rd_addr, 6) == b"INITRD"
    assert rd_addr + rd_size <= 64 << 20 and rd_addr % 4096 == 0
    assert bp[0x1E8] == 4  # e820 entries
    assert struct.unpack_from("<QQI", bp, 0x2D0 + 3 * 20) == (0x100000, (64 << 20) - 0x100000, 1)
    ctx = m.cpus[0].get_context()
    assert ctx.mode == "long64" and ctx.rip == 0x1000200 and ctx.rsi == loaders.BOOT_PARAMS_ADDR
    assert ctx.cs.selector == 0x10 and ctx.ds.selector == 0x18 and not ctx.rflags & 0x200
    assert m.memory.read(0x1000000, 4) == b"\x90" * 4

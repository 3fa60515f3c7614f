"""Bad images fail with ImageError and a clear message; bzImage boot_params are right."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
from conftest import GUESTS, bzimage, requires_kvm
from kvmfw import initramfs
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


def test_bzimage_errors(machine_factory, tmp_path: Path) -> None:
    m, _ = machine_factory()
    _fail(m, tmp_path, bzimage(version=0x20A), "too old for the 64-bit entry")
    _fail(m, tmp_path, bzimage(xload=0), "no 64-bit entry")
    _fail(m, tmp_path, bzimage(syssize=0x10000), "truncated bzImage")
    _fail(m, tmp_path, bzimage()[:0x210], "truncated bzImage")


def test_bzimage_boot_params_and_entry(machine_factory, tmp_path: Path) -> None:
    m, _ = machine_factory(memory=64 << 20)
    k = tmp_path / "bzImage"
    k.write_bytes(bzimage())
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


def test_initramfs_goes_in_decompressed_unless_decompress_guest(
        machine_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the guest would inflate is inflated on the host, once (cached); the guest gets
    the same archive stored. ``decompress=guest``, or a file with nothing compressed, goes
    in as it is."""
    monkeypatch.setenv("KVMFW_CACHE", str(tmp_path / "cache"))
    k = tmp_path / "bzImage"
    k.write_bytes(bzimage())
    cpio = initramfs.archive([("init", 0o100755, b"#!/bin/sh\necho hello\n" * 300)])
    packed = gzip.compress(cpio)
    rd = tmp_path / "initrd.img"
    rd.write_bytes(packed)

    def loaded(**opts: str) -> bytes:
        m, _ = machine_factory(memory=64 << 20)
        loaders.load(m, str(k), {"initrd": str(rd), **opts})
        addr, size = struct.unpack_from("<II", m.memory.read(loaders.BOOT_PARAMS_ADDR, 4096),
                                        0x218)
        assert addr % 4096 == 0 and addr + size <= 64 << 20
        return bytes(m.memory.read(addr, size))

    assert loaded() == cpio
    assert len(list((tmp_path / "cache" / "initramfs").iterdir())) == 1
    assert loaded() == cpio  # from the cache
    assert loaded(decompress="guest") == packed
    rd.write_bytes(cpio)
    assert loaded() == cpio
    # decompressed it would not fit above the kernel in 64 MiB; compressed it does
    big = initramfs.archive([("zeros", 0o100644, bytes(60 << 20))])
    rd.write_bytes(gzip.compress(big, compresslevel=1))
    assert loaded() == rd.read_bytes()


# --- hostile images: every size from the file is bounded before anything is allocated ---

def _peak_alloc(fn) -> tuple[BaseException | None, int]:  # type: ignore[no-untyped-def]
    """(the exception ``fn`` raised, the peak of Python allocations while it ran)."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        err = None
    except BaseException as exc:  # noqa: BLE001 - handed back to the assertion
        err = exc
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return err, peak


def _elf_phdr(data: bytes, index: int = 0) -> int:
    """File offset of program header ``index`` (ELF32 or ELF64)."""
    if data[4] == 2:
        phoff, = struct.unpack_from("<Q", data, 0x20)
        return phoff + index * struct.unpack_from("<H", data, 0x36)[0]
    phoff, = struct.unpack_from("<I", data, 0x1C)
    return phoff + index * struct.unpack_from("<H", data, 0x2A)[0]


@pytest.mark.parametrize("memsz", [1 << 63, (1 << 64) - 0x100000, 0x40000000])
def test_elf64_huge_p_memsz_is_refused_before_any_allocation(machine_factory, tmp_path: Path,
                                                             memsz: int) -> None:
    m, _ = machine_factory(memory=4 << 20)
    data = bytearray((GUESTS / "long64.elf").read_bytes())
    struct.pack_into("<Q", data, _elf_phdr(data) + 0x28, memsz)  # p_memsz
    p = tmp_path / "hostile.elf"
    p.write_bytes(bytes(data))
    err, peak = _peak_alloc(lambda: loaders.load(m, str(p), {}))
    assert isinstance(err, ImageError), err
    assert "does not fit in guest RAM" in str(err) or "wraps" in str(err)
    assert peak < 8 << 20  # the 1 GiB case allocated 1 GiB of zeros before the fix


def test_elf32_huge_bss_and_bad_offsets(machine_factory, tmp_path: Path) -> None:
    m, _ = machine_factory(memory=4 << 20)
    base = (GUESTS / "prot32.elf").read_bytes()
    ph = _elf_phdr(base)
    big = bytearray(base)
    struct.pack_into("<I", big, ph + 0x14, 0x20000000)  # p_memsz 512 MiB on a 4 MiB guest
    p = tmp_path / "bss.elf"
    p.write_bytes(bytes(big))
    err, peak = _peak_alloc(lambda: loaders.load(m, str(p), {}))
    assert isinstance(err, ImageError) and "does not fit" in str(err), err
    assert peak < 8 << 20
    # p_offset past the file end, p_offset + p_filesz wrapping, p_filesz > p_memsz
    for field, value, match in ((0x04, 0xFFFFFFF0, "truncated ELF"),
                                (0x10, 0xFFFFFFFF, "truncated ELF|exceeds")):
        bad = bytearray(base)
        struct.pack_into("<I", bad, ph + field, value)
        _fail(m, tmp_path, bytes(bad), match)
    # a segment that ends above 4 GiB (paddr near the top)
    wrap = bytearray(base)
    struct.pack_into("<II", wrap, ph + 0x08, 0xFFFFF000, 0xFFFFF000)
    struct.pack_into("<I", wrap, ph + 0x14, 0x2000)
    _fail(m, tmp_path, bytes(wrap), "wraps|does not fit")


def test_elf_overlapping_segments_are_refused(machine_factory, tmp_path: Path) -> None:
    """Two PT_LOAD segments over the same RAM: refused (QEMU: regions overlap)."""
    m, _ = machine_factory(memory=4 << 20)
    base = (GUESTS / "prot32.elf").read_bytes()
    ph = _elf_phdr(base)
    # append a second program header after the first and point e_phoff/e_phnum at both
    phdrs = base[ph:ph + 32] * 2
    img = bytearray(base) + phdrs
    struct.pack_into("<I", img, 0x1C, len(base))  # e_phoff
    struct.pack_into("<H", img, 0x2C, 2)  # e_phnum
    _fail(m, tmp_path, bytes(img), "overlap")
    # and e_phnum pointing far past the file end is a clean ImageError too
    struct.pack_into("<H", img, 0x2C, 0xFFFF)
    _fail(m, tmp_path, bytes(img), "ELF")


def _aout_multiboot(header_addr: int = 0x100000, load_addr: int = 0x100000,
                    load_end: int = 0, bss_end: int = 0, entry: int = 0x100020) -> bytes:
    flags = 0x10000
    hdr = struct.pack("<III5I", 0x1BADB002, flags, (-(0x1BADB002 + flags)) & 0xFFFFFFFF,
                      header_addr, load_addr, load_end, bss_end, entry)
    return hdr.ljust(0x40, b"\0") + b"\xf4" * 0x40


@pytest.mark.parametrize("fields, match", [
    ({"bss_end": 0x20000000}, "does not fit"),          # 512 MiB BSS on a 4 MiB guest
    ({"bss_end": 0xFFFFFFFF}, "does not fit"),          # 4 GiB BSS
    ({"load_end": 0x0FFFFF}, "load_end_addr"),          # load_end below load_addr
    ({"bss_end": 0x100010}, "bss_end_addr"),            # BSS ends inside the image
    ({"load_addr": 0x100010}, "load_addr above"),       # header before the load address
    ({"load_addr": 0xFFF00}, "load_addr above|before"),  # image would start before the file
    ({"load_end": 0x200000}, "truncated multiboot"),    # more bytes than the file has
    ({"header_addr": 0xFFFFFFF0, "load_addr": 0xFFFFFFF0, "entry": 0}, "does not fit"),
])
def test_multiboot_header_fields_out_of_range(machine_factory, tmp_path: Path,
                                              fields: dict[str, int], match: str) -> None:
    m, _ = machine_factory(memory=4 << 20)
    p = tmp_path / "mb"
    p.write_bytes(_aout_multiboot(**fields))
    err, peak = _peak_alloc(lambda: loaders.load(m, str(p), {}))
    assert isinstance(err, ImageError), err
    assert any(w in str(err) for w in match.split("|")), err
    assert peak < 8 << 20


def test_multiboot_aout_loads_with_zeroed_bss(machine_factory, tmp_path: Path) -> None:
    m, _ = machine_factory(memory=4 << 20)
    m.memory.write(0x100080, b"\xAA" * 0x100)
    p = tmp_path / "mb"
    p.write_bytes(_aout_multiboot(bss_end=0x100180))
    loaders.load(m, str(p), {})
    assert m.memory.read(0x100040, 0x40) == b"\xf4" * 0x40
    assert m.memory.read(0x100080, 0x100) == bytes(0x100)
    assert m.cpus[0].get_context().rip == 0x100020


def test_bzimage_header_fields_out_of_range(machine_factory, tmp_path: Path) -> None:
    m, _ = machine_factory(memory=32 << 20)
    img = bytearray(bzimage())
    struct.pack_into("<I", img, 0x260, 0xFFFFFFFF)  # init_size 4 GiB
    _fail(m, tmp_path, bytes(img), "init_size")
    img = bytearray(bzimage())
    struct.pack_into("<I", img, 0x230, 0x80000000)  # kernel_alignment 2 GiB
    _fail(m, tmp_path, bytes(img), "does not fit")
    img = bytearray(bzimage())
    struct.pack_into("<I", img, 0x238, 0)  # cmdline_size 0 -> 255 (the old default)
    _fail(m, tmp_path, bytes(img), "command line", cmdline="x" * 300)


def test_initrd_larger_than_ram_is_refused_from_its_size(machine_factory,
                                                         tmp_path: Path) -> None:
    """A sparse 256 MiB initrd for a 16 MiB guest: refused without reading it."""
    m, _ = machine_factory(memory=16 << 20)
    k = tmp_path / "bzImage"
    k.write_bytes(bzimage())
    rd = tmp_path / "initrd"
    with rd.open("wb") as f:
        f.truncate(256 << 20)
    err, peak = _peak_alloc(lambda: loaders.load(m, str(k), {"initrd": str(rd)}))
    assert isinstance(err, ImageError) and "larger than the guest RAM" in str(err), err
    assert peak < 8 << 20
    err, peak = _peak_alloc(lambda: loaders.load(m, str(GUESTS / "multiboot.elf"),
                                                  {"initrd": str(rd)}))
    assert isinstance(err, ImageError) and "larger than the guest RAM" in str(err), err
    assert peak < 8 << 20


def test_kernel_file_is_mapped_not_read_whole(machine_factory, tmp_path: Path) -> None:
    """An ELF followed by 512 MiB of (sparse) trailing data, as a kernel with debug
    information: it loads, and the host never copies the whole file."""
    m, rep = machine_factory(memory=4 << 20)
    p = tmp_path / "big.elf"
    p.write_bytes((GUESTS / "prot32.elf").read_bytes())
    with p.open("r+b") as f:
        f.truncate(512 << 20)
    err, peak = _peak_alloc(lambda: loaders.load(m, str(p), {}))
    assert err is None, err
    assert peak < 8 << 20
    assert m.cpus[0].get_context().rip == 0x100000


def test_image_pieces_are_read_from_the_file_as_a_copy_would(machine_factory,
                                                             tmp_path: Path) -> None:
    """A mapped image's pieces go into guest RAM with pread from its file (no source page
    faulted in): the same bytes as a copy from a buffer; a piece past the file's end is an
    ImageError, not a short load."""
    from kvmfw.imagefile import FileMapping

    m, _ = machine_factory(memory=4 << 20)
    data = bytes(range(256)) * 64
    p = tmp_path / "image"
    p.write_bytes(data)
    img = loaders.map_image(p)
    assert isinstance(img, FileMapping)
    try:
        loaders.write_image(m, 0x100000, img, 100, 9000, "piece")
        loaders.write_image(m, 0x200000, data, 100, 9000, "piece")
        assert m.memory.read(0x100000, 9000) == m.memory.read(0x200000, 9000) \
            == data[100:9100]
        with pytest.raises(ImageError, match="past the end of its image"):
            loaders.write_image(m, 0x100000, img, len(data) - 10, 11, "piece")
        with pytest.raises(ImageError, match="does not fit in guest RAM"):
            loaders.write_image(m, (4 << 20) - 10, img, 0, 11, "piece")
    finally:
        img.close()


@pytest.mark.parametrize("phoff", [1 << 63, (1 << 64) - 8])
def test_elf64_program_header_offset_beyond_any_file(machine_factory, tmp_path: Path,
                                                     phoff: int) -> None:
    """Found by the loader fuzz: e_phoff = 2^63 made the ELF parser raise OverflowError."""
    m, _ = machine_factory(memory=4 << 20)
    data = bytearray((GUESTS / "long64.elf").read_bytes())
    struct.pack_into("<Q", data, 0x20, phoff)
    _fail(m, tmp_path, bytes(data), "bad or truncated ELF")


def test_initrd_from_an_endless_device_is_bounded(machine_factory) -> None:
    """/dev/zero has no size: the initrd read stops at the guest RAM size, never reads on."""
    m, _ = machine_factory(memory=4 << 20)
    with pytest.raises(ImageError, match="larger than the guest RAM"):
        loaders.load(m, str(GUESTS / "multiboot.elf"), {"initrd": "/dev/zero"})
    with pytest.raises(ImageError, match="/dev/zero: not a regular file"):
        loaders.load(m, "/dev/zero", {})  # a kernel is mapped: only a regular file can be


def test_flat_load_address_is_checked(machine_factory) -> None:
    from kvmfw.errors import ConfigError

    m, _ = machine_factory()
    with pytest.raises(ConfigError, match="load address"):
        loaders.load(m, str(GUESTS / "real.bin"), {"load_addr": "seven"})
    with pytest.raises(ImageError, match="does not fit"):
        loaders.load(m, str(GUESTS / "real.bin"), {"load_addr": -16})
    loaders.load(m, str(GUESTS / "real.bin"), {"load_addr": "0x7c00"})


# mov eax, 1; cpuid; mov eax, edx; mov dx, 0xe0; out dx, eax   (CPUID.1:EDX)
# mov ecx, 0x2ff; rdmsr; mov dx, 0xe0; out dx, eax               (MTRRdefType, low half)
# out 0xe4, al; hlt                                              (done)
_MTRR_PROBE = bytes.fromhex("b801000000" "0fa2" "89d0" "66bae000" "ef"
                            "b9ff020000" "0f32" "66bae000" "ef" "e6e4" "f4")


@pytest.mark.parametrize("cpus", [1, 2])
def test_bzimage_entered_with_mtrrs_on_as_firmware_leaves_them(machine_factory, tmp_path: Path,
                                                               cpus: int) -> None:
    """Regression: a kernel booted without firmware found the MTRRs off (MTRRdefType 0) and
    Linux turned PAT off with them ("x86/PAT: MTRRs disabled, skipping PAT initialization
    too"; under QEMU, SeaBIOS enables them). The guest reads MTRRdefType at the bzImage
    entry: enabled, default type write-back, as firmware (and Firecracker) leaves it, on
    every vCPU; and the MTRRs are synced (checkpointed) state."""
    from kvmfw_x86.context import MSR_MTRR_DEF_TYPE
    from kvmfw_x86.plugin import _read_msr

    m, rep = machine_factory(memory=64 << 20, cpus=cpus, irqchip="kernel")
    k = tmp_path / "bzImage"
    k.write_bytes(bzimage(kernel=b"\x90" * 0x200 + _MTRR_PROBE.ljust(0x200, b"\xf4")))
    loaders.load(m, str(k), {"cmdline": ""})
    m.run(timeout=20)
    edx, def_type = rep.values
    assert edx >> 12 & 1, "the CPUID offers no MTRRs here"
    assert def_type == 0x806  # E (bit 11) | WB (6); no fixed ranges (FE clear)
    for cpu in m.cpus:  # in KVM, the APs' too (they read it at their own bring-up)
        assert MSR_MTRR_DEF_TYPE in cpu.get_context().info.msr_indices
        # An AP whose thread had not entered KVM yet when the BSP ended this short run still
        # holds the loader's write in its (dirty) context: sync is lazy. Push it, then read
        # what KVM itself holds.
        cpu.sync_kvm_state()
        assert _read_msr(cpu.vcpu, MSR_MTRR_DEF_TYPE) == 0x806

"""Guest loaders: flat binary (real mode), ELF32/ELF64 (protected/long mode), multiboot v1
(as QEMU's ``-kernel`` does it) and Linux bzImage (64-bit boot protocol).

No BIOS runs: every loader writes the image into guest RAM and sets the boot CPU's entry
state directly (segments, control registers, a GDT and, for long mode, identity page
tables of the first 4 GiB). Low-memory layout used by the loaders::

    0x0500  GDT        0x7000  boot_params (bzImage)    0x8000  initial stack top
    0x9000  multiboot info (+ memory map at 0x9100)      0xA000-0xFFFF  page tables
    0x20000 kernel command line (bzImage)                0x100000  kernels

The image wins: a boot structure never overwrites the image it boots (QEMU's multiboot
ROM copies the kernel last, so a kernel linked low, as kvm-unit-tests' realmode test at
16 KiB, keeps its bytes). Where the image occupies one of these places, the GDT, page
tables and stack go to the reserved firmware area instead (:data:`ALT_GDT_ADDR`, as a
BIOS keeps them in ROM) and the multiboot information after the kernel.
"""

from __future__ import annotations

import array
import mmap
import os
import stat
import struct
import sys
import weakref
from typing import Any

from kvmfw import initramfs
from kvmfw.debug import get_logger
from kvmfw.errors import ConfigError, ImageError
from kvmfw.hookspecs import SyncLevel
from kvmfw.imagefile import copy_into, map_file

from kvmfw_x86.abi import ffi
from kvmfw_x86.context import MSR_MTRR_DEF_TYPE, MTRR_DEF_ENABLE, MTRR_TYPE_WB, Segment, X86Context

log = get_logger("kvmfw.x86.loaders")

GDT_ADDR = 0x500
BOOT_PARAMS_ADDR = 0x7000
STACK_TOP = 0x8000
MBI_ADDR = 0x9000
MB_MMAP_ADDR = 0x9100
PML4_ADDR = 0xA000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
KERNEL_ADDR = 0x100000

SEL_CODE32, SEL_CODE, SEL_DATA, SEL_CODE64, SEL_UCODE64, SEL_UDATA = (
    0x08, 0x10, 0x18, 0x20, 0x2B, 0x33)
CR0_PE, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_LME, EFER_LMA = 1 << 8, 1 << 10

MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
BOOT_LOADER_NAME = b"qemu"
"""The multiboot boot loader name, as QEMU's ``-kernel`` reports it."""
E820_RAM, E820_RESERVED = 1, 2
FIRMWARE_AREA = 0xE0000
"""0xE0000-0xFFFFF: the ACPI tables (0xE0000), the fallback boot structures (0xE8000) and
the MP tables (0xF0000), reserved in e820."""
ALT_GDT_ADDR = 0xE8000
ALT_PML4_ADDR = 0xE9000
"""Page tables when the image covers 0xA000-0xFFFF (six pages, to 0xEEFFF)."""
ALT_STACK_TOP = 0xF0000
"""Stack when the image covers the page below 0x8000 (one page, 0xEF000-0xEFFFF)."""

def _clear(gpa: int, size: int, image: Any) -> bool:
    """True if ``[gpa, gpa + size)`` overlaps none of the image's ``(start, end)`` spans."""
    return all(gpa + size <= a or b <= gpa for a, b in image)


def gdt_addr(image: Any = ()) -> int:
    return GDT_ADDR if _clear(GDT_ADDR, 0x40, image) else ALT_GDT_ADDR


def pml4_addr(image: Any = ()) -> int:
    return PML4_ADDR if _clear(PML4_ADDR, 0x6000, image) else ALT_PML4_ADDR


def stack_top(image: Any = ()) -> int:
    return STACK_TOP if _clear(STACK_TOP - 0x1000, 0x1000, image) else ALT_STACK_TOP


def _gdt(long_code: bool) -> bytes:
    code32 = 0x00CF9B000000FFFF
    code64 = 0x00AF9B000000FFFF
    return struct.pack("<7Q", 0, code32, code64 if long_code else code32, 0x00CF93000000FFFF,
                       code64, 0x00AFFB000000FFFF, 0x00CFF3000000FFFF)


def _seg(selector: int, *, code: bool, long: bool = False, dpl: int = 0) -> Segment:
    return Segment(base=0, limit=0xFFFFFFFF, selector=selector, type=11 if code else 3,
                   present=1, dpl=dpl, db=0 if long else 1, s=1, l=1 if long else 0, g=1)


def check_fits(machine: Any, gpa: int, size: int, what: str) -> None:
    """Fail with an :class:`ImageError` unless ``[gpa, gpa + size)`` is guest RAM: called
    with sizes taken from an image *before* anything of that size is allocated or copied."""
    if gpa < 0 or size < 0 or not machine.memory.contains(gpa, size):
        raise ImageError(f"{what} does not fit in guest RAM: {size:#x} bytes at {gpa:#x} "
                         f"(RAM is {machine.config.memory >> 20} MiB; increase --memory)")


def write(machine: Any, gpa: int, data: Any, what: str) -> None:
    """Copy ``data`` (bytes or any buffer) into guest RAM, or fail with an
    :class:`ImageError` saying why."""
    if not len(data):
        return
    check_fits(machine, gpa, len(data), what)
    machine.memory.write(gpa, data)


def write_image(machine: Any, gpa: int, image: Any, offset: int, size: int,
                what: str) -> None:
    """Copy ``size`` bytes of ``image`` from ``offset`` into guest RAM: read from the
    image's file when it is a :class:`~kvmfw.imagefile.FileMapping` (no source page is
    faulted in), else sliced from its buffer. Fails with an :class:`ImageError`."""
    if size <= 0:
        return
    check_fits(machine, gpa, size, what)
    if offset < 0 or offset + size > len(image):
        raise ImageError(f"{what}: {size:#x} bytes at offset {offset:#x} are past the end of "
                         f"its image ({len(image):#x} bytes)")
    try:
        copy_into(machine.memory, gpa, image, offset, size)
    except (OSError, EOFError) as exc:
        raise ImageError(f"cannot read {what} from its image: {exc} (was the file changed "
                         "while kvmfw loaded it?)") from None


def zero_fill(machine: Any, gpa: int, size: int, what: str) -> None:
    """Zero ``size`` bytes of guest RAM at ``gpa`` in place (a BSS): no host buffer of
    that size is made, and whole pages of anonymous RAM are discarded rather than written
    (:meth:`~kvmfw.memory.GuestMemory.zero`; marked dirty for trackers)."""
    check_fits(machine, gpa, size, what)
    machine.memory.zero(gpa, size)


def ram_below_4g(machine: Any) -> int:
    return min(machine.config.memory, 0xC0000000)


def e820_map(machine: Any) -> list[tuple[int, int, int]]:
    """The PC memory map a BIOS would report: ``[(base, length, type), ...]``."""
    low = ram_below_4g(machine)
    m = [(0, 0x9FC00, E820_RAM), (0x9FC00, 0x400, E820_RESERVED),
         (FIRMWARE_AREA, 0x100000 - FIRMWARE_AREA, E820_RESERVED),
         (0x100000, low - 0x100000, E820_RAM)]
    if machine.config.memory > low:
        m.append((1 << 32, machine.config.memory - low, E820_RAM))
    return m


# --- entry states ----------------------------------------------------------------------

def boot_context(machine: Any) -> X86Context:
    cpu = machine.cpus[0]
    ctx: X86Context = cpu.get_context(SyncLevel.FULL)
    return ctx


def enable_mtrrs(machine: Any) -> None:
    """MTRRs on with write-back as the default type, on every vCPU, as firmware leaves them
    (SeaBIOS; Firecracker does the same for its direct boot). A kernel entered without
    firmware otherwise finds them off (MTRRdefType 0) and Linux turns PAT off with them:
    "x86/PAT: MTRRs disabled, skipping PAT initialization too", every ioremap_wc mapping
    then uncached. No variable ranges: MMIO gets its type from the guest's page tables (PAT
    UC-), and under KVM guest RAM is write-back whatever the MTRRs say. Without MTRRs in
    the CPUID (or a KVM that does not emulate them), nothing to do."""
    for cpu in machine.cpus:
        ctx: X86Context = cpu.get_context(SyncLevel.FULL)
        if MSR_MTRR_DEF_TYPE in ctx.info.msr_indices:
            ctx.set_msr(MSR_MTRR_DEF_TYPE, MTRR_DEF_ENABLE | MTRR_TYPE_WB)


def enter_real_mode(machine: Any, cs: int, ip: int, sp: int = STACK_TOP) -> None:
    """Real mode at ``cs:ip`` (data segments = 0, stack at ``0:sp``)."""
    ctx = boot_context(machine)
    ctx.cs = Segment(base=cs << 4, limit=0xFFFF, selector=cs, type=11)
    for s in ("ds", "es", "fs", "gs", "ss"):
        setattr(ctx, s, Segment(base=0, limit=0xFFFF, selector=0, type=3))
    ctx.cr0 = CR0_ET
    ctx.cr4 = 0
    ctx.efer = 0
    ctx.rip = ip
    ctx.rsp = sp
    ctx.rflags = 2


def enter_protected_mode(machine: Any, entry: int, *, paging: bool = False,
                         image: Any = ()) -> None:
    """32-bit protected mode, flat segments (CS 0x10, data 0x18), paging off; the GDT
    where it does not overwrite the ``image`` spans."""
    gdt = gdt_addr(image)
    write(machine, gdt, _gdt(False), "the GDT")
    ctx = boot_context(machine)
    ctx.gdt = (gdt, len(_gdt(False)) - 1)
    ctx.idt = (0, 0)
    ctx.cs = _seg(SEL_CODE, code=True)
    for s in ("ds", "es", "fs", "gs", "ss"):
        setattr(ctx, s, _seg(SEL_DATA, code=False))
    ctx.cr0 = CR0_PE | CR0_ET
    ctx.cr3 = 0
    ctx.cr4 = 0
    ctx.efer = 0
    ctx.rip = entry
    ctx.rflags = 2


def identity_page_tables(machine: Any, user: bool = True, base: int = PML4_ADDR) -> int:
    """Identity-map the first 4 GiB with 2 MiB pages at ``base`` (six pages); returns the
    PML4 address."""
    u = 0x4 if user else 0
    pdpt = base + 0x1000
    pd = base + 0x2000
    write(machine, base, struct.pack("<Q", pdpt | 0x3 | u).ljust(0x1000, b"\0"),
          "page tables")
    write(machine, pdpt, struct.pack("<4Q", *(pd + i * 0x1000 | 0x3 | u for i in range(4)))
          .ljust(0x1000, b"\0"), "page tables")
    # entry i = i << 21 | flags (flags < 2 MiB): a range with a 2 MiB step, built in C
    pds = array.array("Q", range(0x83 | u, (2048 << 21) + (0x83 | u), 1 << 21))
    if sys.byteorder != "little":
        pds.byteswap()
    write(machine, pd, pds.tobytes(), "page tables")
    return base


def enter_long_mode(machine: Any, entry: int, *, sse: bool = True, image: Any = ()) -> None:
    """64-bit long mode: CS 0x10 (L=1), data 0x18, identity-mapped 4 GiB, interrupts off;
    GDT, page tables and stack where they do not overwrite the ``image`` spans."""
    gdt = _gdt(True)
    write(machine, gdt_addr(image), gdt, "the GDT")
    pml4 = identity_page_tables(machine, base=pml4_addr(image))
    ctx = boot_context(machine)
    ctx.gdt = (gdt_addr(image), len(gdt) - 1)
    ctx.idt = (0, 0)
    ctx.cs = _seg(SEL_CODE, code=True, long=True)
    for s in ("ds", "es", "fs", "gs", "ss"):
        setattr(ctx, s, _seg(SEL_DATA, code=False))
    ctx.cr3 = pml4
    ctx.cr4 = CR4_PAE | ((CR4_OSFXSR | CR4_OSXMMEXCPT) if sse else 0)
    ctx.efer = EFER_LME | EFER_LMA
    ctx.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    ctx.rip = entry
    ctx.rsp = stack_top(image)
    ctx.rflags = 2


# --- formats -----------------------------------------------------------------------------

def read_image(image: str | os.PathLike[str], what: str = "kernel",
               limit: int | None = None) -> bytes:
    """The file's bytes; with ``limit`` (the guest RAM it must fit in), a larger file is
    refused from its size, before it is read."""
    p = os.fspath(image)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if limit is not None and size > limit:
                raise ImageError(f"{what} image {p} ({size:#x} bytes) is larger than the "
                                 f"guest RAM it must fit in ({limit:#x} bytes; increase "
                                 "--memory)")
            if limit is None:
                return f.read()
            data = f.read(limit + 1)  # a device or pipe has no size: read at most this
            if len(data) > limit:
                raise ImageError(f"{what} image {p} is larger than the guest RAM it must "
                                 f"fit in ({limit:#x} bytes; increase --memory)")
            return data
    except FileNotFoundError:
        raise ImageError(f"{what} image {p} does not exist") from None
    except IsADirectoryError:
        raise ImageError(f"{what} image {p} is a directory") from None
    except OSError as exc:
        raise ImageError(f"cannot read {what} image {p}: {exc.strerror}") from None


def map_image(image: str | os.PathLike[str], what: str = "kernel") -> Any:
    """The file mapped read-only (bytes-like: ``len``, slicing, ``struct``; and a stream
    for the ELF parser): a kernel with gigabytes of debug information is never copied
    whole; only the pieces the loader validated are. Empty files give ``b""``."""
    p = os.fspath(image)
    try:
        return map_file(p)
    except FileNotFoundError:
        raise ImageError(f"{what} image {p} does not exist") from None
    except IsADirectoryError:
        raise ImageError(f"{what} image {p} is a directory") from None
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise ImageError(f"cannot read {what} image {p}: {why}") from None


def map_or_read_image(image: str | os.PathLike[str], what: str, limit: int) -> Any:
    """A regular file that fits in ``limit`` mapped read-only (:func:`map_image`: its one
    copy is the one into guest RAM, no buffer of its size is allocated and faulted in
    first); anything else (a pipe, a device, a file too large or gone) exactly as
    :func:`read_image` reads or refuses it. The caller closes a mapping."""
    try:
        st = os.stat(image)
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode) or not 0 < st.st_size <= limit:
        return read_image(image, what, limit)
    data = map_image(image, what)
    if len(data) > limit:  # it grew since the stat
        if isinstance(data, mmap.mmap):
            data.close()
        return read_image(image, what, limit)
    return data


def initrd_image(image: str | os.PathLike[str], decompress: str, top: int, floor: int,
                 limit: int) -> Any:
    """The initrd to load (a mapping the caller closes, or bytes): with ``decompress=host``
    and a Linux initramfs whose compressed parts decompress to what still fits page
    aligned between ``floor`` and ``top``, those parts decompressed on the host, cached
    (:mod:`kvmfw.initramfs`: the guest skips inflating them); otherwise the file as it
    is, refused beyond ``limit``."""
    if decompress == "host":
        flat = initramfs.uncompressed(os.fspath(image), top - floor, log.info)
        if flat is not None and (top - len(flat)) & ~0xFFF >= floor:
            return flat
        if isinstance(flat, mmap.mmap):
            flat.close()
    return map_or_read_image(image, "initrd", limit)


def detect(data: bytes) -> str:
    """``bzimage``, ``multiboot``, ``elf`` or ``unknown``."""
    if len(data) >= 0x206 and data[0x202:0x206] == b"HdrS":
        return "bzimage"
    if find_multiboot_header(data) is not None:
        return "multiboot"
    if data[:4] == b"\x7fELF":
        return "elf"
    return "unknown"


_last_boot: weakref.WeakKeyDictionary[Any, tuple[str, dict[str, Any]]] = \
    weakref.WeakKeyDictionary()


def last_boot(machine: Any) -> tuple[str, dict[str, Any]] | None:
    """The arguments of the last successful :func:`load` on ``machine``: a reboot loads
    the guest again with them (as QEMU copies ``-kernel`` again at every reset)."""
    return _last_boot.get(machine)


def load(machine: Any, image: str, options: dict[str, Any]) -> bool:
    """Load ``image`` by its detected format (the ``load_guest`` hook)."""
    data = map_image(image)
    try:
        fmt = options.get("format") or ("flat" if options.get("load_addr") is not None
                                         else detect(data))
        if fmt == "bzimage":
            load_bzimage(machine, data, options, source=image)
        elif fmt == "multiboot":
            load_multiboot(machine, data, image, options)
        elif fmt == "elf":
            load_elf(machine, data)
        elif fmt == "flat":
            load_flat(machine, data, _load_addr(options.get("load_addr")))
        else:
            raise ImageError(f"{image}: unknown image format (not an ELF, multiboot or Linux "
                             "bzImage; give --load-addr to load a flat binary)")
    finally:
        if isinstance(data, mmap.mmap):
            try:
                data.close()
            except BufferError:  # a view still exported: the mapping goes with it
                pass
    _last_boot[machine] = (str(image), dict(options))
    return True


def _load_addr(value: Any) -> int:
    if value is None or value == "":
        return 0x7C00
    try:
        return int(value, 0) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"load address must be an integer (0x7c00), not {value!r}") from None


def load_flat(machine: Any, data: bytes, load_addr: int = 0x7C00) -> None:
    """A flat binary at ``load_addr``, entered in real mode at its first byte."""
    if not data:
        raise ImageError("flat binary is empty")
    if load_addr + len(data) > 0x110000:
        raise ImageError(f"flat binary at {load_addr:#x} ({len(data)} bytes) is not reachable "
                         "in real mode (must end below 1 MiB + 64 KiB)")
    write(machine, load_addr, data, "flat binary")
    if load_addr < 0x10000:
        enter_real_mode(machine, 0, load_addr)
    else:
        enter_real_mode(machine, load_addr >> 4, load_addr & 0xF)


class _Segment:
    """A PT_LOAD segment: where its bytes are in the image; they are read only when written
    into guest RAM (:func:`write_image`, after the segment was checked against it)."""

    def __init__(self, paddr: int, vaddr: int, image: Any, offset: int, filesz: int,
                 memsz: int, phdr: int = 0) -> None:
        self.paddr, self.vaddr, self.memsz = paddr, vaddr, memsz
        self.image, self.offset, self.filesz = image, offset, filesz
        self.phdr = phdr
        """The file offset of its program header."""


# ELF header fields after e_ident (type, machine, version, entry, phoff, shoff, (flags),
# ehsize, phentsize, phnum, shentsize, shnum, shstrndx) and program headers, little-endian,
# per ELF class; read with struct rather than pyelftools, whose import alone costs a Linux
# boot ~50 ms of start-up
ELF_HEADER = {32: struct.Struct("<HHIIII4xHHHHHH"), 64: struct.Struct("<HHIQQQ4xHHHHHH")}
_PHDR32 = struct.Struct("<IIIIII")  # type, offset, vaddr, paddr, filesz, memsz
_PHDR64 = struct.Struct("<I4xQQQQQ")  # type, (flags), offset, vaddr, paddr, filesz, memsz
_EM_X86 = {3: "EM_386", 62: "EM_X86_64"}
_PT_LOAD = 1


def parse_elf(data: Any) -> tuple[int, int, list[_Segment]]:
    """``(class bits, entry, loadable segments)`` of a little-endian x86 ELF; truncation and
    bad headers raise :class:`ImageError`. Every offset and size is checked against the
    file before it is used; nothing is copied here (segments slice ``data`` when written)."""
    if data[:4] != b"\x7fELF":
        raise ImageError("not an ELF file (wrong magic)")
    if len(data) < 16 or data[4] not in (1, 2):
        raise ImageError("bad or truncated ELF: no valid class in its identification")
    if data[5] != 1:
        raise ImageError("big-endian ELF: not an x86 image")
    bits = 32 if data[4] == 1 else 64
    eh = ELF_HEADER[bits]
    if len(data) < 16 + eh.size:
        raise ImageError(f"truncated ELF: {len(data)} bytes, shorter than its header")
    _, machine, _, entry, phoff, _, _, phentsize, phnum, _, _, _ = eh.unpack_from(data, 16)
    if machine not in _EM_X86:
        raise ImageError(f"ELF is for machine {machine}, not x86 (EM_386 or EM_X86_64)")
    ph = _PHDR32 if bits == 32 else _PHDR64
    if phnum and phentsize < ph.size:
        raise ImageError(f"bad ELF: program header entries of {phentsize} bytes (needs "
                         f"{ph.size})")
    if phoff + phnum * phentsize > len(data):
        raise ImageError(f"bad or truncated ELF: {phnum} program headers at {phoff:#x} end "
                         f"past the file ({len(data):#x} bytes)")
    segs = []
    for i in range(phnum):
        at = phoff + i * phentsize
        typ, off, vaddr, paddr, fsz, msz = ph.unpack_from(data, at)
        if typ != _PT_LOAD or msz == 0:
            continue
        if off + fsz > len(data):
            raise ImageError(f"truncated ELF: segment at file offset {off:#x} needs "
                             f"{fsz:#x} bytes, the file has {len(data):#x}")
        if fsz > msz:
            raise ImageError("bad ELF: segment file size exceeds its memory size")
        if paddr + msz > 1 << bits:
            raise ImageError(f"bad ELF: segment at {paddr:#x} of {msz:#x} bytes wraps the "
                             "address space")
        segs.append(_Segment(paddr, vaddr, data, off, fsz, msz, at))
    if not segs:
        raise ImageError("ELF has no loadable segments")
    return bits, entry, segs


def install_firmware_tables(machine: Any, *, acpi_default: bool = True) -> None:
    """What a PC BIOS leaves in 0xE0000-0xFFFFF: the MP tables at 0xF0000 and, unless the
    machine option ``acpi=off``, the ACPI tables at 0xE0000 describing the machine's CPUs,
    PM block and virtio-mmio devices (every ELF, multiboot and bzImage guest gets them, as
    QEMU's firmware always provides them). Written before the image, so an image that
    loads there wins."""
    from kvmfw_x86 import acpi, mptable

    mptable.install(machine)
    if acpi.enabled(machine, acpi_default):
        acpi.install(machine)


def check_segments(machine: Any, segs: list[_Segment]) -> None:
    """Every segment inside guest RAM and no two overlapping (as QEMU refuses overlapping
    ROM regions), checked before a byte is written or a BSS is sized."""
    for s in segs:
        check_fits(machine, s.paddr, s.memsz, f"ELF segment at {s.paddr:#x}")
    spans = sorted((s.paddr, s.paddr + s.memsz) for s in segs)
    for (a0, a1), (b0, _) in zip(spans, spans[1:], strict=False):
        if b0 < a1:
            raise ImageError(f"bad ELF: segments at {a0:#x} and {b0:#x} overlap")


def _load_segments(machine: Any, segs: list[_Segment]) -> tuple[int, int]:
    check_segments(machine, segs)
    lo, hi = min(s.paddr for s in segs), max(s.paddr + s.memsz for s in segs)
    for s in segs:
        write_image(machine, s.paddr, s.image, s.offset, s.filesz, f"ELF segment at {s.paddr:#x}")
        zero_fill(machine, s.paddr + s.filesz, s.memsz - s.filesz,
                  f"ELF segment at {s.paddr:#x}")
    return lo, hi


def _phys_entry(entry: int, segs: list[_Segment]) -> int:
    for s in segs:
        if s.paddr <= entry < s.paddr + s.memsz:
            return entry
    for s in segs:
        if s.vaddr <= entry < s.vaddr + s.memsz:
            return entry - s.vaddr + s.paddr
    return entry


def load_elf(machine: Any, data: bytes) -> None:
    """ELF32 -> 32-bit protected mode; ELF64 -> 64-bit long mode (identity-mapped)."""
    bits, entry, segs = parse_elf(data)
    install_firmware_tables(machine)
    _load_segments(machine, segs)
    entry = _phys_entry(entry, segs)
    image = [(s.paddr, s.paddr + s.memsz) for s in segs]
    if bits == 64:
        enter_long_mode(machine, entry, image=image)
    else:
        enter_protected_mode(machine, entry, image=image)
        boot_context(machine).rsp = stack_top(image)


# --- multiboot v1 -------------------------------------------------------------------------

def find_multiboot_header(data: bytes) -> int | None:
    """Offset of a valid multiboot v1 header in the first 8 KiB, or None."""
    limit = min(len(data), 8192) - 12
    for off in range(0, max(limit + 1, 0), 4):
        magic, flags, csum = struct.unpack_from("<III", data, off)
        if magic == MULTIBOOT_MAGIC and (magic + flags + csum) & 0xFFFFFFFF == 0:
            return off
    return None


def _split_modules(spec: Any) -> list[str]:
    """QEMU's ``-initrd "a args,b"`` syntax (``,,`` is a literal comma), or a list."""
    if not spec:
        return []
    if isinstance(spec, list | tuple):
        return [str(s) for s in spec]
    out, cur, i, s = [], "", 0, str(spec)
    while i < len(s):
        if s[i] == ",":
            if s[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            out.append(cur)
            cur = ""
        else:
            cur += s[i]
        i += 1
    out.append(cur)
    return [m for m in out if m]


def load_multiboot(machine: Any, data: bytes, image: str, options: dict[str, Any]) -> int:
    """Multiboot v1 as QEMU's ``-kernel``: returns the info structure's address."""
    hoff = find_multiboot_header(data)
    if hoff is None:
        raise ImageError("no multiboot header in the first 8 KiB")
    flags = struct.unpack_from("<I", data, hoff + 4)[0]
    if flags & 0x10000:  # a.out kludge: addresses in the header
        if len(data) < hoff + 32:
            raise ImageError("truncated multiboot header")
        header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<5I", data,
                                                                              hoff + 12)
        start = hoff - (header_addr - load_addr)
        if start < 0 or load_addr > header_addr:
            raise ImageError("bad multiboot header: load_addr above header_addr, or the "
                             "header lies before the file's start")
        if load_end and load_end < load_addr:
            raise ImageError(f"bad multiboot header: load_end_addr {load_end:#x} below "
                             f"load_addr {load_addr:#x}")
        size = (load_end - load_addr) if load_end else len(data) - start
        if start + size > len(data):
            raise ImageError(f"truncated multiboot image: needs {start + size:#x} bytes, "
                             f"the file has {len(data):#x}")
        if bss_end and bss_end < load_addr + size:
            raise ImageError(f"bad multiboot header: bss_end_addr {bss_end:#x} below the "
                             f"end of the loaded image {load_addr + size:#x}")
        kernel_end = max(load_addr + size, bss_end)
        check_fits(machine, load_addr, kernel_end - load_addr, "multiboot kernel")
        install_firmware_tables(machine)
        write(machine, load_addr, data[start:start + size], "multiboot kernel")
        zero_fill(machine, load_addr + size, kernel_end - load_addr - size,
                  "multiboot kernel BSS")
        lo, hi = load_addr, kernel_end
        spans: list[tuple[int, int]] = [(lo, hi)]
    else:
        if data[:4] != b"\x7fELF":
            raise ImageError("multiboot image without address fields must be an ELF file")
        bits, entry, segs = parse_elf(data)
        if bits != 32:
            raise ImageError("multiboot kernels must be ELF32 containers (as QEMU requires; "
                             "64-bit code inside an ELF32 is fine)")
        install_firmware_tables(machine)
        lo, hi = _load_segments(machine, segs)
        entry = _phys_entry(entry, segs)
        spans = [(s.paddr, s.paddr + s.memsz) for s in segs]
    mem = machine.memory
    page = 0x1000
    cursor = (hi + page - 1) & ~(page - 1)

    def put(blob: bytes) -> int:
        nonlocal cursor
        a = cursor
        write(machine, a, blob, "multiboot boot information")
        cursor += len(blob)
        return a

    # modules (--initrd), page aligned, each with its command line
    mods = []
    for spec in _split_modules(options.get("initrd")):
        path = spec.split(" ", 1)[0]
        blob = read_image(path, "multiboot module (--initrd)", machine.config.memory)
        cursor = (cursor + page - 1) & ~(page - 1)
        start = put(blob)
        mods.append((start, start + len(blob), spec))
    cmdline = f"{image} {options.get('cmdline') or ''}".rstrip() \
        if options.get("cmdline") is not None else str(image)
    cmd_addr = put(cmdline.encode() + b"\0")
    mod_cmds = [put(spec.encode() + b"\0") for _, _, spec in mods]
    name_addr = put(BOOT_LOADER_NAME + b"\0")
    cursor = (cursor + 15) & ~15
    mods_addr = put(b"".join(struct.pack("<4I", s, e, c, 0)
                             for (s, e, _), c in zip(mods, mod_cmds, strict=True))) \
        if mods else 0
    mmap = b"".join(struct.pack("<IQQI", 20, b, n, t) for b, n, t in e820_map(machine))
    low = _clear(MBI_ADDR, MB_MMAP_ADDR + len(mmap) - MBI_ADDR, spans)
    if low:
        mbi_addr, mmap_addr = MBI_ADDR, MB_MMAP_ADDR
        write(machine, mmap_addr, mmap, "multiboot memory map")
    else:  # the kernel lives there: the information follows the kernel instead
        cursor = (cursor + 15) & ~15
        mmap_addr = put(mmap)
        cursor = (cursor + 15) & ~15
        mbi_addr = cursor
    info_flags = 0x1 | 0x2 | 0x4 | 0x8 | 0x40 | 0x200
    mbi = struct.pack("<IIIIIII", info_flags, 640, ram_below_4g(machine) // 1024 - 1024,
                      0x8000FFFF, cmd_addr, len(mods), mods_addr)
    mbi = mbi.ljust(44, b"\0") + struct.pack("<IIIIII", len(mmap), mmap_addr, 0, 0, 0,
                                             name_addr)
    write(machine, mbi_addr, mbi.ljust(0x58, b"\0"), "multiboot info")
    del mem, lo
    enter_protected_mode(machine, entry, image=spans)
    ctx = boot_context(machine)
    ctx.idt = (0, 0x3FF)  # what QEMU's ROM leaves: the BIOS's real-mode IVT
    ctx.rax = MULTIBOOT_BOOTLOADER_MAGIC
    ctx.rbx = mbi_addr
    return mbi_addr


# --- Linux bzImage -----------------------------------------------------------------------

def load_bzimage(machine: Any, data: bytes, options: dict[str, Any], *,
                 source: str | None = None) -> None:
    """Linux through the x86 boot protocol's 64-bit entry (needs protocol >= 2.12).

    With the kernel file's path (``source``) and unless ``decompress=guest`` is given, the
    kernel proper is decompressed on the host and cached (:mod:`kvmfw_x86.vmlinux`) and
    entered directly, as its decompressor would have; otherwise, or where that cannot be
    done, the bzImage's own decompressor runs in the guest. The initrd likewise
    (:func:`initrd_image`)."""
    hsize = ffi.sizeof("struct setup_header")
    if len(data) < 0x1F1 + hsize:
        raise ImageError("truncated bzImage: shorter than its setup header")
    bp = ffi.new("struct boot_params *")
    hdr = bp.hdr
    ffi.memmove(ffi.addressof(hdr), data[0x1F1:0x1F1 + hsize], hsize)
    if hdr.boot_flag != 0xAA55 or hdr.header != 0x53726448:
        raise ImageError("not a Linux bzImage (no 0xAA55 boot flag / HdrS signature)")
    ver = int(hdr.version)
    if ver < 0x20C:
        raise ImageError(f"bzImage boot protocol {ver >> 8}.{ver & 0xFF} is too old for the "
                         "64-bit entry (needs 2.12, Linux 3.8 or newer)")
    if not hdr.xloadflags & 1:
        raise ImageError("this bzImage has no 64-bit entry point (XLF_KERNEL_64 clear)")
    if not hdr.loadflags & 1:
        raise ImageError("bzImage is not loaded high (zImage is not supported)")
    setup_sects = int(hdr.setup_sects) or 4
    koff = (setup_sects + 1) * 512
    ram = ram_below_4g(machine)
    klen = len(data) - koff
    if klen < int(hdr.syssize) * 16 or klen <= 0:
        raise ImageError(f"truncated bzImage: the header announces {int(hdr.syssize) * 16:#x} "
                         f"bytes of kernel, the file has {max(klen, 0):#x}")
    if KERNEL_ADDR + max(klen, int(hdr.init_size)) > ram:
        raise ImageError(f"the Linux kernel needs {max(klen, int(hdr.init_size)) >> 20} MiB "
                         f"above 1 MiB (init_size), more than the {ram >> 20} MiB of guest RAM "
                         "below 4 GiB (increase --memory)")
    kernel = memoryview(data)[koff:]  # (a view: the one copy is into guest RAM)
    # the header as the kernel wrote it, up to its own end (0x202 + jump offset)
    end = min(0x202 + data[0x201], 0x1F1 + hsize)
    raw = bytearray(bytes(ffi.buffer(bp)))
    raw[0x1F1:end] = data[0x1F1:end]
    ffi.memmove(bp, bytes(raw), len(raw))
    load_at = int(hdr.pref_address) or 0x1000000
    if load_at + max(int(hdr.init_size), len(kernel)) > ram:
        load_at = KERNEL_ADDR
    align = int(hdr.kernel_alignment) or 0x200000
    if hdr.relocatable_kernel and load_at % align:
        load_at = (load_at + align - 1) // align * align
    entry = load_at + 0x200  # the decompressor's 64-bit entry (startup_64)
    how = options.get("decompress") or "host"
    if how not in ("host", "guest"):
        raise ConfigError(f"decompress={how!r}: give decompress=host (the kernel proper and "
                          "the initramfs are decompressed on the host, cached) or "
                          "decompress=guest")
    if how == "guest" and options.get("kaslr") not in (None, ""):
        raise ConfigError("kaslr= places the kernel kvmfw decompresses; with decompress=guest "
                          "the kernel's own decompressor chooses (nokaslr on the kernel "
                          "command line turns it off)")
    proper = _kernel_proper(data, hdr, koff, load_at, ram, source) \
        if how == "host" and source is not None else None
    cmdline = (options.get("cmdline") or "").encode()
    limit = int(hdr.cmdline_size) or 255
    if len(cmdline) > limit:
        raise ImageError(f"kernel command line is {len(cmdline)} bytes, this kernel accepts "
                         f"at most {limit}")
    rd: Any = None
    try:
        rd_addr = ram  # (the initrd's address: the host-decompressed kernel goes below it)
        initrd = options.get("initrd")
        if initrd:
            top = min(int(hdr.initrd_addr_max) + 1 if hdr.initrd_addr_max else ram, ram)
            floor = load_at + max(int(hdr.init_size), len(kernel))
            rd = initrd_image(initrd, how, top, floor, ram)
            rd_addr = (top - len(rd)) & ~0xFFF
            if rd_addr < floor:
                raise ImageError(f"initrd of {len(rd) >> 20} MiB does not fit in guest RAM "
                                 "above the kernel (increase --memory)")
        if proper is None:
            write_image(machine, load_at, data, koff, len(kernel), "Linux kernel")
        else:
            entry, load_at = _load_proper(machine, proper, hdr, load_at, rd_addr,
                                          options.get("kaslr"), cmdline.decode())
        if rd is not None:
            write_image(machine, rd_addr, rd, 0, len(rd), "initrd")
            hdr.ramdisk_image = rd_addr & 0xFFFFFFFF
            hdr.ramdisk_size = len(rd) & 0xFFFFFFFF
            bp.ext_ramdisk_image = rd_addr >> 32
            bp.ext_ramdisk_size = len(rd) >> 32
    finally:
        for mapping in (rd, proper[2] if proper is not None else None):
            if isinstance(mapping, mmap.mmap):
                mapping.close()
    hdr.type_of_loader = 0xFF
    hdr.loadflags = (hdr.loadflags | 0x80) & ~0x20  # CAN_USE_HEAP, KEEP_SEGMENTS off
    hdr.heap_end_ptr = 0xFE00
    hdr.code32_start = load_at
    write(machine, CMDLINE_ADDR, cmdline + b"\0", "kernel command line")
    hdr.cmd_line_ptr = CMDLINE_ADDR
    e820 = e820_map(machine)
    for i, (b, n, t) in enumerate(e820):
        bp.e820_table[i].addr, bp.e820_table[i].size, bp.e820_table[i].type = b, n, t
    bp.e820_entries = len(e820)
    write(machine, BOOT_PARAMS_ADDR, bytes(ffi.buffer(bp)), "boot_params")
    install_firmware_tables(machine)  # CPUs, IO-APIC, PM, virtio-mmio
    enable_mtrrs(machine)
    enter_long_mode(machine, entry, sse=False)
    ctx = boot_context(machine)
    ctx.rsi = BOOT_PARAMS_ADDR
    ctx.rsp = STACK_TOP


def _load_proper(machine: Any, proper: tuple[int, list[_Segment], Any], hdr: Any,
                 link: int, limit: int, kaslr: Any, cmdline: str) -> tuple[int, int]:
    """Load the host-decompressed kernel proper (``_kernel_proper``'s entry, segments and
    ELF) linked at physical ``link``, and do the decompressor's KASLR
    (:mod:`kvmfw_x86.vmlinux`): placed below ``limit`` as the ``kaslr`` option and
    ``cmdline`` say, relocated, ``KASLR_FLAG`` set in ``hdr`` when it was randomized.
    Returns (64-bit entry, physical load address)."""
    from kvmfw_x86 import vmlinux

    entry, segs, elf = proper
    seed = vmlinux.kaslr_seed(kaslr, cmdline)
    span = max(s.paddr + s.memsz for s in segs) - link
    data_end = max(s.offset + s.filesz for s in segs)
    table = vmlinux.reloc_table(elf, data_end, link, span) if seed is not None else None
    place = vmlinux.kaslr_layout(
        seed, link=link, need=max(int(hdr.init_size), span), align=int(hdr.kernel_alignment),
        limit=limit, relocatable=table is not None and bool(hdr.relocatable_kernel))
    shift = place.phys - link
    if shift:
        segs = [_Segment(s.paddr + shift, s.vaddr, s.image, s.offset, s.filesz, s.memsz,
                         s.phdr) for s in segs]
    _load_segments(machine, segs)
    if place.seed is None:
        if seed is not None:
            vmlinux.log.info("KASLR: this kernel has no relocation table that fits it (built "
                             "without CONFIG_RANDOMIZE_BASE?): it runs where it is linked")
        hdr.loadflags &= ~0x02  # KASLR_FLAG: not randomized (the decompressor sets it)
        return entry, link
    if place.delta:
        assert table is not None  # (a layout with a seed had a table)
        vmlinux.relocate(machine.memory.view(place.phys, span), elf, table, link, place.delta)
        machine.memory.mark_dirty(place.phys, span)
    hdr.loadflags |= 0x02
    vmlinux.log.info("KASLR: the kernel at physical %#x, virtual %#x (seed %d: --option "
                     "kaslr=%d gives this layout again)", place.phys,
                     vmlinux.START_KERNEL_MAP + link + place.delta, place.seed, place.seed)
    return entry + shift, place.phys


def _kernel_proper(data: Any, hdr: Any, koff: int, load_at: int, ram: int,
                   source: str) -> tuple[int, list[_Segment], Any] | None:
    """``(64-bit entry, segments, the ELF they slice: the caller closes it)`` of the
    bzImage's kernel proper decompressed on the host (:mod:`kvmfw_x86.vmlinux`), when it
    can be entered as its decompressor would: an x86-64 ELF linked to run where this loader
    puts the kernel (``load_at``, so nothing needs relocating) and inside the kernel's
    ``init_size``. None otherwise (logged): the guest decompresses it."""
    from kvmfw_x86 import vmlinux

    if int(hdr.version) < 0x208:  # no payload_offset/payload_length before protocol 2.08
        return None
    p = vmlinux.payload(data, koff, int(hdr.payload_offset), int(hdr.payload_length))
    if p is None:
        return None
    elf = vmlinux.cached(source, p, ram)
    if elf is None:
        return None
    try:
        bits, entry, segs = parse_elf(elf)
        top = load_at + int(hdr.init_size)
        lo = min(s.paddr for s in segs)
        if bits != 64 or lo != load_at or any(s.paddr + s.memsz > top for s in segs) \
                or not lo <= entry < top:
            raise ImageError(f"linked at {lo:#x} (entry {entry:#x}), not in {load_at:#x}-"
                             f"{top:#x} where it is loaded")
    except ImageError as exc:
        vmlinux.log.warning("%s: the decompressed kernel cannot be entered directly (%s); the "
                            "kernel decompresses itself", source, exc)
        if isinstance(elf, mmap.mmap):
            elf.close()
        return None
    return entry, segs, elf

"""Guest images for arm64: the Linux ``Image`` boot protocol, ELF64 and flat binaries.

``Image`` (Documentation/arch/arm64/booting.rst): a 64-byte header with ``text_offset``,
``image_size``, ``flags`` and the magic ``ARM\\x64`` at 0x38. The kernel goes at a 2 MiB
aligned base + ``text_offset``; x0 holds the device tree address, x1-x3 are zero, and the
CPU starts at EL1h with DAIF masked and the MMU off. A gzip-compressed Image (Debian's
``vmlinuz``) is decompressed first.
"""

from __future__ import annotations

import struct

from kvmfw.errors import ImageError
from kvmfw.record import Frozen

IMAGE_MAGIC = 0x644D5241  # "ARM\x64"
_IMAGE_HDR = struct.Struct("<IIQQQQQQII")
IMAGE_HEADER_SIZE = _IMAGE_HDR.size  # 64
LEGACY_TEXT_OFFSET = 0x80000
SZ_2M = 2 << 20

EM_AARCH64 = 183
PT_LOAD = 1
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")

PSTATE_EL1H_DAIF = 0x3C5
"""PSTATE for boot: EL1 using SP_EL1 (EL1h), D, A, I and F masked."""


class ImageHeader(Frozen):
    """The fields of an arm64 ``Image`` header that the boot protocol uses."""

    text_offset: int
    image_size: int
    flags: int

    @property
    def big_endian(self) -> bool:
        return bool(self.flags & 1)

    @property
    def page_size(self) -> int | None:
        """The kernel's page size from flags bits 1-2 (None: unspecified)."""
        return {0: None, 1: 4096, 2: 16384, 3: 65536}[(self.flags >> 1) & 3]

    @property
    def anywhere(self) -> bool:
        """Bit 3: the 2 MiB aligned base may be anywhere in physical memory."""
        return bool(self.flags & 8)


def is_image(data: bytes) -> bool:
    """True if ``data`` starts with an arm64 ``Image`` header."""
    return len(data) >= IMAGE_HEADER_SIZE and struct.unpack_from("<I", data, 0x38)[0] == IMAGE_MAGIC


def parse_image_header(data: bytes) -> ImageHeader:
    """Check and decode an arm64 ``Image`` header; :class:`ImageError` if it is not one."""
    if len(data) < IMAGE_HEADER_SIZE:
        raise ImageError(f"too short for an arm64 Image header ({len(data)} bytes)")
    (_code0, _code1, text_offset, image_size, flags, _r2, _r3, _r4, magic,
     _r5) = _IMAGE_HDR.unpack_from(data)
    if magic != IMAGE_MAGIC:
        raise ImageError(f"not an arm64 Image (magic {magic:#010x} at 0x38, expected "
                         f"{IMAGE_MAGIC:#010x})")
    if image_size == 0:  # kernels before 3.17: text_offset unreliable, use the default
        text_offset = LEGACY_TEXT_OFFSET
    hdr = ImageHeader(text_offset, image_size, flags)
    if hdr.big_endian:
        raise ImageError("big-endian arm64 Image: kvmfw boots little-endian kernels only")
    if text_offset % 4096:
        raise ImageError(f"arm64 Image text_offset {text_offset:#x} is not page aligned")
    return hdr


def image_load_address(hdr: ImageHeader, ram_base: int) -> int:
    """Where the Image goes: the first 2 MiB aligned base in RAM + ``text_offset``."""
    base = (ram_base + SZ_2M - 1) & ~(SZ_2M - 1)
    return base + hdr.text_offset


GZIP_MAGIC = b"\x1f\x8b"


def maybe_decompress(data: bytes, limit: int) -> bytes:
    """Gunzip a compressed kernel (``vmlinuz``) of at most ``limit`` bytes (the guest RAM:
    a file claiming more is refused before it is inflated past it); other data is returned
    unchanged."""
    if data[:2] != GZIP_MAGIC:
        return data
    import zlib  # (only here: a start-up with an uncompressed Image does without it)

    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ImageError(f"corrupt gzip-compressed kernel: {exc}") from None
    if len(out) > limit:
        raise ImageError(f"the gzip-compressed kernel inflates to more than the guest RAM "
                         f"({limit:#x} bytes): give the machine more memory")
    if not d.eof:
        raise ImageError("corrupt gzip-compressed kernel: truncated")
    return out


class Segment(Frozen):
    """Bytes to place at a guest-physical address (``memsz`` >= ``len(data)``, rest zero)."""

    addr: int
    data: bytes
    memsz: int


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def parse_elf(data: bytes) -> tuple[int, list[Segment]]:
    """``(entry, PT_LOAD segments at their physical addresses)`` of an AArch64 ELF64."""
    if len(data) < _EHDR.size or not is_elf(data):
        raise ImageError("not an ELF file")
    ident = data[:16]
    if ident[4] != 2 or ident[5] != 1:
        raise ImageError("only little-endian ELF64 images are supported")
    (_ident, _type, machine, _ver, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum,
     _shentsize, _shnum, _shstrndx) = _EHDR.unpack_from(data)
    if machine != EM_AARCH64:
        raise ImageError(f"ELF machine {machine} is not AArch64 ({EM_AARCH64})")
    if phentsize < _PHDR.size or phoff + phnum * phentsize > len(data):
        raise ImageError("truncated ELF program headers")
    segs = []
    for i in range(phnum):
        p_type, _pf, off, _vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(
            data, phoff + i * phentsize)
        if p_type != PT_LOAD or memsz == 0:
            continue
        if off + filesz > len(data):
            raise ImageError(f"ELF segment {i} extends past the end of the file")
        segs.append(Segment(paddr, data[off:off + filesz], memsz))
    if not segs:
        raise ImageError("ELF image has no loadable segment")
    return entry, segs

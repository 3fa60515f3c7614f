"""The kernel inside a bzImage, decompressed on the host, once, and cached.

A bzImage is a small decompressor plus the kernel proper (``vmlinux``, an ELF) compressed
as its payload. Booted as is, the guest decompresses and relocates ~50 MiB before the
kernel starts: about a quarter of a second under TCG, more under nested virtualization.
kvmfw decompresses the payload on the host instead, at most once per kernel file
(:func:`kvmfw.cache.derived`), and the loader enters the kernel proper at its 64-bit entry
with the same boot parameters, as the decompressor would have (Firecracker boots a vmlinux
the same way).

The decompressor's other job, KASLR, is done here too (:func:`kaslr_layout`,
:func:`relocate`), so the guest is laid out as under QEMU or on hardware: unless the
command line says ``nokaslr`` (or ``--option kaslr=off``), the kernel goes to a random
physical address and a random virtual one, its relocation table is applied, and
boot_params says so (``KASLR_FLAG``: the kernel then randomizes its own memory regions).
``--option kaslr=SEED`` gives the same layout on every run (the seed of a random layout is
logged). A kernel built without ``CONFIG_RANDOMIZE_BASE`` has no relocation table and stays
where it is linked, as its own decompressor would leave it.

Payload formats: gzip, bzip2, LZMA and XZ (the standard library), LZ4 (the ``lz4``
package: Debian's kernels) and zstd (the ``zstandard`` package: Ubuntu's and Fedora's). LZO,
or a package not installed, leaves the bzImage to decompress itself. Every size is bounded:
the build appends the uncompressed size to the payload; it must be at most ``limit``, and
no decompressor is allowed to produce more than it says.

Before it is cached the ELF's zero tails are trimmed (:func:`trim_zero_tails`): the linker
leaves zeros at the end of some segments' file images (in Debian's kernel 11.5 of the 44 MiB
loaded), which the loader would copy; with each segment's file size lowered past them it
zero-fills them instead, and mostly discards the pages rather than writes them
(:meth:`kvmfw.memory.GuestMemory.zero`).
"""

from __future__ import annotations

from typing import Any

from kvmfw import cache
from kvmfw.debug import get_logger
from kvmfw.errors import ImageError
from kvmfw.record import Frozen
from kvmfw.seed import draw, seed_option

log = get_logger("kvmfw.x86.vmlinux")

TAG = "vmlinux-2"
"""Cache tag: what :func:`decompress` produces (change it when that changes)."""
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20
"""The LZ4 legacy frame's block size (``lz4 -l``): no block decompresses to more."""


_PHDR64_FILESZ = 32
"""Where ``p_filesz`` is in an ELF64 program header."""
_SCAN = 64 << 10
"""Zero tails are scanned backwards this many bytes at a time."""
_ZERO_SCAN = bytes(_SCAN)


class _Corrupt(Exception):
    """The payload does not decompress to what it says: the guest's decompressor decides."""


def payload(data: Any, setup_end: int, payload_offset: int, payload_length: int) -> Any:
    """The compressed kernel (a view of ``data``), or None when the header's payload fields
    point outside the file. ``setup_end`` is where the protected-mode code starts."""
    start = setup_end + payload_offset
    if payload_length < 8 or start + payload_length > len(data):
        return None
    return memoryview(data)[start:start + payload_length]


def decompress(p: Any, limit: int) -> bytes | None:
    """The vmlinux ELF in payload ``p``, or None when its format cannot be decompressed here
    (LZO, a package missing) or it says it is larger than ``limit``. Raises
    :class:`_Corrupt` when it does not decompress to the size it declares."""
    size = int.from_bytes(p[-4:], "little")  # the kernel build's size_append (gzip: ISIZE)
    if not 0 < size <= limit:
        return None
    head = bytes(p[:6])
    out: bytes | None
    if head[:2] == b"\x1f\x8b":
        import zlib

        try:
            out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(p, size + 1)
        except zlib.error as exc:
            raise _Corrupt(str(exc)) from None
    elif head == b"\xfd7zXZ\x00" or head[:3] == b"\x5d\x00\x00":
        import lzma

        fmt = lzma.FORMAT_XZ if head[0] == 0xFD else lzma.FORMAT_ALONE
        try:
            out = lzma.LZMADecompressor(fmt).decompress(p[:-4], size + 1)
        except lzma.LZMAError as exc:
            raise _Corrupt(str(exc)) from None
    elif head[:3] == b"BZh":
        import bz2

        try:
            out = bz2.BZ2Decompressor().decompress(p[:-4], size + 1)
        except OSError as exc:
            raise _Corrupt(str(exc)) from None
    elif int.from_bytes(head[:4], "little") == LZ4_LEGACY_MAGIC:
        out = _lz4_legacy(p[:-4], size)
    elif head[:4] == b"\x28\xb5\x2f\xfd":
        out = _zstd(p[:-4], size)
    else:
        return None
    if out is not None and len(out) != size:
        raise _Corrupt(f"decompressed to {len(out)} bytes, the payload says {size}")
    return out


def _lz4_legacy(p: Any, size: int) -> bytes | None:
    """LZ4's legacy frame (``lz4 -l``, the kernel's): the magic, then blocks each preceded
    by its compressed length; a magic may start a new stream."""
    try:
        import lz4.block
    except ImportError:
        return None
    out = bytearray()
    pos, end = 4, len(p)
    while pos + 4 <= end:
        n = int.from_bytes(p[pos:pos + 4], "little")
        pos += 4
        if n == LZ4_LEGACY_MAGIC:
            continue
        if n == 0 or pos + n > end:
            raise _Corrupt(f"LZ4 block of {n} bytes at {pos - 4:#x} runs past the payload")
        try:
            block = lz4.block.decompress(p[pos:pos + n], uncompressed_size=LZ4_LEGACY_BLOCK)
        except lz4.block.LZ4BlockError as exc:
            raise _Corrupt(str(exc)) from None
        out += block
        if len(out) > size:
            raise _Corrupt(f"LZ4 payload decompresses past the {size} bytes it declares")
        pos += n
    return bytes(out)


def _zstd(p: Any, size: int) -> bytes | None:
    try:
        import zstandard
    except ImportError:
        return None
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(bytes(p)) as r:
            while len(out) <= size:  # read at most one byte past what it declares
                chunk = r.read(size + 1 - len(out))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as exc:
        raise _Corrupt(str(exc)) from None
    return bytes(out)


def _last_nonzero(data: Any, start: int, end: int) -> int:
    """The offset just past the last non-zero byte of ``data[start:end]`` (``start`` when
    all are zero), scanning from the end: only the zero tail and one chunk are read."""
    while end > start:
        lo = max(start, end - _SCAN)
        chunk = bytes(data[lo:end])
        if chunk != _ZERO_SCAN:  # (a memcmp; rstrip is a byte-at-a-time loop)
            kept = len(chunk.rstrip(b"\0"))
            if kept:
                return lo + kept
        end = lo
    return start


def trim_zero_tails(elf: bytes) -> bytes | bytearray:
    """``elf`` with each PT_LOAD segment's file size lowered past the zeros its file image
    ends with (its memory size unchanged: the loader zero-fills the rest), so that what a
    loader puts in guest RAM is the same, with fewer bytes copied. An ELF the loader
    would refuse (:func:`kvmfw_x86.loaders.parse_elf` validates it), an ELF32, or one whose
    program headers are themselves loaded (changing them would change guest RAM) is
    returned unchanged."""
    from kvmfw_x86.loaders import parse_elf  # (it imports this module when it needs it)

    try:
        bits, _, segs = parse_elf(elf)
    except ImageError:
        return elf
    if bits != 64:
        return elf
    fields = [s.phdr + _PHDR64_FILESZ for s in segs]
    if any(s.offset < f + 8 and f < s.offset + s.filesz for s in segs for f in fields):
        return elf
    new = [_last_nonzero(elf, s.offset, s.offset + s.filesz) - s.offset for s in segs]
    if all(n == s.filesz for n, s in zip(new, segs, strict=True)):
        return elf
    out = bytearray(elf)  # (the one copy, on a cache miss: cached, it is the file)
    for n, f in zip(new, fields, strict=True):
        out[f:f + 8] = n.to_bytes(8, "little")
    return out


def cached(source: str, p: Any, limit: int) -> Any:
    """The vmlinux ELF for payload ``p`` of kernel file ``source`` (a read-only mapping or
    bytes), from the cache or decompressed now; None when it cannot be had here (the
    guest then decompresses the bzImage itself; the reason is logged)."""
    def make() -> bytes | bytearray | None:
        try:
            out = decompress(p, limit)
        except _Corrupt as exc:
            log.warning("%s: the payload did not decompress on the host (%s); the kernel "
                        "decompresses itself", source, exc)
            return None
        if out is None:
            log.info("%s: payload format %s not decompressed on the host (LZO, the lz4 or "
                     "zstandard package missing, or larger than the guest RAM); the kernel "
                     "decompresses itself", source, bytes(p[:4]).hex())
            return None
        return trim_zero_tails(out)

    return cache.derived(source, "vmlinux", TAG, make)


# --- KASLR ---------------------------------------------------------------------------------

START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000
"""x86-64's ``__START_KERNEL_map``: a kernel virtual address is its link address plus this."""
KERNEL_IMAGE_SIZE = 1 << 30
"""The virtual window KASLR places the kernel in (``KERNEL_IMAGE_SIZE`` of a kernel built
with ``CONFIG_RANDOMIZE_BASE``, the only kind that carries a relocation table)."""
MIN_ALIGN = 2 << 20
"""The smallest alignment of an x86-64 kernel (``MIN_KERNEL_ALIGN``, one large page)."""
_M64 = (1 << 64) - 1


class Kaslr(Frozen):
    """Where a host-decompressed kernel goes: ``phys`` its physical load address, ``delta``
    how far its virtual addresses move, ``seed`` what chose them (None: not randomized)."""

    phys: int
    delta: int
    seed: int | None


def kaslr_seed(setting: Any, cmdline: str) -> int | None:
    """The seed of the layout the ``kaslr`` option asks for (:func:`kvmfw.seed.seed_option`:
    random unless it gives one), None when it is ``off`` or the kernel command line says
    ``nokaslr`` (which the decompressor obeys)."""
    seed = seed_option("kaslr", setting)
    return None if "nokaslr" in cmdline.split() else seed


def reloc_table(elf: Any, data_end: int, link: int, span: int) -> tuple[int, int] | None:
    """``(file offset, words)`` of the relocation table the kernel build appends to its
    ELF (``vmlinux.bin`` + ``vmlinux.relocs``) when the bytes after the ELF (its headers
    and ``data_end``, where its segments' file images end) are exactly one such table, with
    at least one entry and every entry inside the ``span`` bytes of image from physical
    ``link``; None otherwise (a kernel built without ``CONFIG_RANDOMIZE_BASE``, or anything
    else there): then the kernel is not moved."""
    from kvmfw_x86.loaders import ELF_HEADER  # (it imports this module when it needs it)

    if len(elf) < 64 or elf[4] != 2:
        return None
    _, _, _, _, phoff, shoff, _, phentsize, phnum, shentsize, shnum, _ = \
        ELF_HEADER[64].unpack_from(elf, 16)
    end = max(phoff + phnum * phentsize, shoff + shnum * shentsize, data_end, 64)
    if end > len(elf) or (len(elf) - end) % 4 or len(elf) - end < 16:
        return None
    words = (len(elf) - end) // 4
    return (end, words) if _walk(elf, (end, words), None, span, link, 0) > 0 else None


def _walk(elf: Any, table: tuple[int, int], image: Any, span: int, link: int,
          delta: int) -> int:
    """``kvmfw_x86_relocs`` on ``table`` of ``elf``: the count, or < 0 (see the C);
    ``image`` None only checks. Raises nothing: the caller decides."""
    from kvmfw_x86.abi import ffi, lib

    end, words = table
    rest = ffi.new("uint64_t *")
    tab = ffi.from_buffer("uint8_t[]", memoryview(elf)[end:end + 4 * words])
    img = ffi.NULL if image is None else ffi.from_buffer("uint8_t[]", image,
                                                         require_writable=True)
    n = int(lib.kvmfw_x86_relocs(tab, words, img, span, (START_KERNEL_MAP + link) & _M64,
                                 delta & _M64, rest))
    return n if n < 0 or rest[0] == 0 else -3  # (-3: words before the table's last zero)


def kaslr_layout(seed: int | None, *, link: int, need: int, align: int, limit: int,
                 relocatable: bool) -> Kaslr:
    """The decompressor's choice (``choose_random_location``) for a kernel linked at
    physical ``link`` that needs ``need`` bytes from its start: a physical address from
    ``link`` up to ``limit`` (where the initrd or the end of RAM below 4 GiB is) and a
    virtual offset in :data:`KERNEL_IMAGE_SIZE`, both in steps of ``align``. ``seed``
    None, a kernel without a relocation table (``relocatable`` False) or an alignment the
    kernel could not have leaves it where it is linked."""
    if seed is None or not relocatable or align < MIN_ALIGN or align & (align - 1) \
            or align > KERNEL_IMAGE_SIZE or link % align:
        return Kaslr(link, 0, None)
    r1, r2 = draw(seed, 2)
    phys_slots = (limit - need - link) // align + 1 if limit - link >= need else 1
    virt_slots = (KERNEL_IMAGE_SIZE - link - need) // align + 1 \
        if KERNEL_IMAGE_SIZE - link >= need else 1
    return Kaslr(link + r1 % phys_slots * align, r2 % virt_slots * align, seed)


def relocate(image: Any, elf: Any, table: tuple[int, int], link: int, delta: int) -> int:
    """Apply the relocation table at ``table`` (:func:`reloc_table`) of ``elf`` to the
    kernel's image in guest RAM (``image``, a writable view from the kernel's first byte,
    which is linked at physical ``link``) for a virtual offset ``delta``, as the
    decompressor's ``handle_relocations``; returns how many fields moved. Raises
    :class:`ImageError`, before writing anything, if the table does not fit the image."""
    n = _walk(elf, table, image, len(image), link, delta)
    if n < 0:
        raise ImageError(f"the kernel's relocation table does not fit its {len(image):#x}-"
                         "byte image")
    return n

"""A bzImage's kernel proper decompressed on the host (cached) and entered directly.

Each guest is a bzImage built here around two pieces of code: a stand-in "decompressor" at
the 64-bit entry (it reports 1) and, as the compressed payload, an ELF "kernel proper"
linked at 16 MiB (it reports the boot_params pointer it got in RSI, the loadflags byte
there, and 2). Which one reports says which path booted; both run on the real /dev/kvm.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import struct
from pathlib import Path

import pytest
from conftest import bzimage
from hypothesis import event, given, settings
from hypothesis import strategies as st
from kvmfw.errors import ConfigError, ImageError

from kvmfw_x86 import loaders, vmlinux

# 64-bit: mov eax, 1; out 0xe0, eax; out 0xe4, al; hlt
DECOMPRESSOR = bytes.fromhex("b801000000" "e7e0" "e6e4" "f4")
# 64-bit: mov eax, esi; out 0xe0, eax; movzx eax, byte [rsi+0x211]; out 0xe0, eax;
#         mov eax, 2; out 0xe0, eax; out 0xe4, al; hlt
PROPER = bytes.fromhex("89f0" "e7e0" "0fb6861102" "0000" "e7e0" "b802000000" "e7e0" "e6e4"
                       "f4")
BOOTED_BY_HOST = [0x7000, 0x81, 2]  # loadflags: LOADED_HIGH | CAN_USE_HEAP, KASLR_FLAG clear
BOOTED_BY_GUEST = [1]


def elf64(code: bytes, paddr: int = 0x1000000, memsz: int = 0x3000) -> bytes:
    """An x86-64 ELF with one PT_LOAD at ``paddr`` (the ELF and program headers, then
    ``code``, which is the entry), ``memsz`` bytes in memory (the rest zero)."""
    hdr = 64 + 56
    entry = paddr + hdr
    eh = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, entry, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, 0, 0xFFFFFFFF80000000 + paddr, paddr,
                     hdr + len(code), memsz, 0x1000)
    return eh + ph + code


def _lz4_legacy(data: bytes) -> bytes:
    import lz4.block

    out = bytearray(struct.pack("<I", vmlinux.LZ4_LEGACY_MAGIC))
    for i in range(0, len(data), vmlinux.LZ4_LEGACY_BLOCK):
        block = lz4.block.compress(data[i:i + vmlinux.LZ4_LEGACY_BLOCK], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return bytes(out)


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def _size(data: bytes) -> bytes:  # the kernel build's size_append
    return struct.pack("<I", len(data))


COMPRESS = {
    "gzip": lambda d: gzip.compress(d),  # its own ISIZE trailer is the size
    "bzip2": lambda d: bz2.compress(d) + _size(d),
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE) + _size(d),
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + _size(d),
    "lz4": lambda d: _lz4_legacy(d) + _size(d),
    "zstd": lambda d: _zstd(d) + _size(d),
}


def kernel_file(tmp_path: Path, payload: bytes, name: str = "bzImage") -> Path:
    """A bzImage: the stand-in decompressor at its 64-bit entry, ``payload`` after it."""
    body = bytearray(DECOMPRESSOR.rjust(0x200 + len(DECOMPRESSOR), b"\x90").ljust(0x400,
                                                                                b"\xf4"))
    body += payload
    body += bytes(-len(body) % 16)
    img = bytearray(bzimage(kernel=bytes(body)))
    img[0x211] = 0x03  # LOADED_HIGH | KASLR_FLAG (left set, as a decompressor would)
    struct.pack_into("<II", img, 0x248, 0x400, len(payload))  # payload_offset, _length
    p = tmp_path / name
    p.write_bytes(bytes(img))
    return p


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("KVMFW_CACHE", str(cache))
    return cache


def _boot(machine_factory, image: Path, **options: str) -> list[int]:  # type: ignore[no-untyped-def]
    m, rep = machine_factory(memory=64 << 20)
    loaders.load(m, str(image), {"cmdline": "", **options})
    m.run(timeout=20)
    return rep.values


@pytest.mark.parametrize("fmt", sorted(COMPRESS))
def test_the_kernel_proper_is_entered_directly(machine_factory, tmp_path: Path,
                                              fmt: str) -> None:
    """Every payload format the kernel builds (but LZO) is decompressed on the host; the
    guest starts in the kernel proper with RSI at boot_params and KASLR_FLAG clear."""
    image = kernel_file(tmp_path, COMPRESS[fmt](elf64(PROPER)))
    assert _boot(machine_factory, image) == BOOTED_BY_HOST
    assert _boot(machine_factory, image, decompress="guest") == BOOTED_BY_GUEST


def test_decompressed_once_and_again_when_the_file_changes(machine_factory, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            _own_cache: Path) -> None:
    calls = []
    real = vmlinux.decompress
    monkeypatch.setattr(vmlinux, "decompress", lambda p, limit: calls.append(1) or real(p, limit))
    image = kernel_file(tmp_path, COMPRESS["gzip"](elf64(PROPER)))
    for _ in range(3):
        assert _boot(machine_factory, image) == BOOTED_BY_HOST
    assert len(calls) == 1
    assert len(list((_own_cache / "vmlinux").iterdir())) == 1
    # the same path, a different kernel: never the stale entry
    kernel_file(tmp_path, COMPRESS["xz"](elf64(PROPER + b"\x90")))
    assert _boot(machine_factory, image) == BOOTED_BY_HOST
    assert len(calls) == 2


def test_without_a_cache_it_still_boots_from_the_host(machine_factory, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMFW_CACHE", "off")
    image = kernel_file(tmp_path, COMPRESS["lz4"](elf64(PROPER)))
    assert _boot(machine_factory, image) == BOOTED_BY_HOST


def _bad_payloads() -> dict[str, bytes]:
    good = elf64(PROPER)
    gz = gzip.compress(good)
    xz = COMPRESS["xz"](good)
    lz = COMPRESS["lz4"](good)
    return {
        "size says more": xz[:-4] + struct.pack("<I", len(good) + 1),
        "size says less": xz[:-4] + struct.pack("<I", len(good) - 1),
        "larger than RAM": xz[:-4] + struct.pack("<I", 0xFFFFFFF0),
        "corrupt xz": xz[:40] + bytes(len(xz) - 44) + xz[-4:],
        "truncated gzip": gz[:len(gz) // 2] + gz[-4:],
        "corrupt gzip": gz[:10] + b"\xff" * (len(gz) - 14) + gz[-4:],
        "lz4 block past the end": lz[:8] + struct.pack("<I", 1 << 30) + lz[12:],
        "lzo": b"\x89LZO\x00" + bytes(64) + _size(good),
        "not an ELF": gzip.compress(bytes(4096)),
        "linked elsewhere": gzip.compress(elf64(PROPER, paddr=0x2000000)),
        "ELF32": gzip.compress(good[:4] + b"\x01" + good[5:]),
        "past init_size": gzip.compress(elf64(PROPER, memsz=0x20000)),
        "empty": b"",
    }


@pytest.mark.parametrize("case", sorted(_bad_payloads()))
def test_a_payload_that_cannot_be_entered_directly_is_left_to_the_guest(
        machine_factory, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str) -> None:
    """Hostile or unusual payloads never fail the boot nor size a host buffer by what they
    claim: the bzImage's own decompressor runs, and the log says why."""
    image = kernel_file(tmp_path, _bad_payloads()[case])
    with caplog.at_level(logging.INFO, logger="kvmfw.x86.vmlinux"):
        assert _boot(machine_factory, image) == BOOTED_BY_GUEST
    if case != "empty":
        assert "decompresses itself" in caplog.text


def test_a_payload_outside_the_file_is_left_to_the_guest(machine_factory,
                                                         tmp_path: Path) -> None:
    image = kernel_file(tmp_path, COMPRESS["gzip"](elf64(PROPER)))
    data = bytearray(image.read_bytes())
    struct.pack_into("<II", data, 0x248, 0xFFFFFF00, 0x1000)
    image.write_bytes(bytes(data))
    assert _boot(machine_factory, image) == BOOTED_BY_GUEST


def test_a_decompression_bomb_is_stopped_at_the_size_it_declares(tmp_path: Path) -> None:
    """64 MiB of zeros declaring 4 KiB: the decompressor stops one byte past 4 KiB."""
    import tracemalloc

    bomb = gzip.compress(bytes(64 << 20))
    bomb = bomb[:-4] + struct.pack("<I", 4096)
    tracemalloc.start()
    try:
        with pytest.raises(vmlinux._Corrupt):
            vmlinux.decompress(memoryview(bomb), 1 << 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


@pytest.mark.parametrize("how, status", [("host", 0), ("guest", 0), ("gust", 2)])
def test_the_cli_takes_the_decompress_option(tmp_path: Path, how: str, status: int) -> None:
    import subprocess
    import sys

    image = kernel_file(tmp_path, COMPRESS["gzip"](elf64(PROPER)))
    r = subprocess.run([sys.executable, "-c", "from kvmfw.cli import main; main()", "run",
                        "--kernel", str(image), "--option", f"decompress={how}",
                        "--max-ticks", "1", "--console", "none", "--no-summary",
                        "--timeout", "60"],
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                       cwd="/")  # (not the checkout, whose kvmfw/ is not the built one)
    assert r.returncode == status, r.stderr
    if status:
        assert "choose one of host, guest" in r.stderr


def test_a_bzimage_run_imports_no_elf_library_hash_or_tempfile(tmp_path: Path,
                                                                _own_cache: Path) -> None:
    """The start-up cost this path must not pay (tens of ms each where the host is emulated):
    pyelftools (the kernel proper's program headers are read with struct), hashlib and
    tempfile (the cache names and writes its entries without them)."""
    from test_startup_x86 import run_probe

    image = kernel_file(tmp_path, COMPRESS["gzip"](elf64(PROPER)))
    assert run_probe(tmp_path / "xdg", "--max-ticks", "1")[0] == 0  # the entry-point index
    for _ in range(2):  # a cache miss, then a hit
        status, modules = run_probe(tmp_path / "xdg", "--kernel", str(image), "--max-ticks", "1")
        assert status == 0
        assert "kvmfw_x86.vmlinux" in modules
        assert not {m for m in modules if m.split(".")[0] in ("elftools", "hashlib",
                                                                "tempfile", "_hashlib")}
    assert len(list((_own_cache / "vmlinux").iterdir())) == 1  # ($KVMFW_CACHE)


# --- zero tails --------------------------------------------------------------------------

TAIL = 4 << 20
"""Zeros at the end of the second segment's file image (a BSS the linker put in the file)."""


def elf64_with_zero_tails(code: bytes = PROPER) -> bytes:
    """An x86-64 ELF as a kernel's: the headers, then two PT_LOAD segments at 2 MiB-aligned
    file offsets: ``code`` (the entry) at 16 MiB followed by 0x100 zeros, and at 18 MiB
    b"data" followed by :data:`TAIL` zeros in the file, 6 MiB in memory."""
    paddr = 0x1000000
    eh = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, paddr, 64, 0, 0, 64, 56, 2, 64, 0, 0)
    text = code + bytes(0x100)
    data = b"data" + bytes(TAIL)
    ph = b"".join(struct.pack("<IIQQQQQQ", 1, 7, off, 0xFFFFFFFF80000000 + pa, pa, len(b),
                              msz, 0x200000)
                  for off, pa, b, msz in ((0x1000, paddr, text, 0x3000),
                                          (0x2000, paddr + (2 << 20), data, 6 << 20)))
    return (eh + ph).ljust(0x1000, b"\0") + text.ljust(0x1000, b"\0") + data


def _with_init_size(image: Path, size: int) -> Path:
    data = bytearray(image.read_bytes())
    struct.pack_into("<I", data, 0x260, size)
    image.write_bytes(bytes(data))
    return image


def test_zero_tails_are_trimmed_in_the_cache_and_read_as_zeros_in_dirty_ram(
        machine_factory, tmp_path: Path, _own_cache: Path) -> None:
    """The cached vmlinux's segments end at their last non-zero byte (memory sizes kept);
    loaded over RAM that held something else, the trimmed bytes read as zeros, and the RAM
    past the segments keeps what it held."""
    image = _with_init_size(kernel_file(tmp_path, gzip.compress(elf64_with_zero_tails())),
                            8 << 20)
    m, rep = machine_factory(memory=64 << 20)
    lo, hi = 0x1000000, 0x1000000 + (8 << 20)
    m.memory.write(lo, b"\xa5" * (hi + 0x1000 - lo))
    loaders.load(m, str(image), {"cmdline": ""})
    (entry,) = list((_own_cache / "vmlinux").iterdir())
    assert entry.name.startswith(vmlinux.TAG + "-") and vmlinux.TAG == "vmlinux-2"
    _, _, segs = loaders.parse_elf(entry.read_bytes())
    assert [(s.paddr, s.filesz, s.memsz) for s in segs] == [
        (lo, len(PROPER), 0x3000), (lo + (2 << 20), 4, 6 << 20)]
    assert m.memory.read(lo, 0x3000) == PROPER + bytes(0x3000 - len(PROPER))
    assert m.memory.read(lo + 0x3000, 0x1000) == b"\xa5" * 0x1000  # between the segments
    assert m.memory.read(lo + (2 << 20), 6 << 20) == b"data" + bytes((6 << 20) - 4)
    assert m.memory.read(hi, 0x1000) == b"\xa5" * 0x1000  # past them
    m.run(timeout=20)
    assert rep.values == BOOTED_BY_HOST


def _loaded(elf: bytes) -> list[tuple[int, int, bytes]]:
    """What a loader puts in guest RAM for ``elf``: each segment's file bytes, then zeros
    to its memory size (so: where, how much, and the file bytes but their zero tail)."""
    _, _, segs = loaders.parse_elf(elf)
    return [(s.paddr, s.memsz, bytes(elf[s.offset:s.offset + s.filesz]).rstrip(b"\0"))
            for s in segs]


@st.composite
def _elfs(draw: st.DrawFn) -> bytes:
    """ELF64s with up to 4 program headers (PT_LOAD mostly) over file images with zero
    tails, sometimes a segment loading the headers themselves, then bytes overwritten
    anywhere (malformed headers, other classes and machines, offsets past the end)."""
    n = draw(st.integers(0, 4))
    start = 64 + 56 * n + draw(st.integers(0, 16))
    body, phdrs = bytearray(), []
    for i in range(n):
        content = draw(st.binary(max_size=48)) + bytes(draw(st.integers(0, 200)))
        off = start + len(body)
        if i == 0 and draw(st.booleans()):
            off = draw(st.integers(0, start))  # covers the program headers
        fsz = start + len(body) + len(content) - off
        msz = fsz + draw(st.integers(0, 64))
        typ = draw(st.sampled_from([1, 1, 1, 4]))
        phdrs.append(struct.pack("<IIQQQQQQ", typ, 7, off, 0, 0x100000 + i * 0x10000, fsz,
                                 msz, 8))
        body += content
    elf = bytearray(b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, 0x100000, 64, 0, 0, 64, 56, n, 64, 0, 0))
    elf += b"".join(phdrs)
    elf = elf.ljust(start, b"\0") + body
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(elf) - 1))
        elf[at] = draw(st.integers(0, 255))
    if draw(st.integers(0, 3)) == 0:
        del elf[draw(st.integers(0, len(elf))):]  # truncated
    return bytes(elf)


@given(_elfs())
@settings(max_examples=400, deadline=None)
def test_trimming_never_changes_what_is_loaded(elf: bytes) -> None:
    """Whatever the headers say: no exception; an ELF the loader refuses comes back as it
    is; otherwise only file sizes change, never upwards, over zeros only, and loading it
    puts the same bytes in guest RAM."""
    out = vmlinux.trim_zero_tails(elf)
    try:
        before = loaders.parse_elf(elf)
    except ImageError:
        assert out == elf
        event("refused")
        return
    event("trimmed" if out != elf else "unchanged")
    after = loaders.parse_elf(out)
    assert len(out) == len(elf) and before[:2] == after[:2]
    for a, b in zip(before[2], after[2], strict=True):
        assert (a.paddr, a.offset, a.memsz, a.phdr) == (b.paddr, b.offset, b.memsz, b.phdr)
        assert b.filesz <= a.filesz
        assert not any(elf[b.offset + b.filesz:a.offset + a.filesz])
    assert _loaded(out) == _loaded(elf)
    changed = [i for i in range(len(elf)) if elf[i] != out[i]]
    fields = [range(s.phdr + 32, s.phdr + 40) for s in after[2]]
    assert all(any(i in f for f in fields) for i in changed)


def test_trimming_leaves_elf32_and_loaded_headers_alone() -> None:
    covering = elf64(PROPER + bytes(64))  # its one segment loads the headers too
    assert vmlinux.trim_zero_tails(covering) is covering
    good = elf64_with_zero_tails()
    elf32 = good[:4] + b"\x01" + good[5:]
    assert vmlinux.trim_zero_tails(elf32) is elf32
    assert vmlinux.trim_zero_tails(good) != good


# --- KASLR -------------------------------------------------------------------------------
# A kernel proper with a relocation table, as a kernel built with CONFIG_RANDOMIZE_BASE
# carries one after its ELF. Its code reports boot_params, the loadflags byte, the address
# it runs at, then three fields the table names (a 32-bit, an inverse 32-bit and a 64-bit
# one), and 2.
LINK = 0x1000000
HDRS = 64 + 56  # elf64's ELF and program header: the code follows them
F32, FINV, F64 = 0x81234567, 0x40000000, 0xFFFFFFFF81234567
MIB2 = 2 << 20


def _relocatable_proper() -> tuple[bytes, list[int]]:
    """(code and data, the kernel virtual addresses of its three fields, low 32 bits)."""
    code = bytearray(bytes.fromhex(
        "89f0" "e7e0"                 # mov eax, esi; out 0xe0, eax
        "0fb6861102" "0000" "e7e0"    # movzx eax, byte [rsi+0x211]; out 0xe0, eax
        "488d05f9ffffff" "e7e0"       # lea rax, [rip-7] (its own address); out 0xe0, eax
        "8b0500000000" "e7e0"         # mov eax, [rip+F32]; out
        "8b0500000000" "e7e0"         # mov eax, [rip+FINV]; out
        "488b0500000000" "e7e0"       # mov rax, [rip+F64]; out (low half)
        "48c1e820" "e7e0"             # shr rax, 32; out (high half)
        "b802000000" "e7e0" "e6e4" "f4"))  # mov eax, 2; out; out 0xe4 (done); hlt
    data = len(code)
    code += struct.pack("<IIQ", F32, FINV, F64)
    for at, length, field in ((22, 6, data), (30, 6, data + 4), (38, 7, data + 8)):
        struct.pack_into("<i", code, at + length - 4, field - (at + length))
    return bytes(code), [0x80000000 + LINK + HDRS + data + d for d in (0, 4, 8)]


def relocatable_elf(table: bytes | None = None) -> bytes:
    """The ELF with its relocation table after it (or ``table`` instead)."""
    code, (a32, ainv, a64) = _relocatable_proper()
    if table is None:  # as the kernel's relocs tool writes it: read backwards from the end
        table = struct.pack("<IIIIII", 0, a64, 0, ainv, 0, a32)
    return elf64(code) + table


def _expect(phys: int, delta: int, kaslr_flag: bool) -> list[int]:
    d32 = delta & 0xFFFFFFFF
    f64 = (F64 + delta) & (1 << 64) - 1
    return [0x7000, 0x81 | (2 if kaslr_flag else 0), phys + HDRS + 13,
            (F32 + d32) & 0xFFFFFFFF, (FINV - d32) & 0xFFFFFFFF, f64 & 0xFFFFFFFF, f64 >> 32, 2]


def test_kaslr_moves_and_relocates_the_kernel_as_its_seed_says(machine_factory,
                                                               tmp_path: Path) -> None:
    """The decompressor's KASLR, done on the host: the kernel runs at a 2 MiB-aligned
    physical address of its own, its fields named by the relocation table moved by the
    virtual offset (+, -, + for the three kinds), KASLR_FLAG set; the same seed gives the
    same layout; ``nokaslr`` or ``kaslr=off`` leave it linked and the flag clear."""
    image = kernel_file(tmp_path, gzip.compress(relocatable_elf()))
    layouts = set()
    for seed in range(1, 7):
        place = vmlinux.kaslr_layout(seed, link=LINK, need=0x10000, align=MIB2,
                                     limit=64 << 20, relocatable=True)
        assert place.phys % MIB2 == 0 and LINK <= place.phys <= (64 << 20) - 0x10000
        assert place.delta % MIB2 == 0 and 0 <= place.delta < vmlinux.KERNEL_IMAGE_SIZE
        got = _boot(machine_factory, image, kaslr=str(seed))
        assert got == _expect(place.phys, place.delta, True)
        assert _boot(machine_factory, image, kaslr=str(seed)) == got
        layouts.add((place.phys, place.delta))
    assert len(layouts) > 1
    unmoved = _expect(LINK, 0, False)
    assert _boot(machine_factory, image, kaslr="off") == unmoved
    assert _boot(machine_factory, image, kaslr="1", cmdline="quiet nokaslr") == unmoved
    assert _boot(machine_factory, image)[1] == 0x83  # on by default, as the decompressor
    with pytest.raises(ConfigError, match="kaslr= places the kernel kvmfw decompresses"):
        _boot(machine_factory, image, kaslr="5", decompress="guest")


def _bad_tables() -> dict[str, bytes]:
    _, (a32, ainv, a64) = _relocatable_proper()
    return {
        "an entry past the image": struct.pack("<IIIIII", 0, a64, 0, ainv, 0, 0x81010000),
        "an entry below the kernel": struct.pack("<IIIIII", 0, a64, 0, ainv, 0, 0x80FFFFFE),
        "a 64-bit field across the end": struct.pack("<IIIIII", 0, 0x81003000 - 4, 0, ainv,
                                                     0, a32),
        "not a kernel address": struct.pack("<IIIIII", 0, 0x00001000, 0, ainv, 0, a32),
        "two terminators": struct.pack("<IIIII", a64, 0, ainv, 0, a32),
        "words before the table": struct.pack("<IIIIIII", 7, 0, a64, 0, ainv, 0, a32),
        "no entries": bytes(12),
        "a ragged end": struct.pack("<IIIIII", 0, a64, 0, ainv, 0, a32) + b"\x01",
    }


@pytest.mark.parametrize("case", sorted(_bad_tables()))
def test_a_relocation_table_that_does_not_fit_leaves_the_kernel_linked(
        machine_factory, tmp_path: Path, case: str) -> None:
    """Anything after the ELF that is not exactly a relocation table inside the kernel's
    image (read as the kernel's own tool writes it) is not used: the kernel is loaded
    where it is linked, unrelocated, with KASLR_FLAG clear, as a kernel built without
    KASLR; nothing outside the image is written."""
    image = kernel_file(tmp_path, gzip.compress(relocatable_elf(_bad_tables()[case])))
    assert _boot(machine_factory, image, kaslr="5") == _expect(LINK, 0, False)


def _model_relocate(image: bytearray, words: list[int], base: int, delta: int) -> bool:
    """The decompressor's ``handle_relocations`` in plain Python (the test's reference):
    False, with ``image`` untouched, where the C walk must refuse the table."""
    fields, i = [], len(words)
    for kind in range(3):
        while True:
            if i == 0:
                return False
            i -= 1
            if words[i] == 0:
                break
            off = (words[i] - (1 << 32) if words[i] >> 31 else words[i]) - (base - (1 << 64))
            width = 8 if kind == 2 else 4
            if not 0 <= off <= len(image) - width:
                return False
            fields.append((kind, off, width))
    if i or not fields:
        return False
    for kind, off, width in fields:
        x = int.from_bytes(image[off:off + width], "little")
        x = x - delta if kind == 1 else x + delta
        image[off:off + width] = (x % (1 << 8 * width)).to_bytes(width, "little")
    return True


# table words: terminators, kernel addresses in and around the image, anything
_WORD = st.one_of(st.just(0), st.integers(0x80FFFFF0, 0x81003010), st.integers(0, 0xFFFFFFFF))
_NEAR = st.integers(0x81000000 - 16, 0x81003000 + 16)  # the image is 0x81000000-0x81003000


@st.composite
def _table_words(draw: st.DrawFn) -> list[int]:
    """Half shaped as the kernel's table (three lists of addresses near the image, some
    then just outside it, perhaps one word changed), half any words."""
    if not draw(st.booleans()):
        return draw(st.lists(_WORD, max_size=24))
    l64, linv, l32 = (draw(st.lists(_NEAR, max_size=6)) for _ in range(3))
    words = [0, *l64, 0, *linv, 0, *l32]
    if draw(st.booleans()):
        words[draw(st.integers(0, len(words) - 1))] = draw(_WORD)
    return words


@settings(max_examples=400, deadline=None)
@given(words=_table_words(), ragged=st.just(b"") | st.binary(min_size=1, max_size=3),
       delta=st.integers(0, (1 << 30) - MIB2).map(lambda d: d & ~(MIB2 - 1)),
       fill=st.integers(0, 255))
def test_any_tail_is_checked_before_a_byte_is_written(words: list[int], ragged: bytes,
                                                      delta: int, fill: int) -> None:
    """Whatever follows the ELF, the C walk agrees with a plain Python model of the
    decompressor's: a table is used only when every entry lies inside the image and the
    table fills the tail exactly; then exactly the fields it names move, and nothing past
    the image is written."""
    code, _ = _relocatable_proper()
    elf = elf64(code) + struct.pack(f"<{len(words)}I", *words) + ragged
    span = 0x3000
    table = vmlinux.reloc_table(elf, len(elf64(code)), LINK, span)
    seed = bytes((i * 131 + fill) & 0xFF for i in range(span))  # (the image's old bytes)
    want = bytearray(seed)
    ok = not ragged and _model_relocate(want, words, vmlinux.START_KERNEL_MAP + LINK, delta)
    event("a table" if ok else "no table")
    assert (table is not None) == ok
    if table is None:
        return
    image = bytearray(seed) + bytes(16)
    vmlinux.relocate(memoryview(image)[:span], elf, table, LINK, delta)
    assert image[:span] == want and not any(image[span:])


def test_the_cli_takes_the_kaslr_option(tmp_path: Path) -> None:
    """``--option kaslr=`` takes off, on or a seed below 2**64 (else status 2, with what to
    give); ``--debug-flags kvmfw.x86.vmlinux`` shows the layout and its seed."""
    import subprocess
    import sys

    image = kernel_file(tmp_path, gzip.compress(relocatable_elf()))
    for value, status in (("off", 0), ("12345", 0), ("0x10", 0), ("0", 0), ("on", 0),
                          ("-1", 2), ("maybe", 2), (str(1 << 64), 2)):
        r = subprocess.run([sys.executable, "-c", "from kvmfw.cli import main; main()", "run",
                            "--kernel", str(image), "--option", f"kaslr={value}",
                            "--max-ticks", "1", "--console", "none", "--no-summary",
                            "--timeout", "60", "--debug-flags", "kvmfw.x86.vmlinux"],
                           capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL, cwd="/")
        assert r.returncode == status, (value, r.stderr)
        if status:
            assert "kaslr=" in r.stderr and "seed from 0 to 2**64-1" in r.stderr
        elif value != "off":
            assert "KASLR: the kernel at physical" in r.stderr, r.stderr

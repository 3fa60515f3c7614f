"""Hostile images, generated: any header field of an ELF32/ELF64, a multiboot a.out
header or a bzImage setup header set to any value. The loaders either load the image
into guest RAM or raise ImageError; nothing else, and never a host allocation sized by a
field (issue 10 item 2)."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import GUESTS, bzimage, make_machine, requires_kvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvmfw.errors import ImageError

from kvmfw_x86 import loaders

pytestmark = [requires_kvm, pytest.mark.kvm]

RAM = 4 << 20
ALLOC_BOUND = 8 << 20

values32 = st.one_of(st.sampled_from([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, RAM - 1, RAM,
                                      RAM + 1, 0x100000, 0xFFFFF000]),
                     st.integers(0, 0xFFFFFFFF))
values64 = st.one_of(values32, st.sampled_from([1 << 63, (1 << 64) - 1, 1 << 32]),
                     st.integers(0, (1 << 64) - 1))

ELF32_FIELDS = {"e_entry": (0x18, "<I"), "e_phoff": (0x1C, "<I"), "e_shoff": (0x20, "<I"),
                "e_phentsize": (0x2A, "<H"), "e_phnum": (0x2C, "<H"),
                "e_shentsize": (0x2E, "<H"), "e_shnum": (0x30, "<H"),
                "e_shstrndx": (0x32, "<H"), "p_offset": (0x34 + 4, "<I"),
                "p_vaddr": (0x34 + 8, "<I"), "p_paddr": (0x34 + 12, "<I"),
                "p_filesz": (0x34 + 16, "<I"), "p_memsz": (0x34 + 20, "<I")}
ELF64_FIELDS = {"e_entry": (0x18, "<Q"), "e_phoff": (0x20, "<Q"), "e_shoff": (0x28, "<Q"),
                "e_phnum": (0x38, "<H"), "e_shnum": (0x3C, "<H"), "e_shstrndx": (0x3E, "<H"),
                "p_offset": (0x40 + 8, "<Q"), "p_vaddr": (0x40 + 16, "<Q"),
                "p_paddr": (0x40 + 24, "<Q"), "p_filesz": (0x40 + 32, "<Q"),
                "p_memsz": (0x40 + 40, "<Q")}
MB_FIELDS = {n: (12 + 4 * i, "<I") for i, n in enumerate(
    ("header_addr", "load_addr", "load_end", "bss_end", "entry"))}
BZ_FIELDS = {"setup_sects": (0x1F1, "<B"), "syssize": (0x1F4, "<I"), "jump": (0x201, "<B"),
             "version": (0x206, "<H"), "loadflags": (0x211, "<B"),
             "initrd_addr_max": (0x22C, "<I"), "kernel_alignment": (0x230, "<I"),
             "relocatable": (0x234, "<B"), "xloadflags": (0x236, "<H"),
             "cmdline_size": (0x238, "<I"), "pref_address": (0x258, "<Q"),
             "init_size": (0x260, "<I")}


def _mb_aout() -> bytes:
    flags = 0x10000
    hdr = struct.pack("<III5I", 0x1BADB002, flags, (-(0x1BADB002 + flags)) & 0xFFFFFFFF,
                      0x100000, 0x100000, 0, 0x100100, 0x100020)
    return hdr.ljust(0x40, b"\0") + b"\xf4" * 0x40


BASES = {"elf32": ((GUESTS / "prot32.elf").read_bytes(), ELF32_FIELDS),
         "elf64": ((GUESTS / "long64.elf").read_bytes(), ELF64_FIELDS),
         "multiboot": (_mb_aout(), MB_FIELDS), "bzimage": (bzimage(), BZ_FIELDS)}
CASES = {"n": 0}


@pytest.fixture(scope="module")
def machine() -> Iterator[Any]:
    m, _ = make_machine(memory=RAM)
    yield m
    m.close()


@st.composite
def hostile(draw: Any) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(sorted(BASES)))
    base, fields = BASES[kind]
    img = bytearray(base)
    for name in draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=4)):
        off, fmt = fields[name]
        size = struct.calcsize(fmt)
        v = draw(values64 if size == 8 else values32) & ((1 << (8 * size)) - 1)
        struct.pack_into(fmt, img, off, v)
    if draw(st.booleans()):  # and maybe truncate
        img = img[:draw(st.integers(0, len(img)))]
    return kind, bytes(img)


def _load(m: Any, kind: str, data: bytes) -> None:
    if kind.startswith("elf"):
        loaders.load_elf(m, data)
    elif kind == "multiboot":
        loaders.load_multiboot(m, data, "fuzz", {})
    else:
        loaders.load_bzimage(m, data, {"cmdline": "x"})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=hostile())
def test_hostile_headers_load_or_raise_image_error(machine: Any, case: tuple[str, bytes]) -> None:
    kind, data = case
    CASES["n"] += 1
    tracemalloc.start()
    try:
        _load(machine, kind, data)
    except ImageError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < ALLOC_BOUND, f"{kind}: {peak} bytes allocated"

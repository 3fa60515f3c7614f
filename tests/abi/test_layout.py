"""The compiled ABI against the host's kernel headers: every struct size, field offset,
ioctl number and constant kvmfw declares is checked by a C probe built here with gcc."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kvmfw.abi import IOCTLS, Cap, ExitReason, InternalError, SystemEvent, constants, ffi

HEADER = Path("/usr/include/linux/kvm.h")
pytestmark = pytest.mark.skipif(not HEADER.exists() or shutil.which("gcc") is None,
                                reason="needs gcc and the kernel headers (linux-libc-dev)")

STRUCT_FIELDS = {
    "struct kvm_run": ["request_interrupt_window", "immediate_exit", "exit_reason",
                       "ready_for_interrupt_injection", "if_flag", "flags", "cr8", "apic_base",
                       "hw", "fail_entry", "ex", "io", "mmio", "hypercall", "internal",
                       "emulation_failure", "system_event", "msr", "kvm_valid_regs",
                       "kvm_dirty_regs"],
    "struct kvm_userspace_memory_region": ["slot", "flags", "guest_phys_addr", "memory_size",
                                           "userspace_addr"],
    "struct kvm_coalesced_mmio_zone": ["addr", "size", "pio"],
    "struct kvm_coalesced_mmio": ["phys_addr", "len", "pio", "data"],
    "struct kvm_coalesced_mmio_ring": ["first", "last"],
    "struct kvm_irq_level": ["irq", "level"],
    "struct kvm_one_reg": ["id", "addr"],
    "struct kvm_reg_list": ["n"],
    "struct kvm_create_device": ["type", "fd", "flags"],
    "struct kvm_device_attr": ["flags", "group", "attr", "addr"],
    "struct kvm_signal_mask": ["len"],
    "struct kvm_enable_cap": ["cap", "flags", "args"],
    "struct kvm_dirty_log": ["slot", "dirty_bitmap"],
    "struct kvm_clear_dirty_log": ["slot", "num_pages", "first_page", "dirty_bitmap"],
    "struct kvm_irq_routing": ["nr", "flags"],
    "struct kvm_irq_routing_entry": ["gsi", "type", "flags", "u"],
    "struct kvm_irqfd": ["fd", "gsi", "flags", "resamplefd"],
    "struct kvm_ioeventfd": ["datamatch", "addr", "len", "fd", "flags"],
}
NESTED = {  # offsets inside the kvm_run exit union
    "io": ["direction", "size", "port", "count", "data_offset"],
    "mmio": ["phys_addr", "data", "len", "is_write"],
    "fail_entry": ["hardware_entry_failure_reason", "cpu"],
    "internal": ["suberror", "ndata", "data"],
    "emulation_failure": ["suberror", "ndata", "flags", "insn_size", "insn_bytes"],
    "system_event": ["type", "ndata", "data"],
    "hypercall": ["nr", "args", "ret"],
}


def _probe(tmp_path: Path, lines: list[tuple[str, str]]) -> dict[str, int]:
    body = "\n".join(f'    printf("%s %llu\\n", "{k}", (unsigned long long)({expr}));'
                     for k, expr in lines)
    src = tmp_path / "probe.c"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\n"
                   "#define M(s, f) offsetof(s, f)\n"
                   "#define N(f, g) (offsetof(struct kvm_run, f) + "
                   "offsetof(__typeof__(((struct kvm_run *)0)->f), g))\n"
                   f"int main(void) {{\n{body}\n    return 0;\n}}\n")
    exe = tmp_path / "probe"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_struct_sizes_and_offsets_match_host_headers(tmp_path: Path) -> None:
    lines, expected = [], {}
    for struct, fields in STRUCT_FIELDS.items():
        lines.append((f"sizeof:{struct}", f"sizeof({struct})"))
        expected[f"sizeof:{struct}"] = ffi.sizeof(struct)
        for f in fields:
            lines.append((f"off:{struct}.{f}", f"M({struct}, {f})"))
            expected[f"off:{struct}.{f}"] = ffi.offsetof(struct, f)
    for member, fields in NESTED.items():
        for f in fields:
            lines.append((f"run:{member}.{f}", f"N({member}, {f})"))
            expected[f"run:{member}.{f}"] = ffi.offsetof("struct kvm_run", member, f)
    got = _probe(tmp_path, [(k.replace(" ", "_"), e) for k, e in lines])
    expected = {k.replace(" ", "_"): v for k, v in expected.items()}
    assert got == expected


def test_every_ioctl_number_matches_host_headers(tmp_path: Path) -> None:
    names = [n for n in vars(IOCTLS) if n.startswith("KVM_") and n not in (
        "KVM_GET_REGS", "KVM_SET_REGS")]  # the test arch's own, checked below
    src = HEADER.read_text()
    present = [n for n in names if f"#define {n} " in src or f"#define {n}\t" in src]
    got = _probe(tmp_path, [(n, n) for n in present])
    assert {n: getattr(IOCTLS, n) for n in present} == got
    assert len(present) >= len(names) - 1  # every ioctl kvmfw defines exists in 6.1 headers


def test_test_arch_kvm_regs_layout(tmp_path: Path) -> None:
    got = _probe(tmp_path, [("size", "sizeof(struct kvm_regs)"),
                            ("rip", "M(struct kvm_regs, rip)"),
                            ("get", "KVM_GET_REGS"), ("set", "KVM_SET_REGS")])
    assert got["size"] == 144 and got["rip"] == 128
    assert (got["get"], got["set"]) == (IOCTLS.KVM_GET_REGS, IOCTLS.KVM_SET_REGS)


@pytest.mark.parametrize("enum,prefix", [(ExitReason, "KVM_EXIT_"), (Cap, "KVM_CAP_"),
                                         (InternalError, "KVM_INTERNAL_ERROR_"),
                                         (SystemEvent, "KVM_SYSTEM_EVENT_")])
def test_constants_match_host_headers(tmp_path: Path, enum: type, prefix: str) -> None:
    src = HEADER.read_text()
    items = constants.cap_items() if enum is Cap else [(m.name, int(m)) for m in enum]
    members = [(n, v) for n, v in items if f"#define {prefix}{n.lstrip('_')}" in src]
    assert len(members) > 3
    got = _probe(tmp_path, [(n, f"{prefix}{n.lstrip('_')}") for n, _ in members])
    assert dict(members) == got


def test_kvm_run_exit_union_is_where_the_hot_path_reads_it() -> None:
    from kvmfw.vcpu import MMIO_DATA, RUN_PAYLOAD

    assert RUN_PAYLOAD == ffi.offsetof("struct kvm_run", "io") == 32
    assert MMIO_DATA == ffi.offsetof("struct kvm_run", "mmio", "data")


def test_cap_is_plain_ints_with_names_and_no_enum_to_build() -> None:
    """``Cap`` is a class of ints (an enum of 200+ members costs every process start-up);
    its names come from :func:`constants.cap_name` / :func:`constants.cap_items`."""
    from enum import Enum

    assert not issubclass(Cap, Enum) and type(Cap.IRQCHIP) is int
    assert constants.cap_name(Cap.IRQCHIP) == "IRQCHIP"
    assert constants.cap_name(Cap.NR_VCPUS) == "NR_VCPUS"
    assert constants.cap_name(0x7FFF_FFFF) == str(0x7FFF_FFFF)  # unknown: its number
    items = dict(constants.cap_items())
    assert len(items) > 200 and items["IOEVENTFD"] == Cap.IOEVENTFD
    assert all(not n.startswith("__") for n in items)

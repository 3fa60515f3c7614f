#!/usr/bin/env python3
"""Regenerate kvmfw/abi/constants.py from the host's <linux/kvm.h>.

Run after moving to newer kernel headers: ``python tools/gen_constants.py``.
Values newer than the headers (``NEWER_EXITS``) are appended so older hosts keep the names.
"""

import re
from pathlib import Path

HEADER = Path("/usr/include/linux/kvm.h")
OUT = Path(__file__).resolve().parent.parent / "kvmfw" / "abi" / "constants.py"
NEWER_EXITS = [("KVM_EXIT_LOONGARCH_IOCSR", 38), ("KVM_EXIT_MEMORY_FAULT", 39),
               ("KVM_EXIT_TDX", 40)]


CAP_DOC = """Capabilities for ``KVM_CHECK_EXTENSION`` (KVM_CAP_*).

    Plain ints rather than an IntEnum like the others: creating an enum of this many members
    would cost every process ~2 ms at start-up. :func:`cap_name` names a value."""


def defines(src: str, prefix: str) -> list[tuple[str, int]]:
    pat = r"^#define (" + prefix + r"[A-Z0-9_]+)\s+(0x[0-9a-fA-F]+|\d+)\s*(?:/\*.*)?$"
    return [(m.group(1), int(m.group(2), 0)) for m in re.finditer(pat, src, re.M)]


CAP_HELPERS = '''def cap_items() -> list[tuple[str, int]]:
    """Every :class:`Cap` as ``(name, value)``, in header order."""
    return [(k, v) for k, v in vars(Cap).items() if not k.startswith("__")]


def cap_name(value: int) -> str:
    """The :class:`Cap` name of ``value`` (``"IRQCHIP"``), or the number if kvmfw has none."""
    return next((k for k, v in cap_items() if v == value), str(int(value)))'''.splitlines()


def enum(cls: str, prefix: str, items: list[tuple[str, int]], doc: str,
         base: str = "(IntEnum)") -> list[str]:
    lines = [f"class {cls}{base}:", f'    """{doc}"""', ""]
    seen = set()
    for name, value in items:
        short = name[len(prefix):]
        if short[0].isdigit():
            short = "_" + short
        if short not in seen:
            seen.add(short)
            lines.append(f"    {short} = {value}")
    return lines + ["", ""]


def main() -> None:
    src = HEADER.read_text()
    exits = [x for x in defines(src, "KVM_EXIT_")
             if not x[0].startswith(("KVM_EXIT_HYPERV_", "KVM_EXIT_XEN_", "KVM_EXIT_IO_"))]
    known = {n for n, _ in exits}
    exits += [x for x in NEWER_EXITS if x[0] not in known]
    lines = [
        '"""KVM constants from <linux/kvm.h> (Linux 6.1 uapi, plus newer exit reasons).',
        "",
        "Generated once by tools/gen_constants.py and kept in the repository so every name is",
        "greppable; tests/abi/test_layout.py compiles a probe against the host headers and checks",
        "that each value the host defines matches.",
        '"""',
        "",
        "from enum import IntEnum",
        "",
    ]
    lines += enum("ExitReason", "KVM_EXIT_", exits, "``kvm_run.exit_reason`` values (KVM_EXIT_*).")
    lines += enum("Cap", "KVM_CAP_", defines(src, "KVM_CAP_"), CAP_DOC, base="")
    lines += CAP_HELPERS + ["", ""]
    lines += enum("InternalError", "KVM_INTERNAL_ERROR_",
                  [x for x in defines(src, "KVM_INTERNAL_ERROR_") if "FLAG" not in x[0]],
                  "``kvm_run.internal.suberror`` values (KVM_INTERNAL_ERROR_*).")
    lines += enum("SystemEvent", "KVM_SYSTEM_EVENT_", defines(src, "KVM_SYSTEM_EVENT_"),
                  "``kvm_run.system_event.type`` values (KVM_SYSTEM_EVENT_*).")
    lines += [
        "KVM_API_VERSION = 12",
        "KVM_EXIT_IO_IN = 0",
        "KVM_EXIT_IO_OUT = 1",
        "KVM_MEM_LOG_DIRTY_PAGES = 1 << 0",
        "KVM_MEM_READONLY = 1 << 1",
        "KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0",
    ]
    OUT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

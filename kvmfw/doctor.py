"""``kvmfw doctor``: can kvmfw run on this host, and what does each shortfall cost?

Each check gives :class:`Finding`\\ s with a status (``ok``, ``info``, ``warn``, ``fail``),
what the finding costs a kvmfw user and how to fix it. Only ``fail`` findings stop kvmfw
from running; they make :func:`diagnose`'s report ``usable`` false (``kvmfw doctor`` then
exits 3, the status of "no usable /dev/kvm").

Every host path is injectable (:class:`HostPaths`) so the checks can be tested against a
missing, unreadable or non-device ``/dev/kvm`` and any ``perf_event_paranoid`` value.
"""

from __future__ import annotations

import errno
import grp
import os
import platform
import shutil
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"

#: Hardware-assisted KVM modules, by vendor.
HARDWARE_MODULES = {"kvm_intel": "Intel VT-x", "kvm_amd": "AMD SVM"}
#: KVM implementations without hardware virtualization support.
SOFTWARE_MODULES = {"kvm_pvm": "PVM, KVM without hardware virtualization"}

#: Capabilities kvmfw relies on, with what their absence costs.
KEY_CAPS: dict[str, tuple[str, str]] = {
    "IMMEDIATE_EXIT": (FAIL, "kicks and the run timer cannot stop a vCPU: kvmfw refuses "
                             "the device (needs Linux >= 4.11)"),
    "USER_MEMORY": (FAIL, "no guest RAM can be mapped"),
    "COALESCED_MMIO": (INFO, "every MMIO write exits to userspace (slower devices)"),
    "IRQCHIP": (WARN, "no in-kernel interrupt controller: interrupts are delivered from "
                      "userspace (irqchip=userspace), slower"),
    "NR_MEMSLOTS": (INFO, "KVM's documented fallback of 32 memory slots is assumed"),
    "SET_GUEST_DEBUG": (WARN, "no hardware breakpoints or single-step for the GDB stub"),
    "ONE_REG": (INFO, "arm64 state cannot be read (x86 does not need it)"),
}


@dataclass
class HostPaths:
    """Where the checks look; the defaults are the real host."""

    kvm: str = "/dev/kvm"
    proc: str = "/proc"
    sys: str = "/sys"
    include: str = "/usr/include"


@dataclass
class Finding:
    check: str
    status: str
    summary: str
    cost: str = ""
    fix: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    findings: list[Finding]

    @property
    def usable(self) -> bool:
        """True when nothing stops kvmfw from running guests."""
        return all(f.status != FAIL for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {"usable": self.usable, "findings": [asdict(f) for f in self.findings]}


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# --- /dev/kvm --------------------------------------------------------------------------

def check_device(paths: HostPaths) -> tuple[list[Finding], int | None]:
    """Exists, is a character device, may be opened read-write. Returns the open fd."""
    path = paths.kvm
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return [Finding(
            "kvm-device", FAIL, f"{path} does not exist",
            "kvmfw cannot run any guest",
            "load the KVM module (modprobe kvm_intel or kvm_amd), enable virtualization "
            "(VT-x/AMD-V) in the firmware, or enable nested virtualization if this is a VM")
        ], None
    except OSError as exc:
        return [Finding("kvm-device", FAIL, f"cannot stat {path}: {exc.strerror}",
                        "kvmfw cannot run any guest", "check the path")], None
    if not stat.S_ISCHR(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a regular file" \
            if stat.S_ISREG(st.st_mode) else "not a character device"
        return [Finding(
            "kvm-device", FAIL, f"{path} is {kind}, not the KVM character device",
            "kvmfw cannot run any guest",
            f"remove it and reload the KVM module, or recreate it: mknod {path} c 10 232")
        ], None
    group = _group_name(st.st_gid)
    data = {"path": path, "mode": oct(stat.S_IMODE(st.st_mode)), "group": group,
            "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev)}
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            if group == "root" or not st.st_mode & stat.S_IRWXG:
                fix = (f"{path} is {data['mode']} {group}: give it to group 'kvm' (install "
                       "your distribution's udev rule, or: sudo chgrp kvm "
                       f"{path} && sudo chmod 660 {path}), join that group (sudo usermod "
                       "-aG kvm $USER, then log in again), or run as root")
            else:
                fix = (f"join group '{group}' (sudo usermod -aG {group} $USER, then log in "
                       "again), or run as root")
            return [Finding("kvm-device", FAIL,
                            f"{path}: permission denied for uid {os.geteuid()}",
                            "kvmfw cannot run any guest", fix, data)], None
        if exc.errno in (errno.ENXIO, errno.ENODEV):
            return [Finding("kvm-device", FAIL, f"{path}: no KVM module behind it",
                            "kvmfw cannot run any guest",
                            "modprobe kvm_intel or kvm_amd", data)], None
        return [Finding("kvm-device", FAIL, f"cannot open {path}: {exc.strerror}",
                        "kvmfw cannot run any guest", "", data)], None
    return [Finding("kvm-device", OK, f"{path} is a character device ({data['major']}:"
                    f"{data['minor']}, {data['mode']} group {group}) and opens read-write",
                    data=data)], fd


def check_api(fd: int, paths: HostPaths) -> list[Finding]:
    """The API version and the capabilities kvmfw relies on, through ioctls on ``fd``."""
    from kvmfw.abi import IOCTLS, Cap, constants, ioctl
    from kvmfw.errors import KvmError

    try:
        version = ioctl(fd, IOCTLS.KVM_GET_API_VERSION)
    except KvmError as exc:
        return [Finding("kvm-api", FAIL, f"{paths.kvm} does not answer KVM_GET_API_VERSION "
                        f"({exc}): it is not a KVM device", "kvmfw cannot run any guest",
                        "point --kvm at /dev/kvm (character device 10:232)")]
    if version != constants.KVM_API_VERSION:
        return [Finding("kvm-api", FAIL, f"KVM API version {version}, kvmfw needs "
                        f"{constants.KVM_API_VERSION}", "kvmfw cannot run any guest",
                        "use a Linux kernel from 2.6.22 on")]
    out = [Finding("kvm-api", OK, f"KVM API version {version}", data={"version": version})]
    values: dict[str, int] = {}
    for name in KEY_CAPS:
        try:
            values[name] = ioctl(fd, IOCTLS.KVM_CHECK_EXTENSION, getattr(Cap, name))
        except KvmError:
            values[name] = 0
    machine = platform.machine()
    missing = [n for n, v in values.items() if not v
               and not (n == "ONE_REG" and machine in ("x86_64", "i686"))]
    if not missing:
        out.append(Finding("kvm-caps", OK, "every capability kvmfw relies on is present",
                           data=values))
    for name in missing:
        status, cost = KEY_CAPS[name]
        out.append(Finding("kvm-caps", status, f"KVM_CAP_{name} is missing", cost,
                           "a newer kernel (or kvmfw info lists what this one has)",
                           data={name: 0}))
    return out


def check_module(paths: HostPaths) -> list[Finding]:
    """Which KVM implementation, and whether it can run nested guests."""
    sysmod = Path(paths.sys) / "module"
    present = [m for m in (*HARDWARE_MODULES, *SOFTWARE_MODULES) if (sysmod / m).is_dir()]
    cpuinfo = _read(Path(paths.proc) / "cpuinfo") or ""
    in_vm = any(line.startswith("flags") and " hypervisor" in line
                for line in cpuinfo.splitlines())
    data: dict[str, Any] = {"modules": present, "host_is_vm": in_vm}
    out: list[Finding] = []
    hw = [m for m in present if m in HARDWARE_MODULES]
    sw = [m for m in present if m in SOFTWARE_MODULES]
    if sw:
        data["kind"] = "software"
        out.append(Finding(
            "kvm-kind", WARN,
            f"software KVM: {sw[0]} ({SOFTWARE_MODULES[sw[0]]})",
            "guest kernel-mode and real-mode code is emulated instruction by instruction "
            "(about 0.6 us each) and a userspace exit costs 5-8 us; stock Linux cannot boot",
            "use a host with VT-x/AMD-V (kvm_intel/kvm_amd), or boot Linux in the nested "
            "environment: tox -e x86-linux-kvm", data))
    elif hw:
        data["kind"] = "hardware"
        nested = _read(sysmod / hw[0] / "parameters" / "nested")
        data["nested"] = nested in ("1", "Y", "y")
        out.append(Finding("kvm-kind", OK, f"hardware KVM: {hw[0]} "
                           f"({HARDWARE_MODULES[hw[0]]})" + (", this host is itself a VM"
                                                              if in_vm else ""), data=data))
        if nested is not None:
            out.append(Finding(
                "kvm-nested", OK if data["nested"] else INFO,
                f"nested virtualization {'enabled' if data['nested'] else 'disabled'} "
                f"({hw[0]} nested={nested})",
                "" if data["nested"] else "guests cannot run their own KVM guests",
                "" if data["nested"] else
                f"modprobe -r {hw[0]} && modprobe {hw[0]} nested=1", {"nested": nested}))
    elif (sysmod / "kvm").is_dir():
        data["kind"] = "hardware" if machine_is_arm() else "unknown"
        out.append(Finding("kvm-kind", OK if machine_is_arm() else INFO,
                           "KVM built into the kernel" + (" (arm64: hardware, EL2)"
                                                          if machine_is_arm() else ""),
                           data=data))
    else:
        data["kind"] = "none"
        out.append(Finding("kvm-kind", INFO, "no KVM module found under "
                           f"{sysmod}", data=data))
    return out


def machine_is_arm() -> bool:
    return platform.machine() in ("aarch64", "arm64")


def guest_features(caps: dict[str, int], arch: str) -> dict[str, tuple[bool, str]]:
    """What the host's KVM offers guests beyond the basics, from the capabilities alone
    (the core names no plugin): on arm64, 32-bit guests and the guest PMU."""
    if arch not in ("armv8", "arm64", "aarch64"):
        return {}
    a32 = caps.get("ARM_EL1_32BIT", 0) > 0
    pmu = caps.get("ARM_PMU_V3", 0) > 0
    return {
        "aarch32 guests": (a32, "KVM_CAP_ARM_EL1_32BIT: arm_features=el1_32bit runs ARMv7 "
                           "guests" if a32 else "no KVM_CAP_ARM_EL1_32BIT: the host CPU has "
                           "no AArch32 at EL1 (ID_AA64PFR0_EL1.EL1 != 2)"),
        "guest pmu": (pmu, "KVM_CAP_ARM_PMU_V3: arm_features=pmu gives the guest a PMUv3"
                      if pmu else "no KVM_CAP_ARM_PMU_V3"),
    }


def check_guest_features(fd: int) -> list[Finding]:
    """On arm64 hosts: 32-bit guests and the guest PMU, each an ``info`` finding."""
    from kvmfw.abi import IOCTLS, Cap, ioctl
    from kvmfw.errors import KvmError

    if not machine_is_arm():
        return []
    caps: dict[str, int] = {}
    for name in ("ARM_EL1_32BIT", "ARM_PMU_V3"):
        try:
            caps[name] = ioctl(fd, IOCTLS.KVM_CHECK_EXTENSION, getattr(Cap, name))
        except KvmError:
            caps[name] = 0
    checks = {"aarch32 guests": ("guest-aarch32", "32-bit ARM guests are refused "
                                                  "(arm_features=el1_32bit)"),
              "guest pmu": ("guest-pmu", "guests see no PMU (arm_features=pmu is refused)")}
    return [Finding(checks[name][0], OK if ok else INFO, why, "" if ok else checks[name][1],
                    data={name: ok})
            for name, (ok, why) in guest_features(caps, "aarch64").items()]


# --- perf --------------------------------------------------------------------------------

def _privileged() -> bool:
    """Root or CAP_PERFMON/CAP_SYS_ADMIN in the effective set: perf_event_paranoid is moot."""
    if os.geteuid() == 0:
        return True
    status = _read(Path("/proc/self/status")) or ""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            caps = int(line.split()[1], 16)
            return bool(caps & (1 << 38 | 1 << 21))  # CAP_PERFMON, CAP_SYS_ADMIN
    return False


def check_perf(paths: HostPaths, privileged: bool | None = None) -> list[Finding]:
    """perf_event_paranoid, the PMU, hybrid cores: can kvmfw count guest cycles?"""
    if privileged is None:
        privileged = _privileged()
    out: list[Finding] = []
    events = Path(paths.sys) / "bus" / "event_source" / "devices"
    pmus = sorted(p.name for p in events.iterdir()) if events.is_dir() else []
    core_pmus = [p for p in pmus if p in ("cpu", "cpu_core", "cpu_atom")
                 or p.startswith("armv8_") or p.startswith("armv9_")]
    fallback = ("kvmfw's statistics count host time instead of guest cycles (the arch's "
                "cycle source, x86: TSC, else the monotonic clock)")
    if not core_pmus:
        out.append(Finding("perf-pmu", WARN, "no hardware PMU (usual inside a VM)",
                           fallback, "run on bare metal, or give the VM a PMU (QEMU: -cpu "
                           "host,pmu=on; libvirt: <pmu state='on'/>)", {"pmus": pmus}))
    else:
        out.append(Finding("perf-pmu", OK, f"hardware PMU: {', '.join(core_pmus)}",
                           data={"pmus": pmus}))
    if "cpu_core" in pmus and "cpu_atom" in pmus:
        out.append(Finding("perf-hybrid", WARN, "hybrid CPU (performance and efficiency "
                           "cores: cpu_core and cpu_atom PMUs)",
                           "cycle counts and speeds differ with the core a vCPU thread runs "
                           "on; runs are less repeatable",
                           "pin kvmfw to one core type: taskset -c CPUS kvmfw run ..."))
    raw = _read(Path(paths.proc) / "sys" / "kernel" / "perf_event_paranoid")
    try:
        level: int | None = int(raw) if raw is not None else None
    except ValueError:
        level = None
    data = {"perf_event_paranoid": raw, "privileged": privileged}
    if level is None:
        out.append(Finding("perf-paranoid", INFO, "kernel.perf_event_paranoid is unreadable "
                           "(no perf support in this kernel?)", fallback,
                           "a kernel with CONFIG_PERF_EVENTS", data))
    elif level <= 1 or privileged:
        why = "running privileged" if privileged and level > 1 else "allows kernel counting"
        out.append(Finding("perf-paranoid", OK,
                           f"kernel.perf_event_paranoid={level} ({why})", data=data))
    else:
        meaning = {2: "user-space counting only", 3: "no perf at all for unprivileged users "
                   "(Debian/Android)"}.get(level, "no perf for unprivileged users")
        out.append(Finding(
            "perf-paranoid", WARN, f"kernel.perf_event_paranoid={level}: {meaning}",
            f"the guest's kernel-mode cycles cannot be counted; {fallback}",
            "sudo sysctl kernel.perf_event_paranoid=1 (persist it in /etc/sysctl.d/), or "
            "give kvmfw CAP_PERFMON", data))
    return out


# --- building plugins ---------------------------------------------------------------------

def check_build(paths: HostPaths) -> list[Finding]:
    """Kernel headers and a C compiler: what a cffi plugin (and kvmfw from source) needs."""
    out: list[Finding] = []
    inc = Path(paths.include)
    missing = [h for h in ("linux/kvm.h", "asm/kvm.h") if not (inc / h).is_file()]
    # Debian keeps asm/ under the multiarch triplet
    if "asm/kvm.h" in missing and any(inc.glob("*-linux-gnu*/asm/kvm.h")):
        missing.remove("asm/kvm.h")
    cost = "kvmfw and its arch plugins cannot be built from source (wheels still install)"
    if missing:
        out.append(Finding("build-headers", WARN, f"kernel headers missing under {inc}: "
                           + ", ".join(missing), cost,
                           "apt install linux-libc-dev (dnf: kernel-headers)"))
    else:
        out.append(Finding("build-headers", OK, f"kernel headers: {inc}/linux/kvm.h"))
    cc = os.environ.get("CC", "").split()[:1] or []
    compilers = [c for c in (*cc, "cc", "gcc", "clang") if shutil.which(c)]
    if compilers:
        out.append(Finding("build-compiler", OK, f"C compiler: {shutil.which(compilers[0])}"))
    else:
        out.append(Finding("build-compiler", WARN, "no C compiler (cc, gcc, clang)", cost,
                           "apt install gcc"))
    if not shutil.which("as"):
        out.append(Finding("build-assembler", INFO, "no GNU as", "test guests written in "
                           "assembly (kvmfw's tests, kvmfw.testing) cannot be assembled",
                           "apt install binutils"))
    return out


# --- all of it ---------------------------------------------------------------------------

def diagnose(paths: HostPaths | None = None, privileged: bool | None = None) -> Report:
    """Run every check; never raises for a host problem (each is a finding)."""
    paths = paths or HostPaths()
    findings, fd = check_device(paths)
    if fd is not None:
        try:
            findings += check_api(fd, paths)
            findings += check_guest_features(fd)
        finally:
            os.close(fd)
    findings += check_module(paths)
    findings += check_perf(paths, privileged)
    findings += check_build(paths)
    return Report(findings)


_MARK = {OK: "ok  ", INFO: "info", WARN: "warn", FAIL: "FAIL"}


def format_report(report: Report) -> str:
    lines = []
    for f in report.findings:
        lines.append(f"[{_MARK[f.status]}] {f.check:<16} {f.summary}")
        if f.cost:
            lines.append(f"{'':23}cost: {f.cost}")
        if f.fix:
            lines.append(f"{'':23}fix:  {f.fix}")
    lines.append("kvmfw can run guests here" if report.usable else
                 "kvmfw cannot run here: fix the FAIL findings above")
    return "\n".join(lines)

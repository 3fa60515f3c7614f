"""``kvmfw doctor``: each host problem gives its finding, cost, fix and exit status."""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import kvmfw.abi  # noqa: F401  (imported before a forked child drops privileges)
from kvmfw.doctor import FAIL, OK, WARN, Finding, HostPaths, check_module, check_perf, diagnose


def kvmfw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmfw.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd="/")


def device_findings(path: str) -> list[Finding]:
    return [f for f in diagnose(HostPaths(kvm=path)).findings if f.check.startswith("kvm-")
            and f.check not in ("kvm-kind", "kvm-nested")]


def test_missing_device(tmp_path: Path) -> None:
    path = str(tmp_path / "kvm")
    report = diagnose(HostPaths(kvm=path))
    assert not report.usable
    (f,) = device_findings(path)
    assert f.status == FAIL and "does not exist" in f.summary and "modprobe" in f.fix
    r = kvmfw("doctor", "--kvm", path)
    assert r.returncode == 3, r.stderr
    assert f"{path} does not exist" in r.stdout and "cannot run" in r.stdout


@pytest.mark.parametrize("kind", ["regular file", "directory"])
def test_not_a_character_device(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "kvm"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"")
    (f,) = device_findings(str(path))
    assert f.status == FAIL and f"a {kind}, not the KVM character device" in f.summary
    assert "mknod" in f.fix
    r = kvmfw("doctor", "--kvm", str(path), "--json")
    assert r.returncode == 3
    data = json.loads(r.stdout)
    assert data["usable"] is False
    assert data["findings"][0]["status"] == FAIL


def test_character_device_that_is_not_kvm() -> None:
    findings = device_findings("/dev/null")
    assert [f.status for f in findings] == [OK, FAIL]
    assert "not a KVM device" in findings[1].summary
    assert kvmfw("doctor", "--kvm", "/dev/null").returncode == 3


def _diagnose_as_nobody(path: str) -> dict:
    """diagnose() in a forked child that dropped root (root bypasses file permissions)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(wfd, json.dumps(diagnose(HostPaths(kvm=path)).as_dict()).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        out = f.read()
    os.waitpid(pid, 0)
    return json.loads(out)


def test_unreadable_device_of_a_group(tmp_path: Path) -> None:
    """0660 and owned by a group: the fix is joining that group."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a character device of another group")
    d = Path(tempfile.mkdtemp(prefix="kvmfw-doctor-"))
    try:
        d.chmod(0o755)
        path = d / "kvm"
        os.mknod(path, 0o660 | stat.S_IFCHR, os.makedev(1, 3))
        os.chown(path, 0, 6)  # a group nobody is not in
        path.chmod(0o660)  # past the umask
        group = grp.getgrgid(6).gr_name
        data = _diagnose_as_nobody(str(path))
    finally:
        shutil.rmtree(d)
    f = data["findings"][0]
    assert data["usable"] is False and f["status"] == FAIL
    assert f"join group '{group}'" in f["fix"] and f"usermod -aG {group}" in f["fix"]
    assert f["data"]["group"] == group and f["data"]["mode"] == "0o660"


def test_unreadable_device(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # a root-only character device, checked by an unprivileged child (in a directory
        # it can reach: pytest's tmp_path is under a root-only 0700 directory)
        d = Path(tempfile.mkdtemp(prefix="kvmfw-doctor-"))
        try:
            d.chmod(0o755)
            path = d / "kvm"
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
            data = _diagnose_as_nobody(str(path))
        finally:
            shutil.rmtree(d)
    else:
        path = Path("/dev/kvm")
        if not path.exists() or os.access(path, os.R_OK | os.W_OK):
            pytest.skip("not root and no unreadable character device to check")
        data = diagnose(HostPaths(kvm=str(path))).as_dict()
    assert data["usable"] is False
    f = data["findings"][0]
    assert f["status"] == FAIL and "permission denied" in f["summary"]
    # group root, mode 0600: joining a group does not help; say how to give it to 'kvm'
    assert "chgrp kvm" in f["fix"] and "usermod -aG kvm" in f["fix"]


def test_real_device() -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this host")
    report = diagnose()
    assert report.usable, report.findings
    checks = {f.check: f for f in report.findings}
    assert checks["kvm-api"].data["version"] == 12
    kind = checks["kvm-kind"]
    modules = {m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if os.path.isdir(f"/sys/module/{m}")}
    if modules & {"kvm_intel", "kvm_amd"}:
        # the nested x86 environment (kvm_amd on QEMU's emulated SVM) must say hardware
        assert kind.status == OK and "hardware KVM" in kind.summary
        assert "kvm-nested" in checks
    elif "kvm_pvm" in modules:
        assert kind.status == WARN and "software KVM: kvm_pvm" in kind.summary
    r = kvmfw("doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kvmfw can run guests here" in r.stdout
    assert kind.summary in r.stdout
    data = json.loads(kvmfw("doctor", "--json").stdout)
    assert data["usable"] is True
    assert {f["check"] for f in data["findings"]} >= {"kvm-device", "kvm-api", "kvm-kind",
                                                       "perf-pmu", "perf-paranoid",
                                                       "build-headers", "build-compiler"}


def _fake_sys(tmp: Path, modules: dict[str, str | None], pmus: list[str]) -> Path:
    root = tmp / "sys"
    for name, nested in modules.items():
        d = root / "module" / name / "parameters"
        d.mkdir(parents=True)
        if nested is not None:
            (d / "nested").write_text(nested + "\n")
    events = root / "bus" / "event_source" / "devices"
    events.mkdir(parents=True)
    for p in pmus:
        (events / p).mkdir()
    return root


def _fake_proc(tmp: Path, paranoid: str | None) -> Path:
    root = tmp / "proc"
    (root / "sys" / "kernel").mkdir(parents=True)
    if paranoid is not None:
        (root / "sys" / "kernel" / "perf_event_paranoid").write_text(paranoid + "\n")
    (root / "cpuinfo").write_text("flags\t\t: fpu vme hypervisor\n")
    return root


@pytest.mark.parametrize(("module", "nested", "status", "text"), [
    ("kvm_intel", "Y", OK, "hardware KVM: kvm_intel"),
    ("kvm_amd", "1", OK, "hardware KVM: kvm_amd"),
    ("kvm_amd", "0", OK, "hardware KVM: kvm_amd"),
    ("kvm_pvm", None, WARN, "software KVM: kvm_pvm"),
])
def test_which_kvm(tmp_path: Path, module: str, nested: str | None, status: str,
                   text: str) -> None:
    paths = HostPaths(sys=str(_fake_sys(tmp_path, {"kvm": None, module: nested}, [])),
                      proc=str(_fake_proc(tmp_path, "2")))
    found = {f.check: f for f in check_module(paths)}
    assert found["kvm-kind"].status == status and text in found["kvm-kind"].summary
    if nested is None:
        assert "kvm-nested" not in found
        assert "0.6 us" in found["kvm-kind"].cost and "x86-linux-kvm" in found["kvm-kind"].fix
    elif nested in ("Y", "1"):
        assert "nested virtualization enabled" in found["kvm-nested"].summary
    else:
        assert "disabled" in found["kvm-nested"].summary
        assert f"modprobe {module} nested=1" in found["kvm-nested"].fix
    assert "this host is itself a VM" in found["kvm-kind"].summary or status == WARN


@pytest.mark.parametrize(("value", "privileged", "status", "text"), [
    ("-1", False, OK, "perf_event_paranoid=-1"),
    ("0", False, OK, "perf_event_paranoid=0"),
    ("1", False, OK, "perf_event_paranoid=1"),
    ("2", False, WARN, "user-space counting only"),
    ("3", False, WARN, "no perf at all for unprivileged users"),
    ("4", False, WARN, "no perf for unprivileged users"),
    ("2", True, OK, "running privileged"),
    ("junk", False, "info", "unreadable"),
    (None, False, "info", "unreadable"),
])
def test_perf_event_paranoid(tmp_path: Path, value: str | None, privileged: bool,
                             status: str, text: str) -> None:
    paths = HostPaths(proc=str(_fake_proc(tmp_path, value)),
                      sys=str(_fake_sys(tmp_path, {}, ["cpu"])))
    found = {f.check: f for f in check_perf(paths, privileged=privileged)}
    f = found["perf-paranoid"]
    assert f.status == status and text in f.summary
    if status == WARN:
        assert "sysctl kernel.perf_event_paranoid=1" in f.fix and "guest" in f.cost
    assert found["perf-pmu"].status == OK


@pytest.mark.parametrize(("pmus", "status", "hybrid"), [
    ([], WARN, False), (["software", "msr"], WARN, False), (["cpu"], OK, False),
    (["cpu_core", "cpu_atom"], OK, True), (["armv8_pmuv3_0"], OK, False),
])
def test_pmu_and_hybrid(tmp_path: Path, pmus: list[str], status: str, hybrid: bool) -> None:
    paths = HostPaths(proc=str(_fake_proc(tmp_path, "1")),
                      sys=str(_fake_sys(tmp_path, {}, pmus)))
    found = {f.check: f for f in check_perf(paths, privileged=False)}
    assert found["perf-pmu"].status == status
    if status == WARN:
        assert "pmu=on" in found["perf-pmu"].fix
    assert ("perf-hybrid" in found) == hybrid
    if hybrid:
        assert "taskset" in found["perf-hybrid"].fix


def test_build_tools_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    report = diagnose(HostPaths(kvm=str(tmp_path / "none"), include=str(tmp_path)))
    found = {f.check: f for f in report.findings}
    assert found["build-headers"].status == WARN
    assert "linux-libc-dev" in found["build-headers"].fix
    assert found["build-compiler"].status == WARN and "apt install gcc" in found[
        "build-compiler"].fix
    assert "binutils" in found["build-assembler"].fix


def test_arm64_guest_features_are_findings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17: doctor says, as info, whether 32-bit guests and a guest PMU are offered
    (on any host the capability query runs; x86's KVM answers 0 for ARM capabilities)."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this host")
    import kvmfw.doctor as doctor

    checks = {f.check: f for f in diagnose().findings}
    arm = doctor.machine_is_arm()
    assert ("guest-aarch32" in checks) is arm and ("guest-pmu" in checks) is arm
    if arm:
        return
    monkeypatch.setattr(doctor, "machine_is_arm", lambda: True)
    checks = {f.check: f for f in diagnose().findings}
    a32, pmu = checks["guest-aarch32"], checks["guest-pmu"]
    assert a32.status == pmu.status == "info"
    assert "AArch32 at EL1" in a32.summary and "refused" in a32.cost
    assert pmu.summary == "no KVM_CAP_ARM_PMU_V3" and "no PMU" in pmu.cost

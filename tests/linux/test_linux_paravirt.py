"""What Linux makes of kvmfw's x86 board, as of QEMU's (issue 13): the timer on IOAPIC pin 2
(GSI routing), KVM detected through the hypervisor bit (kvmclock, PV features), the
TSC-deadline timer, MTRRs and PAT on, the i8042 translating; Hyper-V enlightenments on
request; virtio-blk with its QueueNotify through KVM_IOEVENTFD, and the same guest with it
off."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from linuxguest import Boot, make_ext4, run, why_unavailable

_WHY = why_unavailable()
pytestmark = [pytest.mark.linux, pytest.mark.skipif(_WHY is not None, reason=_WHY or "")]
TIMEOUT = float(os.environ.get("KVMFW_LINUX_TIMEOUT", "60"))
# not quiet: the assertions read the kernel's log
CMDLINE = "console=ttyS0 reboot=k panic=-1 loglevel=7 kvmfw.exit=reboot"


@pytest.fixture(autouse=True)
def _x86_plugin() -> None:
    pytest.importorskip("kvmfw_x86", reason="the x86 arch plugin is not installed")


def test_timer_pv_clock_and_deadline_timer() -> None:
    r = run(Boot("kvmfw", "cloud-amd64", CMDLINE, cpus=2, timeout=TIMEOUT * 2))
    assert r.t_marker is not None and r.rc == 0, r.tail()
    text = r.text
    assert "MP-BIOS bug" not in text and "8254 timer not connected" not in text, r.tail()
    assert "Hypervisor detected: KVM" in text, r.tail()
    assert "clocksource: Switched to clocksource kvm-clock" in text, r.tail()
    assert "Calibrating delay loop (skipped)" in text, r.tail()
    assert "PV spinlocks enabled" in text, r.tail()
    assert "TSC deadline timer available" in text, r.tail()
    # what firmware leaves (SeaBIOS under QEMU -M pc): MTRRs on, so Linux keeps PAT on
    # (it turned PAT off with them: ioremap_wc uncached); the i8042 translating
    assert "MTRRs disabled" not in text and "x86/PAT: Configuration [0-7]: WB  WC" in text, \
        r.tail()
    assert "AT Translated Set 2 keyboard" in text, r.tail()


def test_hyperv_enlightenments_boot() -> None:
    """``hyperv=all``: Hyper-V leaves at 0x40000000, KVM's at 0x40000100; Linux still finds
    KVM (its detection scans every 0x100, and prefers KVM's leaves) and boots."""
    r = run(Boot("kvmfw", "cloud-amd64", CMDLINE, timeout=TIMEOUT * 2,
                 extra=["--option", "cpuid=hyperv=all"]))
    assert r.t_marker is not None and r.rc == 0, r.tail()
    assert "Hypervisor detected: KVM" in r.text, r.tail()


@pytest.mark.parametrize("ioeventfd", ["on", "off"])
def test_virtio_blk_with_and_without_ioeventfd(tmp_path: Path, ioeventfd: str) -> None:
    payload = f"ioeventfd {ioeventfd}, {os.getpid()}"
    img = make_ext4(tmp_path / "disk.img", {"hello.txt": payload.encode() + b"\n"})
    boot = Boot("kvmfw", "cloud-amd64", "console=ttyS0 reboot=k panic=-1 quiet "
                "kvmfw.exit=reboot kvmfw.test=blk", disk=img, timeout=TIMEOUT)
    boot.extra = ["--device", f"virtio-blk,file={img},ioeventfd={ioeventfd}"]
    boot.disk = None  # the device above, with the option
    r = run(boot)
    assert f"KVMFW-BLK-BEGIN\n{payload}\nKVMFW-BLK-END" in r.text.replace("\r", ""), r.tail()
    assert r.rc == 0, r.tail()

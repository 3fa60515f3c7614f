"""Debian bookworm's cloud and generic kernels with a busybox initramfs, booted under kvmfw
(and under QEMU/KVM, the reference) on the nested environment's real /dev/kvm: to the init
marker and a clean exit, 2 vCPUs, a virtio-blk round trip, an interactive console."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from linuxguest import BASE_CMDLINE, FLAVORS, Boot, Interactive, make_ext4, run

# The VMMs under test: kvmfw, and QEMU/KVM -M pc as the reference that proves the guest
# images and the environment. KVMFW_LINUX_VMMS=kvmfw (or qemu) narrows the set.
VMMS = os.environ.get("KVMFW_LINUX_VMMS", "kvmfw,qemu").split(",")
# A boot takes 5-15 s on a quiet host; a hung guest fails after this many seconds (the
# nested environment scales it by the measured speed of the outer guest).
TIMEOUT = float(os.environ.get("KVMFW_LINUX_TIMEOUT", "60"))
STEP = TIMEOUT / 2
"""Limit of one interactive step (a command's output, the exit after Ctrl-A x)."""
# The other tests leave through `reboot -f` (reboot=k: the i8042 reset line).
CMDLINE = f"{BASE_CMDLINE} kvmfw.exit=reboot"


def _check_vmm(vmm: str) -> None:
    if vmm == "kvmfw":
        try:
            import kvmfw_x86  # noqa: F401
        except ImportError as e:
            pytest.fail(f"the x86 arch plugin (plugins/x86) is not installed: {e}")


@pytest.fixture(params=VMMS)
def vmm(request: pytest.FixtureRequest) -> str:
    _check_vmm(request.param)
    return request.param


@pytest.mark.parametrize("how", ["reboot", "poweroff"])
@pytest.mark.parametrize("flavor", FLAVORS)
def test_boots_to_init_and_exits_cleanly(vmm: str, flavor: str, how: str) -> None:
    r = run(Boot(vmm, flavor, f"{BASE_CMDLINE} kvmfw.exit={how}", timeout=TIMEOUT))
    assert r.t_marker is not None, f"no init marker\n{r.tail()}"
    assert f"KVMFW-EXIT {how}" in r.text, r.tail()
    assert r.rc == 0, f"exit status {r.rc} after `{how} -f`\n{r.tail()}"
    print(f"{vmm} {flavor} {how}: marker {r.t_marker:.2f} s, exit {r.t_exit:.2f} s")


def test_two_vcpus_are_online(vmm: str) -> None:
    r = run(Boot(vmm, "cloud-amd64", f"{CMDLINE} kvmfw.test=cpus", cpus=2, timeout=TIMEOUT))
    assert "KVMFW-CPUS=2 KVMFW-ONLINE=0-1" in r.text, r.tail()
    assert r.rc == 0, r.tail()


def test_virtio_blk_mounts_ext4_and_reads_a_file_back(vmm: str, tmp_path: Path) -> None:
    payload = f"hello from an ext4 image, {os.getpid()}"
    img = make_ext4(tmp_path / "disk.img", {"hello.txt": payload.encode() + b"\n"})
    r = run(Boot(vmm, "cloud-amd64", f"{CMDLINE} kvmfw.test=blk", disk=img, timeout=TIMEOUT))
    text = r.text.replace("\r", "")
    assert "KVMFW-BLK-BEGIN" in text, r.tail()
    assert f"KVMFW-BLK-BEGIN\n{payload}\nKVMFW-BLK-END" in text, r.tail()
    assert r.rc == 0, r.tail()


def test_interactive_console_on_a_pseudo_terminal(vmm: str) -> None:
    s = Interactive(Boot(vmm, "cloud-amd64", f"{CMDLINE} kvmfw.test=shell", timeout=TIMEOUT))
    try:
        s.expect(rb"kvmfw# ", timeout=TIMEOUT)
        s.send(b"echo h''i\r")  # the echoed command line does not contain "hi" itself
        s.expect(rb"\nhi\r*\n", timeout=STEP)
        s.expect(rb"kvmfw# ", timeout=STEP)
        s.send(b"\x01x")  # Ctrl-A x, as QEMU
        rc = s.wait(timeout=STEP)
        assert rc is not None, "the VMM did not quit on Ctrl-A x"
        assert rc == 0, f"exit status {rc} after Ctrl-A x"
    finally:
        s.close()


def test_microvm_board_boots_two_vcpus_with_a_disk_and_powers_off(tmp_path: Path) -> None:
    """kvmfw's board without PCI and i8042 (``--option board=microvm``): the FADT says there
    is no keyboard controller, so Linux probes none; the disk is virtio-mmio; the guest
    leaves through ACPI power-off."""
    _check_vmm("kvmfw")
    img = make_ext4(tmp_path / "disk.img", {"hello.txt": b"microvm\n"})
    r = run(Boot("kvmfw-microvm", "cloud-amd64",
                 f"{BASE_CMDLINE} kvmfw.exit=poweroff kvmfw.test=blk", cpus=2, disk=img,
                 timeout=TIMEOUT))
    text = r.text.replace("\r", "")
    assert "KVMFW-BLK-BEGIN\nmicrovm\nKVMFW-BLK-END" in text, r.tail()
    assert "KVMFW-EXIT poweroff" in text and r.rc == 0, r.tail()


def _kaslr_layout(extra: list[str], cmdline: str = CMDLINE) -> tuple[int, int]:
    r = run(Boot("kvmfw", "cloud-amd64", f"{cmdline} kvmfw.test=kaslr", extra=extra,
                 timeout=TIMEOUT))
    m = re.search(r"KVMFW-KASLR text=([0-9a-f]+) code=([0-9a-f]+)", r.text)
    assert m is not None and r.rc == 0, r.tail()
    return int(m[1], 16), int(m[2], 16)


def test_kaslr_lays_the_kernel_out_as_its_seed_says() -> None:
    """The host-decompressed kernel gets the decompressor's KASLR from kvmfw: where Linux
    itself says its text is (``_text``, /proc/kallsyms) and its code lies in physical
    memory (/proc/iomem) are what the seed chose, the same for the same seed and 2 MiB-
    aligned; with ``nokaslr`` the kernel runs where it is linked."""
    _check_vmm("kvmfw")
    linked = (0xFFFFFFFF81000000, 0x1000000)
    a = _kaslr_layout(["--option", "kaslr=7"])
    assert a == _kaslr_layout(["--option", "kaslr=7"])
    b = _kaslr_layout(["--option", "kaslr=8"])
    for text, code in (a, b):
        assert (text - linked[0]) % (2 << 20) == 0 and 0 <= text - linked[0] < 1 << 30
        assert code % (2 << 20) == 0 and code >= linked[1]
    assert a != b and linked not in (a, b)
    assert _kaslr_layout([], f"{CMDLINE} nokaslr") == linked

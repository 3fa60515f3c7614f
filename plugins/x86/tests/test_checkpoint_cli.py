"""``kvmfw run --checkpoint-* / --restore`` end to end with the x86 plugin and the default
board: a real-mode guest prints a hash-derived character per step on the UART, so the
output of a checkpointed run plus its restored continuation must equal an uninterrupted
run's, byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                                reason="needs a readable and writable /dev/kvm")
pytest.importorskip("kvmfw_devices", reason="the default board needs kvmfw-devices")

# guests/idle16.S, 16-bit code at 0x7c00: EBX = rol(EBX * 33 + ECX, 5) over 1000 steps,
# then one character 'a' + (BL & 15) on the UART (0x3f8); 200 characters, a newline, then
# debug-exit (0xf4) with 0 (exit status 1). After the first 100 characters it halts until
# 100 ticks of the in-kernel PIT (~100 Hz) came: every run lasts over a second of
# simulated time however fast the CPU runs it, so a checkpoint placed by simulated time
# well before that (--checkpoint-at) always falls mid-run, in the first half or the idle.
GUEST = (Path(__file__).parent / "guests" / "idle16.bin").read_bytes()
CHARS = 200
HALF = 100
"""Characters printed before the guest's idle second."""
AT = 300_000_000_000
"""--checkpoint-at: 0.3 s of simulated time, well inside the idle second's end."""


def kvmfw(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmfw.cli", "run", *args],
                          capture_output=True, text=True, timeout=180, cwd=cwd,
                          stdin=subprocess.DEVNULL)


def guest_args(tmp: Path) -> list[str]:
    g = tmp / "guest.bin"
    g.write_bytes(GUEST)
    return ["--kernel", str(g), "--load-addr", "0x7c00", "--device", "debug-exit"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "out.txt"
    r = kvmfw(*guest_args(tmp), "--console", f"file:{out}", cwd=tmp)
    assert r.returncode == 1, r.stderr  # debug-exit 0 -> (0 << 1) | 1
    text = out.read_text()
    assert len(text) == CHARS + 1
    return text


def test_checkpoint_at_a_tick_then_restore_twice_continues_the_output(
        tmp_path: Path, reference: str) -> None:
    ck = tmp_path / "ck"
    out1 = tmp_path / "out1.txt"
    r = kvmfw(*guest_args(tmp_path), "--console", f"file:{out1}", "--checkpoint-at",
              str(AT), "--checkpoint-dir", str(ck), cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert out1.read_text() == reference  # the run went on after the checkpoint
    [cpt] = list(ck.iterdir())
    assert cpt.name == f"cpt.{AT}"
    assert f"kvmfw: checkpoint: {cpt}" in r.stderr
    manifest = json.loads((cpt / "manifest.json").read_text())
    assert manifest["arch"] == "x86" and manifest["time"]["tick"] == AT
    assert {p["name"] for p in manifest["plugins"]} == {"kvmfw-x86", "kvmfw-devices"}
    assert [b["name"] for b in manifest["board"]][-1] == "debug-exit"
    state = json.loads((cpt / "state.json").read_text())
    assert isinstance(state["devices"]["0:uart16550"], dict)
    rests = []
    for i in range(2):
        out2 = tmp_path / f"out2.{i}.txt"
        r2 = kvmfw("--restore", str(cpt), "--console", f"file:{out2}", cwd=tmp_path)
        assert r2.returncode == 1, r2.stderr
        rests.append(out2.read_text())
    # the checkpoint fell before the idle second ended: at least the second half is left,
    # the same both times, and it is how the uninterrupted output ends
    assert rests[0] == rests[1]
    assert CHARS - HALF < len(rests[0]) <= CHARS + 1 and reference.endswith(rests[0])


def test_exit_after_checkpoint_then_restore_gives_the_rest(
        tmp_path: Path, reference: str) -> None:
    """--exit-after-checkpoint with the checkpoint the guest asks for (pseudo-op, after
    its 50th character): the run ends right there, the restore prints exactly the rest."""
    g = tmp_path / "guest.bin"
    g.write_bytes(GUEST_OP)
    ck = tmp_path / "ck"
    out1, out2 = tmp_path / "out1.txt", tmp_path / "out2.txt"
    r = kvmfw("--kernel", str(g), "--load-addr", "0x7c00", *OP_BOARD, "--console",
              f"file:{out1}", "--checkpoint-dir", str(ck), "--exit-after-checkpoint",
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "checkpoint written to" in r.stderr
    assert out1.read_text() == reference[:50]
    [cpt] = list(ck.iterdir())
    r2 = kvmfw("--restore", str(cpt), "--console", f"file:{out2}", "--checkpoint-dir",
               str(tmp_path / "ck2"), cwd=tmp_path)
    assert r2.returncode == 1, r2.stderr
    assert out1.read_text() + out2.read_text() == reference
    assert not (tmp_path / "ck2").exists() or list((tmp_path / "ck2").iterdir()) == []


def test_sigusr1_takes_a_checkpoint_and_the_run_goes_on(
        tmp_path: Path, reference: str) -> None:
    ck = tmp_path / "ck"
    out1, out2 = tmp_path / "out1.txt", tmp_path / "out2.txt"
    p = subprocess.Popen([sys.executable, "-m", "kvmfw.cli", "run", *guest_args(tmp_path),
                          "--console", f"file:{out1}", "--checkpoint-dir", str(ck)],
                         cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while (not out1.exists() or len(out1.read_text()) < 20) and p.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    p.send_signal(signal.SIGUSR1)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1, err
    assert out1.read_text() == reference
    [cpt] = list(ck.iterdir())
    r2 = kvmfw("--restore", str(cpt), "--console", f"file:{out2}", cwd=tmp_path)
    assert r2.returncode == 1, r2.stderr
    assert reference.endswith(out2.read_text()) and len(out2.read_text()) < CHARS


def test_restore_refusals_are_one_line(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    r = kvmfw(*guest_args(tmp_path), "--console", "none", "--checkpoint-at", "1000000000",
              "--checkpoint-dir", str(ck), "--exit-after-checkpoint", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    [cpt] = list(ck.iterdir())
    r = kvmfw("--restore", str(cpt), "--memory", "512M", cwd=tmp_path)
    assert r.returncode == 2
    assert "drop --memory" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = kvmfw("--restore", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and "not a checkpoint directory" in r.stderr
    r = kvmfw(*guest_args(tmp_path), "--checkpoint-on", "SIGTERM", cwd=tmp_path)
    assert r.returncode == 2 and "--checkpoint-on" in r.stderr
    with open(cpt / "ram" / "0.bin", "r+b") as f:
        f.seek(0x7c00)
        f.write(b"\x90")
    r = kvmfw("--restore", str(cpt), "--console", "none", cwd=tmp_path)
    assert r.returncode == 9, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "ram/0.bin: checksum mismatch" in lines[0]


def test_a_disk_image_changed_since_the_checkpoint_is_refused(tmp_path: Path,
                                                              reference: str) -> None:
    """The checkpoint names the virtio-blk image (size, modification time); a restore
    after something wrote to it is refused in one line unless --trust-host-files."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(64 * 1024))
    blk = ["--device", f"virtio-blk,file={disk}"]
    ck = tmp_path / "ck"
    r = kvmfw(*guest_args(tmp_path), *blk, "--console", "none", "--checkpoint-at", str(AT),
              "--checkpoint-dir", str(ck), "--exit-after-checkpoint", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    [cpt] = list(ck.iterdir())
    [named] = json.loads((cpt / "manifest.json").read_text())["host_files"]
    assert named["path"] == str(disk) and named["size"] == 64 * 1024
    out = tmp_path / "out.txt"
    r = kvmfw("--restore", str(cpt), "--console", f"file:{out}", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    with disk.open("r+b") as f:  # another run wrote to the disk
        f.write(b"\x01")
    os.utime(disk, ns=(0, named["mtime_ns"] + 10**9))
    r = kvmfw("--restore", str(cpt), "--console", "none", cwd=tmp_path)
    assert r.returncode == 9, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert "disk.img changed since the checkpoint" in line and "--trust-host-files" in line
    out2 = tmp_path / "out2.txt"
    r = kvmfw("--restore", str(cpt), "--trust-host-files", "--console", f"file:{out2}",
              cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert out.read_text() == out2.read_text() and reference.endswith(out.read_text())
    r = kvmfw(*guest_args(tmp_path), "--trust-host-files", cwd=tmp_path)
    assert r.returncode == 2 and "--trust-host-files applies to --restore" in r.stderr


# The same computation and output without the idle second, asking the pseudo-op device
# for a checkpoint (op 0x43: a dword read at window offset 0x4300) after its 50th
# character; the window sits at 0x100000, just above the 1 MiB of RAM, reached from real
# mode as 0xffff:0x4310. Assembled from:
#   mov $0x3f8,%dx; xor %ebx,%ebx; xor %si,%si
#   outer: mov $1000,%ecx
#   inner: imul $33,%ebx,%ebx; add %ecx,%ebx; rol $5,%ebx; loop inner
#   mov %bl,%al; and $15,%al; add $0x61,%al; out %al,%dx
#   inc %si; cmp $50,%si; jne 2f; mov $0xffff,%ax; mov %ax,%es; mov %es:(0x4310),%eax
#   2: cmp $200,%si; jb outer
#   mov $10,%al; out %al,%dx; mov $0xf4,%dx; xor %al,%al; out %al,%dx; 1: hlt; jmp 1b
GUEST_OP = bytes.fromhex(
    "baf8036631db31f666b9e8030000666bdb216601cb66c1c305e2f388d8240f0461ee4683fe32750ab8"
    "ffff8ec02666a1104381fec80072d0b00aeebaf40030c0eef4ebfd")
OP_BOARD = ["--memory", "1M", "--no-default-devices", "--device", "uart16550", "--device",
            "debug-exit", "--device", "pseudo-op,base=0x100000"]


def test_the_pseudo_op_checkpoint_is_taken_and_restores(tmp_path: Path) -> None:
    g = tmp_path / "guest.bin"
    g.write_bytes(GUEST_OP)
    ck = tmp_path / "ck"
    out1, out2 = tmp_path / "out1.txt", tmp_path / "out2.txt"
    r = kvmfw("--kernel", str(g), "--load-addr", "0x7c00", *OP_BOARD, "--console",
              f"file:{out1}", "--checkpoint-dir", str(ck), cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    full = out1.read_text()
    assert len(full) == CHARS + 1
    [cpt] = list(ck.iterdir())
    state = json.loads((cpt / "state.json").read_text())
    assert "2:pseudo-op" in state["devices"]
    for _ in range(2):
        r2 = kvmfw("--restore", str(cpt), "--console", f"file:{out2}", cwd=tmp_path)
        assert r2.returncode == 1, r2.stderr
        assert full[:50] + out2.read_text() == full  # continued right after the op


def test_periodic_incremental_checkpoints_restore_through_the_chain(
        tmp_path: Path, reference: str) -> None:
    ck = tmp_path / "ck"
    # every 50 ms of simulated time: the guest's idle second alone gives more than 3
    r = kvmfw(*guest_args(tmp_path), "--console", "none", "--checkpoint-at",
              "50000000000,50000000000", "--checkpoint-incremental", "--checkpoint-dir",
              str(ck), cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    cpts = sorted(ck.iterdir(), key=lambda p: int(p.name[4:]))
    assert len(cpts) >= 3
    mans = [json.loads((p / "manifest.json").read_text()) for p in cpts]
    assert mans[0]["parent"] is None
    for prev, man in zip(cpts, mans[1:], strict=False):
        assert man["parent"]["path"] == f"../{prev.name}"
        assert man["memory"][0]["pages"] < 64  # a few pages, not the board's tables
    out = tmp_path / "out.txt"
    r2 = kvmfw("--restore", str(cpts[1]), "--console", f"file:{out}", "--checkpoint-at",
               str(int(cpts[1].name[4:]) + 50000000000), "--checkpoint-incremental",
               "--checkpoint-dir", str(tmp_path / "ck2"), cwd=tmp_path)
    assert r2.returncode == 1, r2.stderr
    assert reference.endswith(out.read_text())
    [again] = list((tmp_path / "ck2").iterdir())
    man = json.loads((again / "manifest.json").read_text())
    assert Path(again / man["parent"]["path"]).resolve() == cpts[1].resolve()
    out3 = tmp_path / "out3.txt"
    r3 = kvmfw("--restore", str(again), "--console", f"file:{out3}", cwd=tmp_path)
    assert r3.returncode == 1, r3.stderr
    assert reference.endswith(out3.read_text())
    assert len(out3.read_text()) <= len(out.read_text())  # later in the run (or the idle)


def test_checkpoints_past_the_limit_are_refused_and_the_run_goes_on(
        tmp_path: Path, reference: str) -> None:
    """--checkpoint-limit bounds what a run writes (a guest asking in a loop, a short
    period): the rest are refused with one warning and the output is complete. A period
    of one tick reaches the limit whatever the host's speed (the run is longer than a
    millisecond of simulated time); past it the period stops firing."""
    ck, out = tmp_path / "ck", tmp_path / "out.txt"
    r = kvmfw(*guest_args(tmp_path), "--console", f"file:{out}", "--checkpoint-at",
              "1000000000,1", "--checkpoint-limit", "2", "--checkpoint-dir",
              str(ck), cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert len(list(ck.iterdir())) == 2
    assert "checkpoint(s) refused, the first: 2 checkpoints written already" in r.stderr
    assert out.read_text() == reference
    bad = kvmfw(*guest_args(tmp_path), "--checkpoint-limit", "-1", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "--checkpoint-limit -1: must be between 0 and" in bad.stderr


# --- the x86 long-mode AVX/x87/MSR guest through the checkpoint directory format -----------

def _restore_avx_guest(path: str) -> dict[str, object]:
    """The new process: Machine.restore the directory, put the test reporter back, run."""
    from conftest import Reporter, _MmioReporter
    from kvmfw.device import Range
    from kvmfw.machine import Machine

    rep = Reporter()

    def setup(m: Machine) -> None:
        rep.machine = m
        m.map_device(Range("pio", 0xE0, 8, "reporter"), rep)
        m.map_device(Range("mmio", 0xD0000000, 0x10, "reporter-mmio"), _MmioReporter(rep))

    m = Machine.restore(path, setup=setup)
    try:
        r = m.run(timeout=300)
        return {"status": r.status, "values": rep.values}
    finally:
        m.close()


def test_the_avx_guest_continues_from_a_checkpoint_directory(tmp_path: Path) -> None:
    """ckpt64.elf (AVX/AVX2/AVX-512 where present, x87, MSRs, PIT and APIC timers) stopped
    mid-computation, written with Machine.checkpoint, restored by Machine.restore in a new
    process twice: the same results as an uninterrupted run."""
    import test_checkpoint_x86 as tx

    m, rep, avx512 = tx.build()
    try:
        tx.run_to_mark(m, rep)  # mid-computation, both timers ticking
        cpt = m.checkpoint(tmp_path / "cpt")
    finally:
        m.close()
    manifest = json.loads((cpt / "manifest.json").read_text())
    assert manifest["cpu_model"] is not None and manifest["machine"]["options"] == {
        "irqchip": "kernel"}
    expected = tx.uninterrupted(avx512)
    for _ in range(2):
        p = subprocess.run([sys.executable, __file__, "restore-avx", str(cpt)],
                           capture_output=True, text=True, timeout=300,
                           cwd=Path(__file__).parent)
        assert p.returncode == 0, p.stderr[-3000:]
        out = json.loads(p.stdout.strip().splitlines()[-1])
        assert out["status"] == 0
        n = tx.N_TICK_VALUES
        assert out["values"][:-n] == expected[:-n]


if __name__ == "__main__" and sys.argv[1:2] == ["restore-avx"]:
    print(json.dumps(_restore_avx_guest(sys.argv[2])))

"""Pseudo-op window: every operation, argument registers, file confinement, bad accesses."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import Harness

from kvmfw_devices import pseudo_op as p
from kvmfw_devices.pseudo_op import PseudoOp

GUEST = Path(p.__file__).parent / "guest"
BUF_GPA = 0xFFFF0000 + p.BUF_OFFSET


def call(dev: PseudoOp, op: int, *args: int) -> int:
    for i, a in enumerate(args):
        dev.write(8 * i, a.to_bytes(8, "little"))
    return int.from_bytes(dev.read(op << 8, 8), "little")


def put_string(h: Harness, gpa: int, text: str) -> None:
    h.ctx.memory.write(gpa, text.encode() + b"\0")


@pytest.fixture
def dev(h: Harness, tmp_path: Path) -> PseudoOp:
    return PseudoOp(h.ctx, dir=str(tmp_path))


def test_window_and_magic(dev: PseudoOp) -> None:
    (r,) = dev.ranges()
    assert (r.space, r.base, r.size) == ("mmio", 0xFFFF0000, 0x10000)
    assert dev.read(p.REG_MAGIC, 8) == p.MAGIC.to_bytes(8, "little")
    assert dev.read(p.REG_RESULT, 8) == bytes(8)


def test_argument_registers_read_back(dev: PseudoOp) -> None:
    dev.write(0x08, (0x1122334455667788).to_bytes(8, "little"))
    dev.write(0x10, b"\xaa\xbb\xcc\xdd")
    assert dev.read(0x08, 8) == (0x1122334455667788).to_bytes(8, "little")
    assert dev.read(0x10, 4) == b"\xaa\xbb\xcc\xdd"


def test_sum_and_result_register(dev: PseudoOp) -> None:
    assert call(dev, p.OP_SUM, 1, 2, 3, 4, 5, 6) == 21
    assert dev.read(p.REG_RESULT, 8) == (21).to_bytes(8, "little")


def test_exit_with_code_by_write(dev: PseudoOp, h: Harness) -> None:
    dev.write(p.OP_EXIT << 8, (7).to_bytes(8, "little"))
    assert h.exits == [(7, "guest pseudo-op exit(7)")]


def test_fail_uses_code_or_one(dev: PseudoOp, h: Harness) -> None:
    dev.write(p.OP_FAIL << 8, (0).to_bytes(4, "little"))
    dev.write(p.OP_FAIL << 8, (3).to_bytes(4, "little"))
    assert [s for s, _ in h.exits] == [1, 3]


def test_rpns_is_simulated_time(dev: PseudoOp, h: Harness) -> None:
    h.ctx.eventq.cur_tick = 5_000_000
    assert call(dev, p.OP_RPNS) == 5000


@pytest.mark.parametrize("op,services", [
    (p.OP_DUMP_STATS, ["dump_stats"]), (p.OP_RESET_STATS, ["reset_stats"]),
    (p.OP_DUMP_RESET_STATS, ["dump_stats", "reset_stats"]), (p.OP_CHECKPOINT, ["checkpoint"]),
])
def test_machine_services(dev: PseudoOp, h: Harness, op: int, services: list[str]) -> None:
    assert call(dev, op) == 0
    assert [n for n, _ in h.services_called] == services


def test_missing_service_fails_the_op(h: Harness) -> None:
    h.ctx.services.clear()
    dev = PseudoOp(h.ctx)
    assert call(dev, p.OP_CHECKPOINT) == p.FAILED
    assert dev.stats["failed_ops"] == 1


def test_work_markers(dev: PseudoOp, h: Harness) -> None:
    assert call(dev, p.OP_WORK_BEGIN, 5, 1) == 0
    assert dev.work == {"5.1": 0}
    assert call(dev, p.OP_WORK_END, 5, 1) == 0
    assert call(dev, p.OP_WORK_END, 5, 1) == p.FAILED  # no matching begin
    assert ("work_begin", (5, 1)) in h.services_called


def test_read_file_into_guest_ram(dev: PseudoOp, h: Harness, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_bytes(b"hello host")
    put_string(h, 0x1000, "in.txt")
    assert call(dev, p.OP_READ_FILE, 0x2000, 64, 6, 0x1000) == 4
    assert h.ctx.memory.read(0x2000, 4) == b"host"
    assert call(dev, p.OP_READ_FILE, 0x2000, 64, 100, 0x1000) == 0


def test_write_file_from_guest_ram(dev: PseudoOp, h: Harness, tmp_path: Path) -> None:
    put_string(h, 0x1000, "out.bin")
    h.ctx.memory.write(0x3000, b"abcdef")
    assert call(dev, p.OP_WRITE_FILE, 0x3000, 6, 0, 0x1000) == 6
    assert call(dev, p.OP_WRITE_FILE, 0x3000, 2, 6, 0x1000) == 2
    assert (tmp_path / "out.bin").read_bytes() == b"abcdefab"


def test_file_ops_through_the_window_buffer(dev: PseudoOp, tmp_path: Path) -> None:
    for i, b in enumerate(b"name.txt\0"):
        dev.write(p.BUF_OFFSET + i, bytes((b,)))
    dev.write(p.BUF_OFFSET + 256, b"DATA")
    assert call(dev, p.OP_WRITE_FILE, BUF_GPA + 256, 4, 0, BUF_GPA) == 4
    assert (tmp_path / "name.txt").read_bytes() == b"DATA"
    assert call(dev, p.OP_READ_FILE, BUF_GPA + 512, 4, 0, BUF_GPA) == 4
    assert dev.read(p.BUF_OFFSET + 512, 4) == b"DATA"


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "sub/../../x", "link/x", ""])
def test_file_names_confined_to_the_directory(dev: PseudoOp, h: Harness, tmp_path: Path,
                                               name: str) -> None:
    outside = tmp_path.parent / "outside_dir"
    outside.mkdir(exist_ok=True)
    (tmp_path / "link").symlink_to(outside)
    put_string(h, 0x1000, name)
    h.ctx.memory.write(0x3000, b"x")
    assert call(dev, p.OP_WRITE_FILE, 0x3000, 1, 0, 0x1000) == p.FAILED
    assert not (outside / "x").exists() and not (tmp_path.parent / "escape").exists()
    assert call(dev, p.OP_READ_FILE, 0x3000, 1, 0, 0x1000) == p.FAILED


def test_file_ops_refused_without_dir(h: Harness) -> None:
    dev = PseudoOp(h.ctx)
    put_string(h, 0x1000, "x")
    assert call(dev, p.OP_WRITE_FILE, 0x3000, 1, 0, 0x1000) == p.FAILED


def test_guest_addresses_outside_ram_fail(dev: PseudoOp, h: Harness, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"zz")
    put_string(h, 0x1000, "f")
    assert call(dev, p.OP_READ_FILE, 0x4000_0000, 2, 0, 0x1000) == p.FAILED
    assert call(dev, p.OP_READ_FILE, 0xFFFFF, 2, 0, 0x1000) == p.FAILED  # straddles RAM end
    assert call(dev, p.OP_READ_FILE, 0x2000, 2, 0, 0x4000_0000) == p.FAILED
    assert call(dev, p.OP_READ_FILE, 0x2000, 1 << 63, 0, 0x1000) == p.FAILED


def test_bad_accesses_counted_and_answered(dev: PseudoOp, h: Harness) -> None:
    assert dev.read(0x7700, 8) == b"\xff" * 8  # unknown operation
    assert dev.read(0x2104, 4) == b"\xff" * 4  # not at the operation's offset
    assert dev.read(0x3C, 8) == b"\xff" * 8  # straddles MAGIC's end
    assert dev.read(0, 3) == b"\xff" * 3  # odd size
    dev.write(p.REG_MAGIC, bytes(8))  # read-only
    dev.write(0x2C, bytes(8))  # straddles ARG5 and RESULT
    dev.write(p.OP_EXIT << 8, b"\x01")  # an operation needs a 4- or 8-byte access
    assert dev.stats["bad_accesses"] == 7
    assert h.exits == []


def test_guest_sources_build(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler on this host")
    subprocess.run([cc, "-O2", "-Wall", "-Werror", "-o", str(tmp_path / "kvmfwop"),
                    str(GUEST / "kvmfwop.c")], check=True)
    subprocess.run([cc, "-c", "-o", str(tmp_path / "ops.o"), str(GUEST / "kvmfw_ops_x86_64.S")],
                   check=True)
    usage = subprocess.run([str(tmp_path / "kvmfwop")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: kvmfwop" in usage.stderr


def test_directory_from_machine_option(h: Harness, tmp_path: Path) -> None:
    h.ctx.options["pseudo_op_dir"] = str(tmp_path)
    dev = PseudoOp(h.ctx)
    put_string(h, 0x1000, "opt.txt")
    h.ctx.memory.write(0x3000, b"yes")
    assert call(dev, p.OP_WRITE_FILE, 0x3000, 3, 0, 0x1000) == 3
    assert (tmp_path / "opt.txt").read_bytes() == b"yes"

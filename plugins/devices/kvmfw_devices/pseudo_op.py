"""Pseudo-op device: gem5's m5ops in address mode, as an MMIO window the guest calls into.

Window layout (default base ``0xffff0000``, gem5's x86 ``M5OP_ADDR``; 64 KiB)::

    0x0000 + 8*i  ARG0..ARG5   u64, read/write: the arguments of the next operation
    0x0030        RESULT       u64, read-only: the result of the last operation
    0x0038        MAGIC        u64, read-only: 0x00000001_4f4d564b ("KVMO", version 1)
    0xNN00        operation NN (gem5's function numbers, below): a read executes it with
                  ARG0..ARG5 and returns the result; a write of V executes it with ARG0 = V
                  (the result lands in RESULT)
    0x8000-0xffff BUFFER       32 KiB of scratch memory inside the device

    0x07 rpns                  -> simulated nanoseconds
    0x21 exit(code)            end the run with exit status ``code``
    0x22 fail(code)            end the run as a guest failure (status ``code``, 1 if 0)
    0x23 sum(a..f)             -> a+b+c+d+e+f (checks the interface)
    0x40 reset_stats  0x41 dump_stats  0x42 dump_reset_stats  0x43 checkpoint
    0x4f writefile(addr, len, offset, name) -> bytes written to host file ``name``
    0x50 readfile(addr, len, offset, name)  -> bytes read from host file ``name``
    0x5a work_begin(work_id, thread_id)     0x5b work_end(work_id, thread_id)

Addresses are guest-physical and checked against guest RAM; an address inside the window's
own BUFFER refers to it, which is how a Linux program that maps the window through
``/dev/mem`` (``guest/kvmfwop.c``) passes data without knowing physical addresses. Host files
live in the directory named by ``dir`` (or the machine option ``pseudo_op_dir``); names
that are absolute or escape it (``..``, symlinks) are refused. A failed operation returns
all ones. Stats, checkpoints and work markers go to the machine services ``dump_stats``,
``reset_stats``, ``checkpoint``, ``work_begin`` and ``work_end`` (``ctx.services``), when
the machine provides them.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, Any, ClassVar

from kvmfw.device import ConfigKey, Device, DeviceContext, Range, parse_int
from kvmfw.errors import CheckpointError, ConfigError
from kvmfw.eventq import TICKS_PER_NS

from kvmfw_devices import KVMFW_PLUGIN_API as KVMFW_PLUGIN_API  # checked by the core
from kvmfw_devices._state import SavedState
from kvmfw_devices._util import ones, to_bytes, to_int

if TYPE_CHECKING:
    from pathlib import Path

WINDOW_SIZE = 0x10000
NUM_ARGS = 6
REG_RESULT = 0x30
REG_MAGIC = 0x38
MAGIC = (1 << 32) | 0x4F4D564B
BUF_OFFSET = 0x8000
BUF_SIZE = WINDOW_SIZE - BUF_OFFSET
MAX_NAME = 255
FAILED = (1 << 64) - 1
MASK64 = FAILED
WARN_LIMIT = 10
MAX_WORK_ITEMS = 1024
"""Work items open at once (work_begin without work_end); more fail, as a guest that never
ends its work items must not grow host memory."""

OP_RPNS = 0x07
OP_EXIT = 0x21
OP_FAIL = 0x22
OP_SUM = 0x23
OP_RESET_STATS = 0x40
OP_DUMP_STATS = 0x41
OP_DUMP_RESET_STATS = 0x42
OP_CHECKPOINT = 0x43
OP_WRITE_FILE = 0x4F
OP_READ_FILE = 0x50
OP_WORK_BEGIN = 0x5A
OP_WORK_END = 0x5B

OP_NAMES = {
    OP_RPNS: "rpns", OP_EXIT: "exit", OP_FAIL: "fail", OP_SUM: "sum",
    OP_RESET_STATS: "reset_stats", OP_DUMP_STATS: "dump_stats",
    OP_DUMP_RESET_STATS: "dump_reset_stats", OP_CHECKPOINT: "checkpoint",
    OP_WRITE_FILE: "write_file", OP_READ_FILE: "read_file",
    OP_WORK_BEGIN: "work_begin", OP_WORK_END: "work_end",
}


def _opt_path(text: str) -> str | None:
    return text or None


def _open_regular(path: Path, flags: int) -> int:
    """Open a host file for a file operation; anything but a regular file (a FIFO that would
    block the machine, a device node) is refused with OSError."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


class PseudoOp(Device):
    """gem5-style pseudo operations through an MMIO window."""

    name: ClassVar[str] = "pseudo-op"
    config: ClassVar[dict[str, ConfigKey]] = {
        "base": ConfigKey(parse_int, 0xFFFF0000, "MMIO base of the 64 KiB window"),
        "dir": ConfigKey(_opt_path, None,
                         "host directory for readfile/writefile (default: the machine option "
                         "pseudo_op_dir; unset: file ops refused)"),
    }

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        root = self.params["dir"] or ctx.options.get("pseudo_op_dir")
        if root is not None and not os.path.isdir(root):
            raise ConfigError(f"pseudo-op: dir {root} is not a directory (create it, or leave "
                              "dir unset to refuse the guest's file operations)")
        self.stats.update({f"op_{n}": 0 for n in OP_NAMES.values()})
        self.stats.update(failed_ops=0, file_bytes_read=0, file_bytes_written=0, warnings=0)
        self._warned: dict[str, int] = {}
        self.reset()

    def ranges(self) -> list[Range]:
        return [Range("mmio", self.params["base"], WINDOW_SIZE, self.name)]

    def reset(self) -> None:
        self.args = [0] * NUM_ARGS
        self.result = 0
        self.buffer = bytearray(BUF_SIZE)
        self.work: dict[str, int] = {}  # "work_id.thread_id" -> begin tick

    # --- guest accesses ------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        self.stats["reads"] += 1
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > WINDOW_SIZE:
            return self._bad(size)
        if offset >= BUF_OFFSET:
            o = offset - BUF_OFFSET
            return bytes(self.buffer[o:o + size])
        if offset < REG_MAGIC + 8:
            if offset + size > REG_MAGIC + 8:
                return self._bad(size)
            return self._read_reg(offset, size)
        op = offset >> 8
        if offset & 0xFF or op not in OP_NAMES or size < 4:
            return self._bad(size)
        self.result = self._execute(op)
        return to_bytes(self.result, size)

    def _read_reg(self, offset: int, size: int) -> bytes:
        regs = self.args + [self.result, MAGIC]
        raw = b"".join(to_bytes(v, 8) for v in regs)
        return raw[offset:offset + size]

    def write(self, offset: int, data: bytes) -> None:
        self.stats["writes"] += 1
        size = len(data)
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > WINDOW_SIZE:
            self._bad(size)
            return
        if offset >= BUF_OFFSET:
            o = offset - BUF_OFFSET
            self.buffer[o:o + size] = data
            return
        if offset < REG_RESULT:
            if offset + size > REG_RESULT:
                self._bad(size)
                return
            raw = bytearray(b"".join(to_bytes(v, 8) for v in self.args))
            raw[offset:offset + size] = data
            self.args = [to_int(raw[i * 8:i * 8 + 8]) for i in range(NUM_ARGS)]
            return
        op = offset >> 8
        if offset & 0xFF or op not in OP_NAMES or size < 4:
            self._bad(size)  # RESULT and MAGIC are read-only; unknown operations
            return
        self.args[0] = to_int(data)
        self.result = self._execute(op)

    def _warn(self, kind: str, msg: str, *args: Any) -> None:
        """Log a guest-caused warning, the first WARN_LIMIT of each kind only (a guest in a
        loop must not flood the host's log); the rest are counted in ``warnings``."""
        self.stats["warnings"] += 1
        n = self._warned[kind] = self._warned.get(kind, 0) + 1
        if n <= WARN_LIMIT:
            self.log.warning(msg + (" (further ones are counted, not logged)"
                                    if n == WARN_LIMIT else ""), *args)

    def _bad(self, size: int) -> bytes:
        self.stats["bad_accesses"] += 1
        return ones(size)

    # --- operations ----------------------------------------------------------------------

    def _execute(self, op: int) -> int:
        name = OP_NAMES[op]
        self.stats[f"op_{name}"] += 1
        a = self.args
        result: int | None
        if op == OP_RPNS:
            result = self.ctx.eventq.cur_tick // TICKS_PER_NS
        elif op == OP_EXIT:
            self.ctx.request_exit(a[0], f"guest pseudo-op exit({a[0]})")
            result = 0
        elif op == OP_FAIL:
            self.ctx.request_exit(a[0] or 1, f"guest pseudo-op fail({a[0]})")
            result = 0
        elif op == OP_SUM:
            result = sum(a) & MASK64
        elif op == OP_DUMP_RESET_STATS:
            result = self._service("dump_stats")
            if result is not None:
                result = self._service("reset_stats")
        elif op in (OP_RESET_STATS, OP_DUMP_STATS, OP_CHECKPOINT):
            result = self._service(name)
        elif op in (OP_WORK_BEGIN, OP_WORK_END):
            result = self._work(op == OP_WORK_BEGIN, a[0], a[1])
        elif op == OP_READ_FILE:
            result = self._read_file(a[0], a[1], a[2], a[3])
        else:
            result = self._write_file(a[0], a[1], a[2], a[3])
        if result is None:
            self.stats["failed_ops"] += 1
            return FAILED
        return result

    def _service(self, name: str, *args: Any) -> int | None:
        svc = self.ctx.services.get(name)
        if svc is None:
            self._warn("no_service", "pseudo-op %s: the machine provides no %s service", name,
                       name)
            return None
        svc(*args)
        return 0

    def _work(self, begin: bool, work_id: int, thread_id: int) -> int | None:
        key = f"{work_id}.{thread_id}"
        now = self.ctx.eventq.cur_tick
        if begin:
            if key not in self.work and len(self.work) >= MAX_WORK_ITEMS:
                self._warn("work_items", "pseudo-op work_begin: %d work items already open",
                           MAX_WORK_ITEMS)
                return None
            self.work[key] = now
        elif self.work.pop(key, None) is None:
            return None  # end without a begin
        svc = self.ctx.services.get("work_begin" if begin else "work_end")
        if svc is not None:
            svc(work_id, thread_id)
        return 0

    # --- guest memory and host files -------------------------------------------------------

    def _guest_range(self, addr: int, length: int) -> memoryview | None:
        """The guest bytes at ``[addr, addr + length)``: guest RAM or this window's buffer."""
        buf_base = self.params["base"] + BUF_OFFSET
        if buf_base <= addr and addr + length <= buf_base + BUF_SIZE:
            o = addr - buf_base
            return memoryview(self.buffer)[o:o + length]
        if length >= 0 and self.ctx.memory.contains(addr, max(length, 1)):
            return self.ctx.memory.view(addr, length)
        return None

    def _guest_string(self, addr: int) -> str | None:
        for n in range(MAX_NAME + 1):
            b = self._guest_range(addr + n, 1)
            if b is None:
                return None
            if b[0] == 0:
                raw = self._guest_range(addr, n)
                return None if raw is None else bytes(raw).decode("utf-8", "replace")
        return None

    def after_fork(self, child: int) -> None:
        """A forked child writes its host files into ``<dir>/fork.<pid>/`` (created now),
        so parent and children never write the same file; it reads a file from there once
        it wrote it, else from ``dir``."""
        root = self.params["dir"] or self.ctx.options.get("pseudo_op_dir")
        if root is None:
            return
        from pathlib import Path  # (not at import: pathlib is not on a run's path)

        d = Path(root) / f"fork.{child}"
        d.mkdir(exist_ok=True)
        self._fork_dir = d

    _fork_dir: Path | None = None

    def _host_path(self, name_addr: int, *, write: bool = False) -> Path | None:
        from pathlib import Path  # (not at import: pathlib is not on a run's path)

        root = self.params["dir"] or self.ctx.options.get("pseudo_op_dir")
        name = self._guest_string(name_addr)
        if root is None or not name:
            return None
        if self._fork_dir is not None:
            mine = self._fork_dir / name
            if write or (not os.path.isabs(name) and mine.resolve().is_relative_to(
                    self._fork_dir.resolve()) and mine.is_file()):
                root = str(self._fork_dir)
        base = Path(root).resolve()
        path = (base / name).resolve()
        if os.path.isabs(name) or not path.is_relative_to(base) or path == base:
            self._warn("refused_file", "pseudo-op: refused host file %r outside %s", name, base)
            return None
        return path

    def _read_file(self, addr: int, length: int, offset: int, name_addr: int) -> int | None:
        dest = self._guest_range(addr, length)
        path = self._host_path(name_addr)
        if dest is None or path is None:
            return None
        done = 0
        try:
            fd = _open_regular(path, os.O_RDONLY)
            try:  # straight into guest RAM: no host copy the size of the guest's request
                while done < length:
                    n = os.preadv(fd, [dest[done:]], offset + done)
                    if n <= 0:
                        break
                    done += n
            finally:
                os.close(fd)
        except (OSError, OverflowError, ValueError):
            return None
        finally:
            self._dirtied(addr, done)
        self.stats["file_bytes_read"] += done
        return done

    def _dirtied(self, addr: int, length: int) -> None:
        """Tell dirty-page trackers (snapshots, incremental checkpoints) about bytes written
        into guest RAM through a view, which KVM's dirty log does not see."""
        mem = self.ctx.memory
        if length > 0 and mem.contains(addr, length):
            mem.mark_dirty(addr, length)

    def _write_file(self, addr: int, length: int, offset: int, name_addr: int) -> int | None:
        src = self._guest_range(addr, length)
        path = self._host_path(name_addr, write=True)
        if src is None or path is None:
            return None
        try:
            fd = _open_regular(path, os.O_WRONLY | os.O_CREAT | (0 if offset else os.O_TRUNC))
            try:
                done = 0
                while done < length:
                    done += os.pwritev(fd, [src[done:]], offset + done)
            finally:
                os.close(fd)
        except (OSError, OverflowError, ValueError):
            return None
        self.stats["file_bytes_written"] += length
        return length

    # --- state -------------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        return {"args": list(self.args), "result": self.result,
                "buffer": self.buffer.hex(), "work": dict(self.work)}

    def restore(self, state: dict[str, Any]) -> None:
        s = SavedState(self.name, state)
        args = s.integers("args", 0, MASK64, NUM_ARGS)
        result = s.integer("result", 0, MASK64)
        buf = s.raw("buffer", BUF_SIZE)
        work = {}
        for k, v in s.mapping("work", MAX_WORK_ITEMS):
            if type(v) is not int or v < 0:
                raise CheckpointError(f"{self.name}: saved work item {k!r} has no valid begin "
                                      "tick (a corrupt or foreign checkpoint)")
            work[str(k)] = v
        self.args = args + [0] * (NUM_ARGS - len(args))
        self.result = result
        self.buffer = bytearray(buf)
        self.work = work

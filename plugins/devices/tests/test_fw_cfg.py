"""fw_cfg: well-known items, file directory, user blobs, DMA with checked addresses."""

from __future__ import annotations

import json
import os
import resource
import struct
from pathlib import Path

import pytest
from conftest import RAM_SIZE, Harness, make_harness
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from kvmfw.errors import CheckpointError, ConfigError

from kvmfw_devices import fw_cfg as f
from kvmfw_devices.fw_cfg import FwCfg, parse_blob_spec


def select(dev: FwCfg, key: int) -> None:
    dev.write(0, key.to_bytes(2, "little"))


def read_item(dev: FwCfg, key: int, n: int) -> bytes:
    select(dev, key)
    return b"".join(dev.read(1, 1) for _ in range(n))


def directory(dev: FwCfg) -> dict[str, tuple[int, int]]:
    select(dev, f.FW_CFG_FILE_DIR)
    count = struct.unpack(">I", b"".join(dev.read(1, 1) for _ in range(4)))[0]
    out = {}
    for _ in range(count):
        raw = b"".join(dev.read(1, 1) for _ in range(64))
        size, sel, _, name = struct.unpack(">IHH56s", raw)
        out[name.rstrip(b"\0").decode()] = (size, sel)
    return out


def test_ports_and_well_known_items(h: Harness) -> None:
    dev = FwCfg(h.ctx)
    (r,) = dev.ranges()
    assert (r.space, r.base, r.size) == ("pio", 0x510, 12)
    assert read_item(dev, f.FW_CFG_SIGNATURE, 4) == b"QEMU"
    assert read_item(dev, f.FW_CFG_ID, 4) == struct.pack("<I", 3)
    assert read_item(dev, f.FW_CFG_RAM_SIZE, 8) == struct.pack("<Q", RAM_SIZE)
    assert read_item(dev, f.FW_CFG_NB_CPUS, 2) == struct.pack("<H", 2)
    assert read_item(dev, f.FW_CFG_UUID, 16) == bytes(16)


def test_reads_past_the_end_and_unknown_items_are_zero(h: Harness) -> None:
    dev = FwCfg(h.ctx)
    assert read_item(dev, f.FW_CFG_SIGNATURE, 6) == b"QEMU\0\0"
    assert read_item(dev, 0x1234, 2) == b"\0\0"


def test_selecting_resets_the_offset(h: Harness) -> None:
    dev = FwCfg(h.ctx)
    assert read_item(dev, f.FW_CFG_SIGNATURE, 2) == b"QE"
    assert read_item(dev, f.FW_CFG_SIGNATURE, 2) == b"QE"


def test_user_blobs_in_the_directory(h: Harness, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"payload")
    h.ctx.options["fw_cfg"] = ["name=opt/b,string=hi"]
    dev = FwCfg(h.ctx, name="opt/a", file=str(blob))
    d = directory(dev)
    assert list(d) == ["opt/a", "opt/b"]
    size, sel = d["opt/a"]
    assert size == 7 and read_item(dev, sel, 7) == b"payload"
    assert read_item(dev, d["opt/b"][1], 2) == b"hi"


def test_empty_directory(h: Harness) -> None:
    assert directory(FwCfg(h.ctx)) == {}


@pytest.mark.parametrize("params", [
    {"name": "opt/x"}, {"file": "/nonexistent"}, {"name": "opt/x", "file": "/nonexistent"},
    {"name": "x" * 60, "string": "a"},
])
def test_bad_blob_config(h: Harness, params: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        FwCfg(h.ctx, **params)


def test_data_writes_ignored_and_bad_accesses_counted(h: Harness) -> None:
    dev = FwCfg(h.ctx)
    select(dev, f.FW_CFG_SIGNATURE)
    dev.write(1, b"X")
    assert dev.stats["ignored_writes"] == 1
    assert dev.read(1, 1) == b"Q"
    assert dev.read(2, 1) == b"\xff"
    assert dev.read(0, 2) == b"\xff\xff"
    dev.write(2, b"\0")
    assert dev.stats["bad_accesses"] == 3


def dma(dev: FwCfg, h: Harness, desc: int, control: int, length: int, addr: int) -> int:
    h.ctx.memory.write(desc, struct.pack(">IIQ", control, length, addr))
    dev.write(4, (desc >> 32).to_bytes(4, "big"))
    dev.write(8, (desc & 0xFFFFFFFF).to_bytes(4, "big"))
    return struct.unpack(">I", h.ctx.memory.read(desc, 4))[0]


def test_dma_signature_and_read(h: Harness) -> None:
    dev = FwCfg(h.ctx)
    assert dev.read(4, 4) + dev.read(8, 4) == b"QEMU CFG"
    ctl = dma(dev, h, 0x1000, (f.FW_CFG_SIGNATURE << 16) | f.DMA_CTL_SELECT | f.DMA_CTL_READ,
              4, 0x2000)
    assert ctl == 0
    assert h.ctx.memory.read(0x2000, 4) == b"QEMU"


def test_dma_skip_then_read(h: Harness) -> None:
    dev = FwCfg(h.ctx)
    dma(dev, h, 0x1000, (f.FW_CFG_SIGNATURE << 16) | f.DMA_CTL_SELECT | f.DMA_CTL_SKIP, 2, 0)
    assert dma(dev, h, 0x1000, f.DMA_CTL_READ, 2, 0x2000) == 0
    assert h.ctx.memory.read(0x2000, 2) == b"MU"


def test_dma_outside_ram_reports_error_and_touches_nothing(h: Harness) -> None:
    dev = FwCfg(h.ctx)
    ctl = dma(dev, h, 0x1000, (f.FW_CFG_SIGNATURE << 16) | f.DMA_CTL_SELECT | f.DMA_CTL_READ,
              16, RAM_SIZE - 8)
    assert ctl == f.DMA_CTL_ERROR
    assert dma(dev, h, 0x1000, f.DMA_CTL_WRITE, 1, 0x2000) == f.DMA_CTL_ERROR
    dev.write(8, (0xFFFFF000).to_bytes(4, "big"))  # descriptor itself outside RAM
    assert dev.stats["dma_errors"] == 3


def test_dma_can_be_disabled(h: Harness) -> None:
    dev = FwCfg(h.ctx, dma="off")
    assert read_item(dev, f.FW_CFG_ID, 4) == struct.pack("<I", 1)
    assert dev.read(4, 4) == b"\xff" * 4


def test_mmio_layout(h: Harness) -> None:
    dev = FwCfg(h.ctx, space="mmio", port="0x9020000")
    (r,) = dev.ranges()
    assert (r.space, r.base, r.size) == ("mmio", 0x9020000, 0x18)
    dev.write(8, f.FW_CFG_SIGNATURE.to_bytes(2, "big"))
    assert dev.read(0, 4) == b"QEMU"
    assert dev.read(0x10, 8) == b"QEMU CFG"


# --- issue 10: the guest's DMA length never sizes a host buffer -----------------------------

def test_dma_skip_of_4_gib_allocates_nothing(h: Harness) -> None:
    """SKIP used to build a bytes object of the guest's length (up to 4 GiB per operation)."""
    dev = FwCfg(h.ctx)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(4):
        ctl = dma(dev, h, 0x1000, (f.FW_CFG_SIGNATURE << 16) | f.DMA_CTL_SELECT | f.DMA_CTL_SKIP,
                  0xFFFFFFFF, 0)
        assert ctl == 0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 << 10  # KiB
    assert dev.offset == 4  # clamped to the item
    assert dma(dev, h, 0x1000, f.DMA_CTL_READ, 2, 0x2000) == 0
    assert h.ctx.memory.read(0x2000, 2) == b"\0\0"


def test_dma_read_past_the_item_zero_fills_in_place(h: Harness) -> None:
    dev = FwCfg(h.ctx)
    h.ctx.memory.write(0x2000, b"\xee" * 0x3000)
    ctl = dma(dev, h, 0x1000, (f.FW_CFG_SIGNATURE << 16) | f.DMA_CTL_SELECT | f.DMA_CTL_READ,
              0x2800, 0x2000)
    assert ctl == 0
    assert h.ctx.memory.read(0x2000, 0x3000) == b"QEMU" + bytes(0x27FC) + b"\xee" * 0x800


def test_dma_read_wins_over_write_as_in_qemu(h: Harness) -> None:
    dev = FwCfg(h.ctx)
    ctl = dma(dev, h, 0x1000, (f.FW_CFG_SIGNATURE << 16) | f.DMA_CTL_SELECT | f.DMA_CTL_READ
              | f.DMA_CTL_WRITE, 4, 0x2000)
    assert ctl == 0 and h.ctx.memory.read(0x2000, 4) == b"QEMU"


@pytest.mark.parametrize("state", [{"selector": "x", "offset": 0, "dma_high": 0},
                                   {"selector": 0}, {"selector": None, "offset": 0,
                                                     "dma_high": 0}])
def test_restore_refuses_bad_state(h: Harness, state: dict) -> None:
    with pytest.raises(CheckpointError):
        FwCfg(h.ctx).restore(state)


def test_restore_bounds_the_offset(h: Harness) -> None:
    dev = FwCfg(h.ctx)
    dev.restore({"selector": 0, "offset": 1 << 80, "dma_high": -1})
    assert dev.offset == f.MAX_OFFSET and dev.dma_high == 0xFFFFFFFF
    assert dev.read(1, 1) == b"\0"


def test_mmio_layout_is_described_to_firmware(h: Harness) -> None:
    (node,) = FwCfg(h.ctx, space="mmio", port="0x9020000").firmware()
    assert (node.kind, node.base, node.size, node.compatible) == (
        "fw-cfg", 0x9020000, 0x18, ("qemu,fw-cfg-mmio",))
    assert FwCfg(h.ctx).firmware() == []


# --- stateful: selector, data and DMA over the whole register range -------------------------

FUZZ_EXAMPLES = int(os.environ.get("KVMFW_FUZZ_EXAMPLES", "60"))
FW_RUNS = {"cases": 0, "steps": 0}
dma_addr = st.one_of(st.integers(0, RAM_SIZE), st.integers(RAM_SIZE - 32, RAM_SIZE + 32),
                     st.integers(0, 2**64 - 1), st.sampled_from([0x1000, 0x2000, 0x3000]))
dma_len = st.one_of(st.integers(0, 256), st.sampled_from([RAM_SIZE, 2**32 - 1, 0x800000]),
                    st.integers(0, 2**32 - 1))


class FwCfgMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        FW_RUNS["cases"] += 1
        self.h = make_harness()
        self.mem = self.h.ctx.memory
        self.mem.write(0, bytes(range(256)) * (RAM_SIZE // 256))
        self.dev: FwCfg | None = None

    @initialize(space=st.sampled_from(["pio", "mmio"]), dma_on=st.booleans(),
                blob=st.binary(max_size=5000))
    def start(self, space: str, dma_on: bool, blob: bytes) -> None:
        self.dev = FwCfg(self.h.ctx, space=space, port="0x510" if space == "pio" else
                         "0x9020000", dma=str(dma_on), name="opt/fuzz",
                         string=blob.hex() or "x")

    def check(self, action, allowed: list[tuple[int, int]]) -> None:  # type: ignore[no-untyped-def]
        before = bytes(self.mem.view(0, RAM_SIZE))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        action()
        FW_RUNS["steps"] += 1
        after = bytes(self.mem.view(0, RAM_SIZE))
        if before != after:
            for base in range(0, RAM_SIZE, 4096):
                a, b = before[base:base + 4096], after[base:base + 4096]
                if a == b or any(lo <= base and base + 4096 <= hi for lo, hi in allowed):
                    continue
                for i in (base + j for j in range(4096) if a[j] != b[j]):
                    assert any(lo <= i < hi for lo, hi in allowed), f"wrote {i:#x}"
        # a DMA may write at most its own length: no host buffer of the guest's size
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 32 << 10

    @rule(offset=st.integers(0, 0x20), size=st.sampled_from([1, 2, 3, 4, 8]),
          value=st.integers(0, 2**64 - 1))
    def register_write(self, offset: int, size: int, value: int) -> None:
        assert self.dev is not None
        data = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        # the DMA register's low half (or the whole 8-byte register) starts a transfer whose
        # descriptor is wherever the address says: allow what that descriptor allows
        self.check(lambda: self.dev.write(offset, data),  # type: ignore[union-attr]
                   self._dma_allowed(offset, data))

    def _dma_allowed(self, offset: int, data: bytes) -> list[tuple[int, int]]:
        assert self.dev is not None
        pio = self.dev.params["space"] == "pio"
        dma = f.PIO_DMA if pio else f.MMIO_DMA
        if offset == dma + 4 and len(data) == 4:
            desc = (self.dev.dma_high << 32) | int.from_bytes(data, "big")
        elif offset == dma and len(data) == 8:
            desc = int.from_bytes(data, "big")
        else:
            return []
        if not self.mem.contains(desc, 16):
            return []
        control, length, addr = struct.unpack(">IIQ", self.mem.read(desc, 16))
        return [(desc, desc + 4)] + ([(addr, addr + length)] if control & f.DMA_CTL_READ
                                     else [])

    @rule(offset=st.integers(0, 0x20), size=st.sampled_from([1, 2, 4, 8]))
    def register_read(self, offset: int, size: int) -> None:
        assert self.dev is not None
        out: list[bytes] = []
        self.check(lambda: out.append(self.dev.read(offset, size)), [])  # type: ignore
        assert len(out[0]) == size

    @rule(desc=dma_addr, control=st.one_of(st.integers(0, 0x1F), st.integers(0, 2**32 - 1)),
          key=st.sampled_from([0, 1, 2, 3, 5, 0x19, 0x20, 0x21, 0x4000, 0x8000, 0xFFFF]),
          length=dma_len, addr=dma_addr, split=st.booleans())
    def dma(self, desc: int, control: int, key: int, length: int, addr: int,
            split: bool) -> None:
        dev = self.dev
        assert dev is not None
        if control & f.DMA_CTL_SELECT:
            control = (control & 0xFFFF) | (key << 16)
        if self.mem.contains(desc, 16):
            self.mem.write(desc, struct.pack(">IIQ", control, length, addr & (2**64 - 1)))
        pio = dev.params["space"] == "pio"
        base = f.PIO_DMA if pio else f.MMIO_DMA
        allowed = self._dma_allowed(base, desc.to_bytes(8, "big"))

        def act() -> None:
            assert dev is not None
            if split or pio:
                dev.write(base, (desc >> 32).to_bytes(4, "big"))
                dev.write(base + 4, (desc & 0xFFFFFFFF).to_bytes(4, "big"))
            else:
                dev.write(base, desc.to_bytes(8, "big"))
        self.check(act, allowed)

    @invariant()
    def saves_and_restores(self) -> None:
        if self.dev is None:
            return
        state = self.dev.save()
        assert json.loads(json.dumps(state)) == state
        other = FwCfg(self.h.ctx, space=self.dev.params["space"])
        other.restore(json.loads(json.dumps(state)))
        assert other.save() == state

    def teardown(self) -> None:
        self.mem.close()


FwCfgMachine.TestCase.settings = settings(
    max_examples=FUZZ_EXAMPLES, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestFwCfgStateful = FwCfgMachine.TestCase


def test_report_fuzz_counts() -> None:
    """Not a check: prints how many cases and steps the state machine ran (pytest -s)."""
    print(f"\nfw_cfg stateful: {FW_RUNS['cases']} cases, {FW_RUNS['steps']} steps")


def test_blob_from_an_endless_file_is_refused(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(f, "MAX_BLOB", 1 << 16)
    with pytest.raises(ConfigError, match="larger than"):
        FwCfg(h.ctx, name="opt/zero", file="/dev/zero")


def test_fw_cfg_blob_spec_takes_quoted_values() -> None:
    assert parse_blob_spec('name=opt/x,string="one,two"') == ("opt/x", b"one,two")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_blob_spec("name=opt/x,string=one,two")

"""Rule-based fuzzing of the bus (issue 10): registrations, removals and accesses of every size
at every address, checked against a model.

Properties: a device only ever sees an access that lies wholly inside one of its ranges, at
its offset; every other access is unclaimed (all ones, counted, or
:class:`UnclaimedAccessError` under ``fatal``); overlaps are refused with
:class:`BusOverlapError` and leave the bus unchanged; whatever a device does wrong (raises,
answers the wrong length or type) reaches the caller as a typed :class:`DeviceError`, a
device's own typed error keeps its class; the lookup cache stays bounded and never answers
for a range that was removed.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from kvmfw.bus import AddressSpace, Bus
from kvmfw.errors import (
    BusError,
    BusOverlapError,
    DeviceError,
    GuestCrashError,
    KvmfwError,
    UnclaimedAccessError,
)

SPACES = {"pio": 1 << 16, "mmio": 1 << 64}
SIZES = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 16])


class Dev:
    """A device that records what it sees; ``mode`` makes it misbehave on purpose."""

    def __init__(self, name: str, mode: str) -> None:
        self.name, self.mode = name, mode
        self.seen: list[tuple[str, int, int]] = []

    def read(self, offset: int, size: int) -> Any:
        self.seen.append(("r", offset, size))
        if self.mode == "raises":
            raise ValueError("device bug")
        if self.mode == "typed":
            raise GuestCrashError("the guest asked for this")
        if self.mode == "short":
            return bytes(size + 1)  # the wrong length (one too many, so size 0 is wrong too)
        if self.mode == "none":
            return None
        if self.mode == "list":
            return [0] * size
        return bytes((offset + i) & 0xFF for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        self.seen.append(("w", offset, len(data)))
        if self.mode == "raises":
            raise KeyError("device bug")
        if self.mode == "typed":
            raise GuestCrashError("the guest asked for this")


def addresses(space: str) -> st.SearchStrategy[int]:
    limit = SPACES[space]
    return st.one_of(st.integers(0, 0x200), st.integers(0, limit - 1),
                     st.sampled_from([limit - 1, limit - 8, limit, 0]),
                     st.integers(-8, -1))


class BusMachine(RuleBasedStateMachine):
    mappings = Bundle("mappings")

    def __init__(self) -> None:
        super().__init__()
        self.bus = Bus(unclaimed="ignore")
        self.model: dict[str, list[tuple[int, int, Dev]]] = {"pio": [], "mmio": []}
        self.count = 0

    def _owner(self, space: str, addr: int, size: int) -> tuple[int, int, Dev] | None:
        for base, length, dev in self.model[space]:
            if base <= addr < base + length:
                return (base, length, dev) if addr + size <= base + length else None
        return None

    @rule(target=mappings, space=st.sampled_from(sorted(SPACES)), data=st.data(),
          size=st.one_of(st.integers(-2, 0x40), st.sampled_from([1, 0x1000, 1 << 20])),
          mode=st.sampled_from(["good"] * 6 + ["raises", "typed", "short", "none", "list"]))
    def register(self, space: str, data: st.DataObject, size: int, mode: str) -> Any:
        base = data.draw(addresses(space), label="base")
        self.count += 1
        dev = Dev(f"d{self.count}", mode)
        overlap = any(base < b + n and b < base + size for b, n, _ in self.model[space])
        bad = size <= 0 or base < 0 or base + size > SPACES[space]
        before = self.bus.space(space).mappings()
        try:
            self.bus.space(space).register(base, size, dev, dev.name)
        except BusOverlapError:
            assert overlap and not bad
            assert self.bus.space(space).mappings() == before
            return None
        except BusError:
            assert bad
            assert self.bus.space(space).mappings() == before
            return None
        assert not bad and not overlap, (base, size)
        self.model[space].append((base, size, dev))
        return (space, base, dev)

    @rule(m=consumes(mappings), by_base=st.booleans())
    def unregister(self, m: Any, by_base: bool) -> None:
        if m is None:
            return
        space, base, dev = m
        self.bus.space(space).unregister(base if by_base else dev)
        self.model[space] = [e for e in self.model[space] if e[2] is not dev]

    @rule(space=st.sampled_from(sorted(SPACES)), data=st.data(), size=SIZES,
          is_write=st.booleans(), fatal=st.booleans())
    def access(self, space: str, data: st.DataObject, size: int, is_write: bool,
               fatal: bool) -> None:
        aspace = self.bus.space(space)
        addr = data.draw(st.one_of(self._inside(space), self._inside(space), self._near(space),
                                   addresses(space)), label="addr")
        self.bus.unclaimed = "fatal" if fatal else "ignore"
        owner = self._owner(space, addr, size)
        seen_before = len(owner[2].seen) if owner else 0
        counts = (aspace.unclaimed_reads, aspace.unclaimed_writes)
        try:
            if is_write:
                aspace.write(addr, bytes(size))
                got = None
            else:
                got = aspace.read(addr, size)
        except UnclaimedAccessError:
            assert owner is None and fatal
            return
        except DeviceError as exc:
            assert owner is not None and owner[2].mode not in ("good", "typed"), exc
            return
        except GuestCrashError:
            assert owner is not None and owner[2].mode == "typed"
            return
        except KvmfwError as exc:
            raise AssertionError(f"unexpected {exc!r}") from exc
        if owner is None:
            assert not fatal
            assert (aspace.unclaimed_reads, aspace.unclaimed_writes) == (
                counts[0] + (not is_write), counts[1] + is_write)
            assert got is None or got == b"\xff" * size
            return
        base, _, dev = owner
        assert dev.mode == "good" or (is_write and dev.mode in ("short", "none", "list"))
        assert dev.seen[seen_before:] == [("w" if is_write else "r", addr - base, size)]
        if got is not None:
            assert got == bytes((addr - base + i) & 0xFF for i in range(size))

    def _inside(self, space: str) -> st.SearchStrategy[int]:
        entries = self.model[space]
        if not entries:
            return st.just(0)
        return st.sampled_from(entries).flatmap(
            lambda e: st.integers(e[0], e[0] + min(e[1], 0x100) - 1))

    def _near(self, space: str) -> st.SearchStrategy[int]:
        edges = [e for b, n, _ in self.model[space] for e in (b - 1, b, b + n - 1, b + n)]
        return st.sampled_from(edges) if edges else st.just(0)

    @rule(space=st.sampled_from(sorted(SPACES)), start=st.integers(0, 1 << 15),
          n=st.integers(1, 6000))
    def scan(self, space: str, start: int, n: int) -> None:
        """Many distinct addresses (a guest scanning): the lookup cache must stay bounded."""
        aspace = self.bus.space(space)
        self.bus.unclaimed = "ignore"
        for addr in range(start, start + n, 7):
            aspace.lookup(addr)

    @invariant()
    def model_matches(self) -> None:
        for space, entries in self.model.items():
            aspace: AddressSpace = self.bus.space(space)
            maps = aspace.mappings()
            assert sorted((m.base, m.size) for m in maps) == sorted((b, n) for b, n, _ in entries)
            assert [m.base for m in maps] == sorted(m.base for m in maps)
            for a, b in zip(maps, maps[1:], strict=False):
                assert a.end <= b.base
            assert len(aspace._cache) <= AddressSpace._CACHE_LIMIT
            for addr, hit in aspace._cache.items():  # (device, base, end, mapping)
                assert hit is None or (hit[3] in maps and hit[:3] == (hit[3].device,
                                       hit[3].base, hit[3].end)), f"stale cache entry for {addr:#x}"
            for _, length, dev in entries:
                assert all(0 <= off and off + size <= length for _, off, size in dev.seen)


TestBus = BusMachine.TestCase
TestBus.settings = settings(max_examples=int(os.environ.get("KVMFW_FUZZ_EXAMPLES", "150")),
                            stateful_step_count=40, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])


def test_a_read_answered_with_none_is_a_device_error() -> None:
    """Old: ``len(None)`` raised a bare TypeError out of the bus (an "internal error")."""
    import pytest

    space = AddressSpace("pio")
    space.register(0x10, 4, Dev("none", "none"), "none")
    space.register(0x20, 4, Dev("list", "list"), "list")
    with pytest.raises(DeviceError, match="none"):
        space.read(0x10, 1)
    with pytest.raises(DeviceError, match="list"):
        space.read(0x20, 2)


def test_a_devices_typed_error_keeps_its_class() -> None:
    """A device ending the run with a typed error (a guest crash, status 5) was re-labelled
    a device bug (DeviceError, status 6)."""
    import pytest

    space = AddressSpace("mmio")
    space.register(0x1000, 8, Dev("crash", "typed"), "crash")
    with pytest.raises(GuestCrashError):
        space.read(0x1000, 4)
    with pytest.raises(GuestCrashError):
        space.write(0x1000, b"\x01")

"""kvmfw.cache: files derived from a guest image, made once, keyed by the source's stat."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmfw import cache


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("KVMFW_CACHE", str(d))
    return d


def _maker(calls: list[bytes], out: bytes | None):  # type: ignore[no-untyped-def]
    def make() -> bytes | None:
        calls.append(b"")
        return out
    return make


def test_made_once_then_mapped(base: Path, tmp_path: Path) -> None:
    src = tmp_path / "k"
    src.write_bytes(b"source")
    calls: list[bytes] = []
    assert cache.derived(str(src), "t", "v1", _maker(calls, b"derived")) == b"derived"
    hit = cache.derived(str(src), "t", "v1", _maker(calls, b"other"))
    assert bytes(hit[:]) == b"derived" and len(calls) == 1
    hit.close()
    assert [p.name.startswith(".") for p in (base / "t").iterdir()] == [False]


def test_a_changed_source_or_tag_is_a_new_entry(base: Path, tmp_path: Path) -> None:
    src = tmp_path / "k"
    src.write_bytes(b"one")
    calls: list[bytes] = []
    cache.derived(str(src), "t", "v1", _maker(calls, b"1"))
    src.write_bytes(b"two")  # rewritten in place: size, times and change time move
    os.utime(src, ns=(1, 1))  # even with the old modification time forced back
    assert cache.derived(str(src), "t", "v1", _maker(calls, b"2")) == b"2"
    assert cache.derived(str(src), "t", "v2", _maker(calls, b"3")) == b"3"
    assert len(calls) == 3


def test_nothing_derived_is_not_cached(base: Path, tmp_path: Path) -> None:
    src = tmp_path / "k"
    src.write_bytes(b"x")
    calls: list[bytes] = []
    assert cache.derived(str(src), "t", "v1", _maker(calls, None)) is None
    assert cache.derived(str(src), "t", "v1", _maker(calls, None)) is None
    assert len(calls) == 2


def test_off_and_unwritable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "k"
    src.write_bytes(b"x")
    monkeypatch.setenv("KVMFW_CACHE", "off")
    assert cache.base_dir() is None
    assert cache.derived(str(src), "t", "v1", lambda: b"d") == b"d"
    blocked = tmp_path / "file"  # a file where the cache directory should be
    blocked.write_bytes(b"")
    monkeypatch.setenv("KVMFW_CACHE", str(blocked))
    assert cache.derived(str(src), "t", "v1", lambda: b"d") == b"d"
    assert cache.derived(str(tmp_path / "missing"), "t", "v1", lambda: b"m") == b"m"


def test_old_entries_and_stale_temporaries_are_evicted(base: Path, tmp_path: Path) -> None:
    (base / "t").mkdir(parents=True)
    stale = base / "t" / ".tmp-dead"
    stale.write_bytes(b"half")
    os.utime(stale, (0, 0))
    fresh = base / "t" / ".tmp-live"  # another writer's, still being written
    fresh.write_bytes(b"")
    for i in range(cache.MAX_ENTRIES + 3):
        src = tmp_path / f"k{i}"
        src.write_bytes(b"%d" % i)
        cache.derived(str(src), "t", "v1", lambda: b"d")
    names = sorted(p.name for p in (base / "t").iterdir())
    assert ".tmp-dead" not in names and ".tmp-live" in names
    assert len(names) == cache.MAX_ENTRIES + 1

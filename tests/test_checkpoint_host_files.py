"""Host files behind devices (a disk image) in checkpoints: named with their size and
modification time, and a restore refuses one that changed since, unless trusted; and the
files a device writes into a checkpoint (a disk's overlay), verified and read back.

A real guest on /dev/kvm (the test arch of ckpt_arch.py) with a device that names a host
file, as virtio-blk names its image; virtio-blk itself: ``plugins/devices/tests/
test_fork_policy.py`` (its files), ``plugins/x86/tests/test_fork_virtio.py`` and
``test_checkpoint_cli.py`` (real guests, the CLI)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ckpt_arch import CkptArch, build, setup  # noqa: E402

from kvmfw.checkpoint.reader import load_manifest  # noqa: E402
from kvmfw.device import ConfigKey, Device  # noqa: E402
from kvmfw.errors import CheckpointError  # noqa: E402


class Backed(Device):
    """A device whose guest-visible contents live in a host file (as a disk's), and whose
    ``blob`` (as a disk's overlay) goes into checkpoints as files of its own."""

    name = "backed"
    config = {"file": ConfigKey(str, "", "the host file")}
    blob = b""
    names = ("blob.bin",)
    loaded: list[bytes] = []

    def host_files(self) -> list[str]:
        return [os.path.abspath(self.params["file"])]

    def save_files(self, directory: str) -> None:
        for n in self.names if self.blob else ():
            Path(directory, n).write_bytes(self.blob)

    def load_files(self, directory: str) -> None:
        Backed.loaded.append(Path(directory, "blob.bin").read_bytes())


def checkpoint(tmp_path: Path, image: Path | str, blob: bytes = b"",
               names: tuple[str, ...] = ("blob.bin",)) -> Path:
    rig = build()
    with rig.machine as m:
        d = Backed(m.device_context(), file=str(image))
        d.blob, d.names = blob, names
        m.add_device(d)
        m.run(max_ticks=10**9, timeout=60)
        return m.checkpoint(tmp_path / "cpt")


def do_restore(ckpt: Path, image: Path | str, **kw: Any) -> None:
    """Restore, adding the code-added devices again (the test arch's, then ours)."""
    from kvmfw.machine import Machine

    def again(m: Any) -> None:
        setup(m)
        m.add_device(Backed(m.device_context(), file=str(image)))

    Machine.restore(ckpt, arch_plugin=CkptArch(), setup=again, **kw).close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(4096))
    return p


def test_the_manifest_names_the_file_with_its_size_and_time(tmp_path: Path,
                                                             image: Path) -> None:
    ckpt = checkpoint(tmp_path, image)
    st = image.stat()
    assert load_manifest(ckpt).data["host_files"] == [
        {"device": "1:backed", "path": str(image), "size": 4096, "mtime_ns": st.st_mtime_ns}]


def test_an_unchanged_file_restores_twice(tmp_path: Path, image: Path) -> None:
    ckpt = checkpoint(tmp_path, image)
    do_restore(ckpt, image)
    do_restore(ckpt, image)


def test_a_written_file_is_refused_then_trusted(tmp_path: Path, image: Path) -> None:
    ckpt = checkpoint(tmp_path, image)
    saved = tmp_path / "disk.saved"
    saved.write_bytes(image.read_bytes())
    os.utime(saved, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns))  # as cp -p
    with image.open("r+b") as f:  # a later run wrote to the disk
        f.write(b"x")
    os.utime(image, ns=(0, image.stat().st_mtime_ns + 10**9))
    with pytest.raises(CheckpointError, match=r"host_files'\[0\]: 1:backed's .*disk\.img "
                       r"changed since the checkpoint .*--trust-host-files"):
        do_restore(ckpt, image)
    do_restore(ckpt, image, trust_host_files=True)
    os.replace(saved, image)  # the copy made with the checkpoint, put back
    do_restore(ckpt, image)


def test_a_grown_or_missing_file_is_refused(tmp_path: Path, image: Path) -> None:
    ckpt = checkpoint(tmp_path, image)
    mtime = image.stat().st_mtime_ns
    with image.open("ab") as f:
        f.write(bytes(512))
    os.utime(image, ns=(0, mtime))  # the same time: the size tells
    with pytest.raises(CheckpointError, match=r"size 4096 -> 4608 bytes"):
        do_restore(ckpt, image)
    image.unlink()
    with pytest.raises(CheckpointError, match=r"disk\.img: No such file"):
        do_restore(ckpt, image)


def test_the_same_name_elsewhere_is_refused(tmp_path: Path, image: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = checkpoint(tmp_path, "disk.img")  # a relative path, as a command line gives it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "disk.img").write_bytes(image.read_bytes())
    monkeypatch.chdir(elsewhere)
    with pytest.raises(CheckpointError, match=r"the rebuilt devices read other host files "
                       r"\(1:backed: .*elsewhere/disk\.img\)"):
        do_restore(ckpt, "disk.img")
    monkeypatch.chdir(tmp_path)
    do_restore(ckpt, "disk.img")


@pytest.mark.parametrize("value, why", [
    ("nope", "must list at most"),
    ([1], r"host_files'\[0\]: not a mapping"),
    ([{"device": "1:backed", "path": "/x", "size": -1, "mtime_ns": 0}], r"\.size"),
    ([{"device": "1:backed", "path": "/x", "size": 0}], r"\.mtime_ns"),
    ([{"device": "1:backed", "path": "/x", "size": 0, "mtime_ns": 0}] * 1025,
     "must list at most 1024"),
])
def test_a_hostile_field_is_refused_before_anything_is_built(
        tmp_path: Path, image: Path, value: Any, why: str) -> None:
    ckpt = checkpoint(tmp_path, image)
    man = ckpt / "manifest.json"
    data = json.loads(man.read_text())
    data["host_files"] = value
    man.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=why):
        load_manifest(ckpt)


def test_a_devices_files_are_listed_verified_and_read_back(tmp_path: Path,
                                                            image: Path) -> None:
    ckpt = checkpoint(tmp_path, image, blob=b"overlay" * 1000)
    files = load_manifest(ckpt).data["files"]
    assert files["dev/1/blob.bin"]["size"] == 7000
    assert not (ckpt / "dev" / "0").exists()  # the ticker wrote none: no directory
    Backed.loaded.clear()
    do_restore(ckpt, image)
    assert Backed.loaded == [b"overlay" * 1000]
    (ckpt / "dev/1/blob.bin").write_bytes(b"x" * 7000)  # changed after it was written
    with pytest.raises(CheckpointError, match=r"dev/1/blob\.bin: checksum mismatch"):
        do_restore(ckpt, image)


def test_a_file_the_manifest_does_not_name_is_refused(tmp_path: Path, image: Path) -> None:
    ckpt = checkpoint(tmp_path, image, blob=b"b")
    (ckpt / "dev/1/extra").write_bytes(b"?")
    with pytest.raises(CheckpointError, match=r"dev/1: holds blob\.bin, extra, the manifest "
                       r"names blob\.bin"):
        do_restore(ckpt, image)


def test_a_device_writing_badly_named_files_fails_the_checkpoint_cleanly(
        tmp_path: Path, image: Path) -> None:
    with pytest.raises(CheckpointError, match=r"wrote Bad into the checkpoint"):
        checkpoint(tmp_path, image, blob=b"b", names=("Bad",))
    assert not (tmp_path / "cpt").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".cpt")] == []


@pytest.mark.parametrize("rel", ["dev/9/blob.bin", "dev/1/../../x", "dev/1/Bad"])
def test_a_manifest_naming_a_device_file_outside_the_rules_is_refused(
        tmp_path: Path, image: Path, rel: str) -> None:
    ckpt = checkpoint(tmp_path, image, blob=b"b")
    man = ckpt / "manifest.json"
    data = json.loads(man.read_text())
    data["files"][rel] = data["files"].pop("dev/1/blob.bin")
    man.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="names a file"):
        load_manifest(ckpt)


def test_a_format_1_0_checkpoint_without_host_files_restores(tmp_path: Path,
                                                             image: Path) -> None:
    """Checkpoints written before host files were recorded name none: nothing to compare."""
    ckpt = checkpoint(tmp_path, image)
    man = ckpt / "manifest.json"
    data = json.loads(man.read_text())
    del data["host_files"]
    data["version"] = "1.0"
    man.write_text(json.dumps(data))
    do_restore(ckpt, image)

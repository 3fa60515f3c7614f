"""kvmfw/config.py: every run key and machine value checked before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvmtest import PIO, needs_kvm
from realmode_arch import RealModeArch

from kvmfw.config import (
    Source,
    check_arch_host,
    check_run_config,
    host_ram,
    host_status,
    parse_options,
    parse_size,
)
from kvmfw.errors import ConfigError
from kvmfw.kvm import Kvm
from kvmfw.machine import Machine, MachineConfig

MiB = 1 << 20


def run_cfg(raw: dict, config: Path | None = None) -> dict:
    """Check ``raw`` as if every key came from the TOML file ``config`` (or the CLI)."""
    src = Source(str(config) if config else None)
    return check_run_config(raw, set(raw) if config else set(), src)


# --- sizes and statuses ---------------------------------------------------------------------

def test_a_bare_memory_number_is_mib_as_in_qemu() -> None:
    assert parse_size(64) == 64 * MiB  # TOML memory = 64 (was 64 bytes)
    assert parse_size("64") == 64 * MiB
    assert parse_size("4096B") == 4096
    with pytest.raises(ConfigError, match="must be a size"):
        parse_size(True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="negative"):
        parse_size(-1)


@pytest.mark.parametrize(("status", "code"), [
    (0, 0), (1, 1), (255, 255), (257, 1), (513, 1), (0x1FF, 0xFF),
    (256, 1), (512, 1), (1 << 40, 1), (-1, 255), (-256, 1)])
def test_host_status_keeps_the_low_8_bits_but_never_turns_failure_into_0(
        status: int, code: int) -> None:
    assert host_status(status) == code


# --- the run keys (CLI and TOML) ------------------------------------------------------------

def test_toml_types_are_checked_one_line_each(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    with pytest.raises(ConfigError, match=r"timeout in .*run.toml must be a number of seconds"):
        run_cfg({"timeout": "ten"}, cfg)
    with pytest.raises(ConfigError, match="cpus in .* must be a whole number"):
        run_cfg({"cpus": True}, cfg)
    with pytest.raises(ConfigError, match="always_sync in .* must be true or false"):
        run_cfg({"always_sync": "yes"}, cfg)
    with pytest.raises(ConfigError, match="device in .* must be a string or a list"):
        run_cfg({"device": [1, 2]}, cfg)
    with pytest.raises(ConfigError, match="unknown key"):
        run_cfg({"memroy": "1G"}, cfg)


def test_a_device_string_in_toml_is_one_device_not_its_letters(tmp_path: Path) -> None:
    assert run_cfg({"device": "debug-exit"}, tmp_path / "c.toml")["device"] == ["debug-exit"]


def test_toml_options_may_be_a_table(tmp_path: Path) -> None:
    out = run_cfg({"option": {"irqchip": "userspace", "reboot": False}}, tmp_path / "c.toml")
    assert out["option"] == ["irqchip=userspace", "reboot=off"]


def test_relative_paths_in_toml_are_relative_to_the_file(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ops").mkdir()
    (tmp_path / "guest.elf").write_bytes(b"\x7fELF")
    out = run_cfg({"kernel": "guest.elf", "stats": "out/../s.json", "pseudo_op_dir": "ops",
                   "console": "file:console.log",
                   "device": ["virtio-blk,file=disk.img"]}, tmp_path / "c.toml")
    assert out["kernel"] == str(tmp_path / "guest.elf")
    assert out["pseudo_op_dir"] == str(tmp_path / "ops")
    assert out["console"] == f"file:{tmp_path / 'console.log'}"
    assert out["device"] == [f"virtio-blk,file={tmp_path / 'disk.img'}"]
    # the same values on the command line stay relative to the working directory
    monkeypatch.chdir(tmp_path)
    assert run_cfg({"kernel": "guest.elf"})["kernel"] == "guest.elf"


def test_a_missing_kernel_or_initrd_is_an_image_error_before_anything_loads(
        tmp_path: Path) -> None:
    from kvmfw.errors import ImageError

    for key in ("kernel", "initrd"):
        with pytest.raises(ImageError, match="does not exist"):
            run_cfg({key: str(tmp_path / "none.img")})


@pytest.mark.parametrize(("key", "value", "msg"), [
    ("max_ticks", "-5", "must be between 1 and"),
    ("max_ticks", "0", "must be between 1 and"),
    ("host_factor", "0", "must be between 1e-06 and 1e\\+06"),
    ("host_factor", "-1", "must be between"),
    ("host_factor", "nan", "must be between"),
    ("timeout", "0", "must be a positive number"),
    ("timeout", "inf", "must be a positive number"),
    ("cpus", "0", "at least one vCPU"),
    ("console", "file:/proc/version", "kernel interface file"),
    ("console", "tty", "must be stdio, none or file:PATH"),
    ("pseudo_op_dir", "/nonexistent", "is not a directory"),
    ("stats", "/nonexistent/s.json", "does not exist"),
    ("load_addr", "seven", "is not a number"),
    ("unclaimed", "maybe", "ignore or fatal"),
])
def test_cli_values_out_of_range_are_refused(key: str, value: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg) as info:
        run_cfg({key: value})
    assert "\n" not in str(info.value) and str(info.value).startswith("--")


class DeclaringArch:
    """An arch plugin as kvmfw.config sees one: what it declares, nothing else."""

    machine_options = {"irqchip": ("kernel", "userspace"), "psci": bool}
    host_machines = ("riscv64",)


def test_option_names_and_values_are_known_to_the_arch() -> None:
    arch = DeclaringArch()
    assert parse_options(["irqchip=userspace", "reboot=off"], "toy", arch) == {
        "irqchip": "userspace", "reboot": False}
    with pytest.raises(ConfigError, match="know no such option"):
        parse_options(["nosuch=1"], "toy", arch)
    with pytest.raises(ConfigError, match="choose one of kernel, userspace"):
        parse_options(["irqchip=fast"], "toy", arch)
    assert parse_options(["psci=off"], "toy", arch) == {"psci": False}  # not bool("off")
    with pytest.raises(ConfigError, match="not a boolean"):
        parse_options(["psci=maybe"], "toy", arch)
    # an arch that publishes no options gets them as given (the core knows no ISA)
    assert parse_options(["anything=1"], "custom") == {"anything": "1"}


def test_arch_of_another_host_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"needs an riscv64 host"):
        check_arch_host("toy", DeclaringArch())
    check_arch_host("custom", object())  # declares no hosts: not checked


# --- what the host can give (Machine) --------------------------------------------------------

@needs_kvm
def test_machine_refuses_memory_beyond_host_ram() -> None:
    ram = host_ram()
    assert ram is not None
    with pytest.raises(ConfigError, match="more than this host's RAM"):
        Machine(MachineConfig(memory=(ram + (1 << 30)) & ~(MiB - 1)),
                arch_plugin=RealModeArch(PIO))
    with pytest.raises(ConfigError, match="multiple of the 4096-byte page"):
        Machine(MachineConfig(memory=0x10001), arch_plugin=RealModeArch(PIO))


@needs_kvm
def test_machine_refuses_cpus_beyond_kvm_limits() -> None:
    with Kvm() as kvm:
        limit = min(kvm.max_vcpus, kvm.max_vcpu_id)
    with pytest.raises(ConfigError, match=f"at most {limit} vCPUs here"):
        Machine(MachineConfig(memory=0x10000, cpus=limit + 1), arch_plugin=RealModeArch(PIO))


@needs_kvm
@pytest.mark.parametrize("factor", [0.0, -1.0, float("inf"), float("nan")])
def test_machine_refuses_a_host_factor_out_of_range(factor: float) -> None:
    with pytest.raises(ConfigError, match="--host-factor"):
        Machine(MachineConfig(memory=0x10000, host_factor=factor),
                arch_plugin=RealModeArch(PIO))

"""Every configuration value checked in one place, before anything starts.

Two stages, each raising :class:`~kvmfw.errors.ConfigError` (exit status 2) with one line
naming the value, the cause and what to do:

* :func:`check_run_config` (the CLI): the keys of ``kvmfw run`` whether they come from the
  command line or a TOML file: types, ranges, files and directories, option names. Relative
  paths in a TOML file are resolved from the file's directory.
* :func:`check_machine_config` (``Machine.__init__``, after ``/dev/kvm`` is open, before the
  VM exists): what the host can give: the architecture KVM can run here, guest RAM against
  host RAM and KVM's slot size, vCPUs against ``KVM_CAP_MAX_VCPUS``, ``KVM_CAP_MAX_VCPU_ID``
  and the architecture's own limit (``KVM_CAP_NR_VCPUS`` is KVM's recommendation: above it
  kvmfw warns, as QEMU does).

:func:`host_status` maps a guest's exit status to the 8-bit process exit status.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from kvmfw.debug import get_logger
from kvmfw.device import split_options
from kvmfw.errors import ConfigError, ImageError

log = get_logger("kvmfw.config")

PAGE = 4096
MiB = 1 << 20
MAX_TICKS = (1 << 63) - 1
"""Simulated ticks are signed 64-bit in the event queue's contract (1 tick = 1 ps)."""
MAX_INSTS = 1 << 48
MAX_CHECKPOINTS = 1 << 20
"""The most ``--checkpoint-limit`` allows (each checkpoint is a directory on disk)."""
"""The most instructions ``--max-insts``/``--emulate-insts`` may ask for (and
``run(until_instructions=N)``): far beyond any run, far below any counter's overflow."""
HOST_FACTOR_RANGE = (1e-6, 1e6)
"""Simulated/host time scale: beyond this a slice's host deadline over- or underflows."""
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
"""Pages per KVM memory slot (the kernel's ``KVM_MEM_MAX_NR_PAGES``)."""

# --- what an architecture plugin declares ----------------------------------------------
#
# The core knows no ISA: an arch plugin object (or module) may publish, as attributes,
#   machine_options  {name: None (free text) | tuple of accepted values | bool (on/off)}:
#                    the ``--option`` names it and the devices of its boards read
#   host_machines    the ``platform.machine()`` values of hosts whose KVM runs its guests
#   max_cpus, max_cpus_why      a vCPU limit beyond KVM's, and why
#   min_memory, min_memory_why  the least guest RAM its board needs, and why
# Without ``machine_options`` any option name is passed through unchecked.

BOOL_TRUE = ("1", "on", "true", "yes")
BOOL_FALSE = ("0", "off", "false", "no")

OptionSpec = tuple[str, ...] | type[bool] | None
"""Accepted values of a machine option: free text (None), one of a tuple, or on/off (bool)."""

CORE_OPTIONS: dict[str, OptionSpec] = {
    # name -> accepted values; the CLI fills most of these itself
    "cmdline": None, "initrd": None, "load_addr": None,
    "fw_cfg": None, "pseudo_op_dir": None, "reboot": bool, "reboot_limit": None,
    "max_cpus": None,  # fw_cfg's FW_CFG_MAX_CPUS
    "board": None,  # a kvmfw.boards entry point instead of the arch's default board
    "fastpath": bool,  # the compiled exit path (kvmfw.fastpath); off: every exit to Python
}
"""Options the core and every board read (``reboot``: :meth:`Machine.request_reset`)."""


def _bool_text(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in BOOL_TRUE:
        return True
    if v in BOOL_FALSE:
        return False
    raise ConfigError(f"--option {key}={value}: not a boolean (use on or off)")


# --- sizes and the guest's exit status -----------------------------------------------------

_SIZE = re.compile(r"^\s*(0x[0-9a-fA-F]+|\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_SHIFT = {"k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(text: str | int, what: str = "--memory") -> int:
    """A size as QEMU's ``-m`` takes it: ``256M``, ``1G``, ``65536K``, ``4096B``; a number
    without a unit (or a TOML integer) is MiB, so ``64`` means 64 MiB, never 64 bytes."""
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ConfigError(f"{what} must be a size such as 256M, not {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"{what} {text} is negative (use e.g. 256M)")
        return text * MiB
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"{what}: not a size: {text!r} (use e.g. 256M, 1G, 65536K)")
    value = int(m.group(1), 0)
    unit = m.group(2).lower()
    if not unit:
        return value if m.group(3) else value * MiB
    return value << _SHIFT[unit]


def format_size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.1f}{unit}" if v != int(v) else f"{int(v)}{unit}"
    return f"{n}B"


def host_status(status: int) -> int:
    """The process exit status of a run that ended with guest/run status ``status``.

    As QEMU (whose ``exit()`` keeps the low 8 bits): 0-255 unchanged, larger values keep
    their low 8 bits (debug-exit's ``(v << 1) | 1`` is odd, so never 0) except that a nonzero
    status whose low 8 bits are 0 (256, 512, ...) gives 1: a failure never looks like
    success. Negative values count from 256 (-1 -> 255), again never 0.
    """
    if 0 <= status <= 255:
        return status
    low = status & 0xFF
    return low or 1


# --- stage 1: the kvmfw run keys -----------------------------------------------------------

def posix_path(p: str) -> str:
    """``str(pathlib.PurePosixPath(p))`` (repeated slashes and ``.`` parts dropped, ``..``
    kept) without importing pathlib, which is not on a run's path (with the urllib.parse,
    ipaddress and fnmatch it imports, 3-5 ms of a run's start-up here)."""
    root = "//" if p.startswith("//") and not p.startswith("///") else \
        "/" if p.startswith("/") else ""
    return root + "/".join(c for c in p.split("/") if c and c != ".") or "."


class Source:
    """Where a value came from, for messages and relative paths."""

    def __init__(self, config_path: str | None = None) -> None:
        self.config_path = config_path
        self.base = os.path.dirname(os.path.realpath(config_path)) if config_path else None

    def name(self, key: str, from_file: bool) -> str:
        if from_file and self.config_path:
            return f"{key} in {self.config_path}"
        return "--" + key.replace("_", "-")

    def path(self, value: str, from_file: bool) -> str:
        """A path from the config file is relative to the file, not the working directory."""
        p = posix_path(os.path.expanduser(value))
        if from_file and self.base is not None and not p.startswith("/"):
            p = posix_path(os.path.join(self.base, p))
        return p


def _expect(key: str, value: Any, types: tuple[type, ...], what: str) -> None:
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{key} must be {what}, not {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"{key} must be {what}, not {type(value).__name__} {value!r}")


def _str_list(key: str, value: Any) -> list[str]:
    """A list of strings; a single string is a list of one (``device = "debug-exit"``)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{key} must be a string or a list of strings, not {value!r}")


def _number(key: str, value: Any, kind: type, what: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, str):
            try:
                value = kind(value)
            except ValueError:
                raise ConfigError(f"{key} must be {what}, not {value!r}") from None
        else:
            raise ConfigError(f"{key} must be {what}, not {value!r}")
    if kind is int and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"{key} must be {what}, not {value!r}")
        value = int(value)
    return kind(value)


def _proc_or_sys(path: str) -> bool:
    real = os.path.realpath(path)
    return real == "/proc" or real.startswith(("/proc/", "/sys/")) or real == "/sys"


def check_console(spec: Any, key: str = "--console") -> str:
    """``stdio``, ``none`` or ``file:PATH`` whose file can be created or written."""
    _expect(key, spec, (str,), "stdio, none or file:PATH")
    if spec in ("stdio", "none"):
        return str(spec)
    if not spec.startswith("file:") or not spec[5:]:
        raise ConfigError(f"{key} must be stdio, none or file:PATH, not {spec!r}")
    path = spec[5:]
    if _proc_or_sys(path):
        raise ConfigError(f"{key} {spec}: {path} is a kernel interface file, not a log "
                          "(give a regular file)")
    if os.path.isdir(path):
        raise ConfigError(f"{key} {spec}: {path} is a directory (give a file name in it)")
    return spec


def check_writable_file(path: str, key: str) -> None:
    """Refuse at start-up a file the run could not write at its end."""
    if _proc_or_sys(path):
        raise ConfigError(f"{key} {path}: a kernel interface file, not an output file")
    if os.path.isdir(path):
        raise ConfigError(f"{key} {path} is a directory (give a file name in it)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"{key} {path}: directory {parent} does not exist (create it first)")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(f"{key} {path}: not writable (check its permissions)")
    if not os.path.exists(path) and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} {path}: cannot create files in {parent} "
                          "(check its permissions or pick another path)")


def known_options(arch: str | None, plugin: Any = None) -> dict[str, OptionSpec]:
    """The ``--option`` names that ``arch`` (and its devices) read, with accepted values;
    empty (nothing checked) when its plugin publishes no ``machine_options``."""
    declared = getattr(plugin, "machine_options", None) if plugin is not None else None
    if not isinstance(declared, dict):
        return {}
    return {**CORE_OPTIONS, **declared}


def parse_options(items: list[str], arch: str | None, plugin: Any = None) -> dict[str, Any]:
    """``KEY=VALUE`` items -> options; names and enumerated values checked when the arch's
    options are known, boolean ones converted."""
    known = known_options(arch, plugin)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        value = value.strip()
        if not sep or not key:
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
        if known and key not in known:
            raise ConfigError(f"--option {key}: the {arch} architecture and its devices know "
                              f"no such option (known: {', '.join(sorted(known))})")
        spec = known.get(key, CORE_OPTIONS.get(key))
        if spec is bool:
            out[key] = _bool_text(key, value)
            continue
        if isinstance(spec, tuple) and value.lower() not in spec:
            raise ConfigError(f"--option {key}={value}: choose one of {', '.join(spec)}")
        out[key] = value
    return out


RUN_KEYS = ("arch", "kernel", "load_addr", "initrd", "cmdline", "memory", "cpus", "device",
            "console", "stats", "debug_flags", "timeout", "max_ticks", "unclaimed",
            "always_sync", "no_summary", "no_default_devices", "no_reboot", "host_factor",
            "fw_cfg", "pseudo_op_dir", "option", "gdb", "gdb_default", "gdb_wait",
            "checkpoint_at", "checkpoint_on", "checkpoint_dir", "exit_after_checkpoint",
            "checkpoint_incremental", "checkpoint_limit", "restore", "trust_host_files",
            "profile", "switch_at", "emulate_insts",
            "trace", "max_insts")
"""Every key of ``kvmfw run``: a command-line option each, and a TOML key each."""

RESTORE_KEYS = ("restore", "console", "stats", "debug_flags", "timeout", "max_ticks",
                "no_summary", "pseudo_op_dir", "gdb", "gdb_default", "gdb_wait",
                "checkpoint_at", "checkpoint_on", "checkpoint_dir", "exit_after_checkpoint",
                "checkpoint_incremental", "checkpoint_limit", "profile", "switch_at",
                "emulate_insts", "trust_host_files",
                "trace", "max_insts")
"""The keys ``--restore`` may be given with: host-side ones. The machine, its devices and
the guest come from the checkpoint."""
CHECKPOINT_SIGNALS = ("SIGUSR1", "SIGUSR2")
"""Signals ``--checkpoint-on`` may name (SIGTERM, SIGHUP and SIGINT stop the run)."""


def check_restore_keys(cfg: dict[str, Any]) -> None:
    """With ``restore``, refuse every key that would describe another machine."""
    if cfg.get("restore") is None:
        return
    extra = sorted(k for k, v in cfg.items() if v not in (None, [], False)
                   and k not in RESTORE_KEYS)
    if extra:
        names = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise ConfigError(f"--restore takes the machine, its devices and the guest from the "
                          f"checkpoint: drop {names}")


def _checkpoint_at(name: str, value: Any) -> tuple[int, int | None]:
    """``TICK`` or ``TICK,PERIOD`` (gem5's ``--take-checkpoints``): the first checkpoint at
    simulated tick TICK, then one every PERIOD ticks."""
    parts = value.split(",") if isinstance(value, str) else [value]
    if len(parts) > 2:
        raise ConfigError(f"{name} {value!r}: give TICK or TICK,PERIOD")
    tick = _number(name, parts[0], int, "a tick (whole number, 1 tick = 1 ps)")
    period = _number(name, parts[1], int, "a period in ticks") if len(parts) > 1 else None
    if not 0 <= tick <= MAX_TICKS or (period is not None and not 1 <= period <= MAX_TICKS):
        raise ConfigError(f"{name} {value!r}: ticks must be between 0 (period: 1) and "
                          f"{MAX_TICKS}")
    return tick, period


def check_run_config(cfg: dict[str, Any], file_keys: set[str], source: Source) -> dict[str, Any]:
    """Check and normalise the ``kvmfw run`` keys (``file_keys``: those from the TOML file).
    Returns a new dict with sizes in bytes, paths resolved and lists as lists."""
    out: dict[str, Any] = {}
    unknown = sorted(set(cfg) - set(RUN_KEYS))
    if unknown:
        raise ConfigError(f"config {source.config_path}: unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(RUN_KEYS)})")
    for key, value in cfg.items():
        f = key in file_keys
        name = source.name(key, f)
        if value is None:
            continue
        if key in ("arch", "cmdline", "debug_flags"):
            _expect(name, value, (str,), "a string")
            out[key] = value
        elif key in ("kernel", "initrd", "stats", "pseudo_op_dir"):
            _expect(name, value, (str,), "a path")
            if not value:
                raise ConfigError(f"{name} is empty (give a path)")
            module_list = key == "initrd" and re.search(r"[ ,]", value)  # multiboot modules
            out[key] = value if module_list else source.path(value, f)
            if key in ("kernel", "initrd") and not module_list \
                    and not os.path.isfile(out[key]):  # before a plugin loads or a VM exists
                raise ImageError(f"{name} {out[key]} does not exist or is not a file")
        elif key == "load_addr":
            if isinstance(value, str):
                try:
                    value = int(value, 0)
                except ValueError:
                    raise ConfigError(f"{name} {value!r} is not a number") from None
            _expect(name, value, (int,), "an address")
            if not 0 <= value < 1 << 64:
                raise ConfigError(f"{name} {value:#x} is not a guest-physical address")
            out[key] = value
        elif key == "memory":
            out[key] = parse_size(value, name)
        elif key == "cpus":
            n = _number(name, value, int, "a whole number of vCPUs")
            if n < 1:
                raise ConfigError(f"{name} {n}: a machine needs at least one vCPU")
            out[key] = n
        elif key == "option" and isinstance(value, dict):  # [run.option] irqchip = "kernel"
            out[key] = [f"{k}={_toml_text(v)}" for k, v in value.items()]
        elif key in ("device", "fw_cfg", "option"):
            items = _str_list(name, value)
            if f and key in ("device", "fw_cfg"):
                items = [_resolve_spec_paths(s, source) for s in items]
            out[key] = items
        elif key == "console":
            spec = check_console(value, name)
            if spec.startswith("file:"):
                spec = "file:" + source.path(spec[5:], f)
            out[key] = spec
        elif key == "timeout":
            t = _number(name, value, float, "a number of seconds")
            if not (math.isfinite(t) and t > 0):
                raise ConfigError(f"{name} {value}: must be a positive number of seconds "
                                  "(leave it out for no limit)")
            out[key] = t
        elif key == "max_ticks":
            n = _number(name, value, int, "a whole number of ticks")
            if not 1 <= n <= MAX_TICKS:
                raise ConfigError(f"{name} {n}: must be between 1 and {MAX_TICKS} "
                                  "(1 tick = 1 ps; leave it out for no limit)")
            out[key] = n
        elif key in ("switch_at", "emulate_insts", "max_insts"):
            n = _number(name, value, int, "a whole number")
            least = 1 if key == "emulate_insts" else 0
            most = MAX_TICKS if key == "switch_at" else MAX_INSTS
            if not least <= n <= most:
                raise ConfigError(f"{name} {n}: must be between {least} and {most}")
            out[key] = n
        elif key == "trace":
            _expect(name, value, (str,), "a file name")
            out[key] = source.path(value, f)
            check_writable_file(out[key], name)
        elif key == "host_factor":
            h = _number(name, value, float, "a number")
            lo, hi = HOST_FACTOR_RANGE
            if not (math.isfinite(h) and lo <= h <= hi):
                raise ConfigError(f"{name} {value}: must be between {lo:g} and {hi:g} "
                                  "(simulated seconds per host second)")
            out[key] = h
        elif key == "gdb":
            _expect(name, value, (str,), "an endpoint such as tcp::1234")
            from kvmfw.gdb.server import parse_endpoint

            parse_endpoint(value)  # refused now, not after the machine is built
            out[key] = value
        elif key == "checkpoint_at":
            out[key] = _checkpoint_at(name, value)
        elif key == "checkpoint_limit":
            n = _number(name, value, int, "a whole number of checkpoints")
            if not 0 <= n <= MAX_CHECKPOINTS:
                raise ConfigError(f"{name} {n}: must be between 0 and {MAX_CHECKPOINTS}")
            out[key] = n
        elif key == "checkpoint_on":
            _expect(name, value, (str,), "a signal name such as SIGUSR1")
            sig = value.strip().upper()
            sig = sig if sig.startswith("SIG") or sig == "NONE" else "SIG" + sig
            if sig not in (*CHECKPOINT_SIGNALS, "NONE"):
                raise ConfigError(f"{name} {value!r}: must be one of "
                                  f"{', '.join(CHECKPOINT_SIGNALS)} or none")
            out[key] = sig.lower() if sig == "NONE" else sig
        elif key in ("checkpoint_dir", "restore"):
            _expect(name, value, (str,), "a directory")
            if not value:
                raise ConfigError(f"{name} is empty (give a directory)")
            d = source.path(value, f)
            if key == "restore":
                if not os.path.isfile(os.path.join(d, "manifest.json")):
                    raise ConfigError(f"{name} {d}: not a checkpoint directory (no "
                                      "manifest.json)")
            elif os.path.exists(d) and not os.path.isdir(d):
                raise ConfigError(f"{name} {d} is not a directory")
            elif not os.path.exists(d) and not os.path.isdir(os.path.dirname(d) or "."):
                raise ConfigError(f"{name} {d}: its parent directory does not exist")
            out[key] = d
        elif key == "unclaimed":
            if value not in ("ignore", "fatal"):
                raise ConfigError(f"{name} must be ignore or fatal, not {value!r}")
            out[key] = value
        else:  # the flags
            _expect(name, value, (bool,), "true or false")
            out[key] = value
    if "pseudo_op_dir" in out and not os.path.isdir(out["pseudo_op_dir"]):
        raise ConfigError(f"{source.name('pseudo_op_dir', 'pseudo_op_dir' in file_keys)} "
                          f"{out['pseudo_op_dir']} is not a directory (create it first)")
    if "stats" in out:
        check_writable_file(out["stats"], source.name("stats", "stats" in file_keys))
    return out


def _toml_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


_PATH_KEYS = ("file", "dir", "path")


def _resolve_spec_paths(spec: str, source: Source) -> str:
    """``virtio-blk,file=disk.img`` from a config file: the path relative to the file."""
    parts = split_options(spec, "device")
    out = []
    for i, (k, v) in enumerate(parts):
        if i and v is not None and k in _PATH_KEYS and v:
            v = source.path(v, True)
        out.append(k if v is None else f"{k}={_quote(v)}")
    return ",".join(out)


def _quote(value: str) -> str:
    """A device option value, quoted if it needs to be (see :func:`split_options`)."""
    if not re.search(r"[,\\\"' =]", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'



# --- stage 2: what this host can give ------------------------------------------------------

def host_ram() -> int | None:
    """Physical RAM of the host in bytes (``MemTotal``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_arch_host(arch: str, plugin: Any = None) -> None:
    """KVM runs guests of the host's architecture only (the plugin's ``host_machines``)."""
    hosts = getattr(plugin, "host_machines", None) if plugin is not None else None
    if not hosts:
        return
    machine = os.uname().machine.lower()  # (platform.machine(): platform costs an import)
    if machine not in hosts:
        want = hosts[0]
        raise ConfigError(f"--arch {arch} needs an {want} host: KVM only runs guests of "
                          f"the host's own architecture and this host is {machine} (run it on "
                          f"an {want} machine, or leave --arch out)")


def vcpu_limit(kvm: Any, arch: str, plugin: Any = None) -> tuple[int, str]:
    """The most vCPUs a machine of ``arch`` may have here, and which limit that is."""
    limit, why = kvm.max_vcpus, "KVM_CAP_MAX_VCPUS of this kernel"
    if kvm.max_vcpu_id < limit:
        limit, why = kvm.max_vcpu_id, "KVM_CAP_MAX_VCPU_ID of this kernel (vCPU ids 0..n-1)"
    arch_limit = getattr(plugin, "max_cpus", None) if plugin is not None else None
    if isinstance(arch_limit, int) and arch_limit < limit:
        limit = arch_limit
        why = getattr(plugin, "max_cpus_why", None) or f"the {arch} plugin's limit"
    return limit, why


def check_host_factor(h: Any) -> None:
    """Simulated seconds per host second: a finite number in :data:`HOST_FACTOR_RANGE`."""
    lo, hi = HOST_FACTOR_RANGE
    if isinstance(h, bool) or not isinstance(h, int | float) or not (
            math.isfinite(h) and lo <= h <= hi):
        raise ConfigError(f"--host-factor {h!r}: must be between {lo:g} and {hi:g} "
                          "(simulated seconds per host second)")


def check_machine_config(cfg: Any, kvm: Any, arch: str, plugin: Any = None) -> None:
    """Check a ``MachineConfig`` against this host and ``/dev/kvm`` (``kvm``, open)."""
    check_arch_host(arch, plugin)
    mem = cfg.memory
    if isinstance(mem, bool) or not isinstance(mem, int) or mem <= 0:
        raise ConfigError(f"--memory {mem!r}: guest RAM must be a positive size (e.g. 256M)")
    if mem % PAGE:
        raise ConfigError(f"--memory {mem} bytes is not a multiple of the {PAGE}-byte page "
                          f"(e.g. {format_size(mem - mem % PAGE or PAGE)})")
    least = getattr(plugin, "min_memory", None) if plugin is not None else None
    least_why = getattr(plugin, "min_memory_why", None) or f"the {arch} plugin's minimum"
    if isinstance(least, int) and mem < least:
        raise ConfigError(f"--memory {format_size(mem)} is too little: give at least "
                          f"{format_size(least)} ({least_why})")
    ram = host_ram()
    if ram is not None and mem > ram:
        raise ConfigError(f"--memory {format_size(mem)} is more than this host's RAM "
                          f"({format_size(ram)}); give at most {format_size(ram & ~(MiB - 1))}")
    if mem // PAGE > KVM_MEM_MAX_NR_PAGES * max(1, kvm.nr_memslots // 2):
        raise ConfigError(f"--memory {format_size(mem)} exceeds KVM's memory slot limits")
    cpus = cfg.cpus
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise ConfigError(f"--cpus {cpus!r}: a machine needs at least one vCPU")
    limit, why = vcpu_limit(kvm, arch, plugin)
    if cpus > limit:
        raise ConfigError(f"--cpus {cpus}: at most {limit} vCPUs here ({why}); give "
                          f"--cpus {limit} or fewer")
    if cpus > kvm.recommended_vcpus > 0:
        log.warning("kvmfw: warning: --cpus %d is more than KVM recommends here "
                    "(KVM_CAP_NR_VCPUS = %d); the run may be slow", cpus,
                    kvm.recommended_vcpus)
    if cfg.unclaimed not in ("ignore", "fatal"):
        raise ConfigError(f"--unclaimed must be ignore or fatal, not {cfg.unclaimed!r}")

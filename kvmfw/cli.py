"""The ``kvmfw`` command: ``run``, ``list-plugins``, ``info``, ``doctor``.

Every error reaches the user as one line (``kvmfw: error: ...``) with a distinct exit
status per cause, plus a register dump for guest errors; never a traceback (set
``KVMFW_TRACEBACK=1`` to see one when reporting a bug).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any

import click

from kvmfw import __version__, debug
from kvmfw.config import (
    RUN_KEYS,
    Source,
    check_arch_host,
    check_restore_keys,
    check_run_config,
    host_status,
    parse_options,
    vcpu_limit,
)
from kvmfw.config import parse_size as parse_size  # re-exported: the CLI's size syntax
from kvmfw.device import parse_device_spec
from kvmfw.errors import (
    ConfigError,
    GuestError,
    ImageError,
    KvmfwError,
    RunTimeoutError,
    StoppedBySignal,
)
from kvmfw.eventq import Event

EXIT_INTERNAL = 70


def _echo_err(text: str) -> None:
    with contextlib.suppress(OSError):  # a hung-up terminal must not turn an ending into a bug
        click.echo(f"kvmfw: {text}", err=True)


def _version_text() -> str:
    """kvmfw's version and every installed plugin distribution's (no plugin is imported)."""
    import importlib.metadata

    from kvmfw.plugins import GROUPS

    lines = [f"kvmfw {__version__} (Python {sys.version.split()[0]})"]
    seen: dict[str, tuple[str, list[str]]] = {}
    for dist in importlib.metadata.distributions():
        eps = [f"{ep.group.removeprefix('kvmfw.')} {ep.name}" for ep in dist.entry_points
               if ep.group in GROUPS]
        name = dist.metadata["Name"] or "?"
        if eps and name not in seen:
            seen[name] = (dist.version or "?", eps)
    for name in sorted(seen):
        version, eps = seen[name]
        shown = ", ".join(eps[:4]) + (f", +{len(eps) - 4} more" if len(eps) > 4 else "")
        lines.append(f"  {name} {version} ({shown})")
    if not seen:
        lines.append("  no plugins installed")
    return "\n".join(lines)


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(_version_text())
        ctx.exit()


class _Cli(click.Group):
    """The ``kvmfw`` group: built-in commands, and those plugins publish under the
    ``kvmfw.cli`` entry-point group, imported only when asked for by name or listed (a
    ``kvmfw run`` imports no plugin's CLI)."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is None:
            _add_plugin_commands(cmd_name)
            cmd = super().get_command(ctx, cmd_name)
        return cmd

    def list_commands(self, ctx: click.Context) -> list[str]:
        _add_plugin_commands()
        return super().list_commands(ctx)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_show_version,
              help="Show kvmfw's version and every installed plugin's, and exit.")
def cli() -> None:
    """Run real guests on /dev/kvm with a run loop you can script in Python."""


# --- list-plugins ------------------------------------------------------------------------

@cli.command("list-plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--strict", is_flag=True, help="Exit 4 if any plugin failed to load.")
def list_plugins_cmd(as_json: bool, strict: bool) -> None:
    """Show installed plugins, what failed to load, and why."""
    from kvmfw.plugins import host_arch, list_plugins

    infos = list_plugins()
    if as_json:
        click.echo(json.dumps([i.as_dict() for i in infos], indent=2))
    else:
        if not infos:
            click.echo("no kvmfw plugins installed (try: pip install ./plugins/x86 "
                       "./plugins/devices)")
            click.echo(f"\nhost architecture: {host_arch()}")
        else:
            rows = [("NAME", "GROUP", "PACKAGE", "VERSION", "API", "STATUS")]
            rows += [(i.name, i.group, i.package, i.version, i.api or "-", i.status)
                     for i in infos]
            widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
            for r in rows:
                click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
            for i in infos:
                if i.status == "failed":
                    click.echo(f"\n{i.name} ({i.group}) failed: {i.error}")
            click.echo(f"\nhost architecture: {host_arch()}")
    if strict and any(i.status == "failed" for i in infos):
        sys.exit(4)


# --- info ------------------------------------------------------------------------------

@cli.command("info")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--kvm", "kvm_path", default="/dev/kvm", show_default=True)
def info_cmd(as_json: bool, kvm_path: str) -> None:
    """KVM API version, every capability, vCPU limits, perf and the time source."""
    from kvmfw.abi import constants
    from kvmfw.doctor import guest_features
    from kvmfw.kvm import Kvm
    from kvmfw.plugins import host_arch
    from kvmfw.timer import PERF_COUNT_HW_INSTRUCTIONS, probe_perf

    with Kvm(kvm_path) as kvm:
        caps = kvm.capabilities()
        limit, limit_why = vcpu_limit(kvm, host_arch())
        perf = probe_perf()
        insns = probe_perf(PERF_COUNT_HW_INSTRUCTIONS)
        data: dict[str, Any] = {
            "kvm_path": kvm_path,
            "module": kvm.module,
            "api_version": constants.KVM_API_VERSION,
            "vcpu_mmap_size": kvm.vcpu_mmap_size,
            "max_vcpus": kvm.max_vcpus,
            "recommended_vcpus": kvm.recommended_vcpus,
            "max_vcpu_id": kvm.max_vcpu_id,
            "guest_vcpu_limit": limit,
            "guest_vcpu_limit_why": limit_why,
            "memory_slots": kvm.nr_memslots,
            "coalesced_mmio_page": kvm.coalesced_mmio_page,
            "host": {"arch": host_arch(), "machine": os.uname().machine,
                     "kernel": os.uname().release},
            "perf": {"available": perf.available, "reason": perf.reason,
                     "instructions": {"available": insns.available, "reason": insns.reason}},
            "guest_features": guest_features(caps, host_arch()),
            "time_source": "perf hardware cycles" if perf.available else
            "architecture cycle source (e.g. x86 TSC) if the arch plugin offers one, "
            "else the monotonic clock",
            "capabilities": caps,
        }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key in ("kvm_path", "module", "api_version", "vcpu_mmap_size", "max_vcpus",
                "recommended_vcpus", "max_vcpu_id", "memory_slots", "coalesced_mmio_page"):
        click.echo(f"{key:<20} {data[key]}")
    click.echo(f"{'guest vcpus':<20} at most {limit} for a {host_arch()} guest ({limit_why}; "
               f"more than {data['recommended_vcpus']} draws a warning)")
    h = data["host"]
    click.echo(f"{'host':<20} {h['arch']} ({h['machine']}, Linux {h['kernel']})")
    click.echo(f"{'perf':<20} {'available' if perf.available else 'unavailable'}: "
               f"{perf.reason}")
    click.echo(f"{'perf instructions':<20} "
               f"{'available' if insns.available else 'unavailable'}: {insns.reason}")
    click.echo(f"{'time source':<20} {data['time_source']}")
    for name, (ok, why) in data["guest_features"].items():
        click.echo(f"{name:<20} {'yes' if ok else 'no'}: {why}")
    supported = {k: v for k, v in caps.items() if v}
    click.echo(f"\ncapabilities: {len(supported)} of {len(caps)} supported")
    for name, value in caps.items():
        click.echo(f"  {name:<36} {value if value else 'no'}")


# --- doctor ----------------------------------------------------------------------------

@cli.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--kvm", "kvm_path", default="/dev/kvm", show_default=True,
              help="The KVM device to check.")
def doctor_cmd(as_json: bool, kvm_path: str) -> None:
    """Check the host: /dev/kvm, which KVM, capabilities, perf, build tools.

    Each finding says what it costs and how to fix it. Exit status 0 when kvmfw can run
    guests here, 3 (no usable /dev/kvm) when it cannot.
    """
    from kvmfw.doctor import HostPaths, diagnose, format_report

    report = diagnose(HostPaths(kvm=kvm_path))
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else format_report(report))
    if not report.usable:
        sys.exit(3)


# --- run -----------------------------------------------------------------------------

_RUN_KEYS = RUN_KEYS
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _load_config(path: str | None) -> dict[str, Any]:
    """The ``[run]`` table (or the top level) of a TOML file, keys with ``_``."""
    if path is None:
        return {}
    import tomllib  # (only for --config: its parser compiles regular expressions at import)

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    table = data.get("run", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config {path}: [run] must be a table of keys")
    data = {k.replace("-", "_"): v for k, v in table.items()}
    if "devices" in data:
        data["device"] = data.pop("devices")
    return data


class _ConsoleSink:
    """The guest console's host side: writes through at once, and remembers (rather than
    raises) the first write error, so a full disk or a closed pipe is reported at the end
    instead of stopping the guest or being lost silently."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.error: str | None = None
        self._owned: Any = None
        if spec == "stdio":
            self._out: Any = sys.stdout.buffer
        else:
            path = os.devnull if spec == "none" else spec[5:]
            try:
                self._owned = self._out = open(path, "wb", buffering=0)  # noqa: SIM115
            except OSError as exc:
                raise ConfigError(f"--console {spec}: {exc.strerror}") from None

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                self._out.write(data)
            except (OSError, ValueError) as exc:
                self.error = getattr(exc, "strerror", None) or str(exc)
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._out.flush()
            except (OSError, ValueError) as exc:
                self.error = getattr(exc, "strerror", None) or str(exc)

    def close(self) -> None:
        if self._owned is not None:
            with contextlib.suppress(OSError):
                self._owned.close()
            self._owned = None


class _Terminal:
    """The controlling terminal's attributes, saved before the console puts it in raw mode
    and put back first thing at every ending (before stats, summary or error lines)."""

    def __init__(self, active: bool) -> None:
        self.fd = sys.stdin.fileno() if active else -1
        self.saved: list[Any] | None = None
        if active and os.isatty(self.fd):
            with contextlib.suppress(termios.error, OSError):
                self.saved = termios.tcgetattr(self.fd)

    def restore(self) -> None:
        if self.saved is not None:
            with contextlib.suppress(termios.error, OSError):  # e.g. after SIGHUP
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


class _Watchdog:
    """Ends the process when a stopped run does not return (a device blocked in a host
    call, e.g. a console write to a pipe nobody reads): ``STOP_GRACE`` seconds after the
    host timeout or a stop signal it restores the terminal, says where each thread is,
    and exits with 124 or 128 + the signal. A signal handler reaches it through a pipe
    (the one thing that is safe there)."""

    def __init__(self, terminal: _Terminal, timeout: float | None) -> None:
        self.terminal = terminal
        self.timeout = timeout
        self._r, self._w = os.pipe()
        self._thread = threading.Thread(target=self._watch, name="kvmfw-stop-watchdog",
                                        daemon=True)
        self._thread.start()

    def stopping(self, signum: int) -> None:
        with contextlib.suppress(OSError):
            os.write(self._w, bytes([signum]))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._w, b"\0")
        self._thread.join(1.0)
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _watch(self) -> None:
        from kvmfw.machine import STOP_GRACE

        deadline, what, code = None, "", 124
        if self.timeout is not None:
            deadline = time.monotonic() + self.timeout + STOP_GRACE
            what = f"its host timeout of {self.timeout:g} s"
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._r], [], [], wait)
            if not ready:
                break
            b = os.read(self._r, 1)
            if not b or b == b"\0":
                return
            end = time.monotonic() + STOP_GRACE
            if deadline is None or end < deadline:
                deadline, what, code = end, signal.Signals(b[0]).name, 128 + b[0]
        self.terminal.restore()
        _die_stuck(f"the run did not stop within {STOP_GRACE:g} s of {what}", code)


def _die_stuck(what: str, code: int) -> None:
    from kvmfw.machine import _where

    lines = [f"kvmfw: error: {what}; threads:"]
    lines += [f"  {t.name}: {_where(t)}" for t in threading.enumerate()]
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
    os._exit(code)


class _Signals:
    """SIGTERM, SIGHUP and SIGINT end a run the way the guest ending it would: the machine
    stops after the current exit with status 128 + signal and the endings (terminal, stats,
    summary) follow; before the run they abort start-up; during the endings they are
    noted but do not cut them short."""

    def __init__(self) -> None:
        self.machine: Any = None
        self.phase = "start"  # start | run | end
        self.signum: int | None = None
        self.watchdog: _Watchdog | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():  # (else Python refuses)
            for sig in _STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        name = signal.Signals(signum).name
        if self.phase == "start":
            raise StoppedBySignal(signum, f"stopped by {name} before the guest ran")
        m = self.machine
        if self.phase == "run" and self.watchdog is not None:
            self.watchdog.stopping(signum)
        if self.phase == "run" and m is not None and not m.stop_requested:
            # no locks here (this runs between bytecodes of the main thread, which may
            # hold them): the run loops poll stop_requested, the kick ends KVM_RUN
            m.exit_status, m.exit_reason = 128 + signum, f"stopped by {name}"
            m.stop_requested = True
            m.kick_all()

    def arm(self, machine: Any) -> None:
        """Enter the run phase. ``Machine.run`` clears a stop requested before it starts, so
        a signal between here and there is applied again by an event it services first."""
        self.machine, self.phase = machine, "run"

        def apply() -> None:
            if self.signum is not None and not machine.stop_requested:
                machine.request_exit(128 + self.signum,
                                     f"stopped by {signal.Signals(self.signum).name}")

        machine.eventq.post(Event(apply, "cli.signal-check"))


@cli.command("run")
@click.option("--arch", help="Architecture plugin (default: the host's; KVM runs only the "
              "host's own architecture).")
@click.option("--kernel", type=str, help="Guest image: multiboot/ELF, Linux bzImage or Image, "
              "or a flat binary with --load-addr. Default: the embedded guest.")
@click.option("--load-addr", type=str, help="Load address of a flat binary.")
@click.option("--initrd", type=str, help="Initial ramdisk (multiboot module 0 for multiboot).")
@click.option("--cmdline", type=str, help="Kernel command line.")
@click.option("--memory", "-m", type=str, metavar="SIZE",
              help="Guest RAM, e.g. 256M or 1G; a bare number is MiB as in QEMU (default "
              "256M; at most the host's RAM).")
@click.option("--cpus", type=str, metavar="N",
              help="Number of vCPUs (default 1; at most what KVM and the arch allow: see "
              "kvmfw info).")
@click.option("--device", multiple=True,
              help="Add a device to the board: NAME,key=value,... (repeatable).")
@click.option("--config", "config_path", type=str, help="TOML file with the same keys "
              "(relative paths in it are relative to the file).")
@click.option("--console", type=str, help="stdio (default), file:PATH or none.")
@click.option("--stats", type=str, help="Write statistics to FILE (.json for JSON) at every "
              "ending, also timeouts and signals.")
@click.option("--debug-flags", type=str, help="Comma-separated debug flags (see --help-flags).")
@click.option("--timeout", type=str, metavar="SECONDS",
              help="Stop after this many host seconds (> 0; status 124).")
@click.option("--max-ticks", type=str, metavar="TICKS",
              help="Stop after this many simulated ticks (1 ps; >= 1).")
@click.option("--unclaimed", type=click.Choice(["ignore", "fatal"]),
              help="What to do with accesses no device claims (default ignore).")
@click.option("--always-sync", is_flag=True, default=None,
              help="Sync all state around every entry (debug aid, slow).")
@click.option("--host-factor", type=str, metavar="FACTOR",
              help="Simulated/host time scale, 1e-06..1e+06 (default 1.0).")
@click.option("--no-default-devices", is_flag=True, default=None,
              help="Start from an empty board: only the --device list.")
@click.option("--no-reboot", is_flag=True, default=None,
              help="A guest reset (reboot, triple fault) ends the run instead of rebooting "
              "the machine (QEMU's -no-reboot; the default is to reboot, as QEMU).")
@click.option("--no-summary", is_flag=True, default=None, help="No stats summary on stderr.")
@click.option("--fw-cfg", multiple=True,
              help="Add a fw_cfg blob: name=opt/x,file=PATH or name=opt/x,string=TEXT.")
@click.option("--pseudo-op-dir", type=str,
              help="Existing directory the pseudo-op device may read and write host files in.")
@click.option("--option", "-o", multiple=True,
              help="Arch/device machine option KEY=VALUE (e.g. irqchip=userspace, acpi=on); "
              "unknown names are refused.")
@click.option("--gdb", type=str, help="Listen for GDB on tcp::PORT (127.0.0.1; "
              "tcp:0.0.0.0:PORT for every interface).")
@click.option("-s", "gdb_default", is_flag=True, default=None,
              help="Shorthand for --gdb tcp::1234.")
@click.option("--gdb-wait", "-S", "gdb_wait", is_flag=True, default=None,
              help="Wait for GDB to attach and continue before the first instruction "
              "(implies -s without --gdb).")
@click.option("--checkpoint-at", type=str, metavar="TICK[,PERIOD]",
              help="Take a checkpoint at simulated tick TICK (then every PERIOD ticks); "
              "the run continues unless --exit-after-checkpoint.")
@click.option("--checkpoint-on", type=str, metavar="SIGNAL",
              help="Take a checkpoint when kvmfw receives SIGNAL (SIGUSR1 (default), "
              "SIGUSR2 or none).")
@click.option("--checkpoint-dir", type=str, metavar="DIR",
              help="Where checkpoints go, one cpt.<tick> directory each (default: the "
              "current directory; created if missing).")
@click.option("--exit-after-checkpoint", is_flag=True, default=None,
              help="End the run (status 0) after the first checkpoint.")
@click.option("--checkpoint-incremental", is_flag=True, default=None,
              help="Checkpoints after the first store only the pages changed since the "
              "previous one (a chain; restore needs every link).")
@click.option("--checkpoint-limit", type=str, metavar="N",
              help="At most N checkpoints asked for during the run (tick, signal, guest; "
              "default 1000); those past it, or with under 256 MiB free, are refused with "
              "a warning and the run goes on.")
@click.option("--restore", type=str, metavar="DIR",
              help="Continue the guest saved in checkpoint DIR (machine, devices and guest "
              "come from it; host options such as --console, --timeout, --stats and "
              "--checkpoint-dir may be given anew).")
@click.option("--profile", is_flag=True, default=None,
              help="At the end, a table of exits by reason and device with their host time, "
                   "sync and timer costs, and the busiest ports and addresses (stderr).")
@click.option("--switch-at", type=str, metavar="TICKS",
              help="Hand vCPU 0 to the emulated CPU (Unicorn) at simulated tick TICKS for "
              "--emulate-insts instructions, then back to KVM (needs kvmfw[emu]).")
@click.option("--emulate-insts", type=str, metavar="N",
              help="Instructions to emulate at --switch-at (exact; fewer before hlt/wfi).")
@click.option("--trace", type=str, metavar="FILE",
              help="Write every emulated instruction (address, bytes, disassembly) to FILE.")
@click.option("--max-insts", type=str, metavar="N",
              help="Stop after exactly N guest instructions of vCPU 0 (status 0; counted "
              "by the emulated CPU without a PMU: see the stats group system.cpu0.insts).")
@click.option("--help-flags", is_flag=True, help="List the debug flags and exit.")
def run_cmd(config_path: str | None, help_flags: bool, **opts: Any) -> None:
    """Boot a guest and run it until it exits.

    Exit status: the guest's (see README: debug-exit gives (v << 1) | 1; values above 255
    keep their low 8 bits, and never 0 for a nonzero status), 2 bad configuration,
    3 no usable /dev/kvm, 4 plugin, 5 guest error, 6 device/bus, 7 bad image,
    8 arm64 feature missing, 9 checkpoint refused or not written, 70 kvmfw bug,
    124 host timeout, 128+N signal N (129 SIGHUP, 130 SIGINT, 143 SIGTERM).
    """
    if help_flags:
        for name, (logger, text) in debug.FLAGS.items():
            click.echo(f"{name:<12} {text} ({logger})")
        for name, members in debug.COMPOUND.items():
            click.echo(f"{name:<12} = {','.join(members)}")
        return
    source = Source(config_path)
    file_raw = _load_config(config_path)
    cfg = check_run_config(file_raw, set(file_raw), source)
    cli_raw = {k: (list(v) or None) if k in ("device", "fw_cfg", "option") else v
               for k, v in opts.items()}
    for k, v in check_run_config({k: v for k, v in cli_raw.items() if v is not None},
                                 set(), source).items():
        cfg[k] = cfg.get(k, []) + v if k in ("device", "fw_cfg", "option") else v
    sys.exit(_run(cfg))


@cli.command("sweep")
@click.argument("spec", type=str)
@click.option("--out", required=True, type=str, metavar="DIR",
              help="Directory for the results table (results.parquet, results.csv, "
              "rows.jsonl) and each variant's files.")
@click.option("--resume", is_flag=True, help="Keep DIR's finished rows; run only the rest.")
@click.option("--retry-failed", is_flag=True,
              help="With --resume: run again the variants whose row is not ok.")
@click.option("--scheduler", type=str, metavar="ADDRESS",
              help="An existing Dask scheduler (tcp://HOST:8786); default: a LocalCluster, "
              "one worker process per core.")
@click.option("--workers", type=int, metavar="N", help="LocalCluster workers (default: cores).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def sweep_cmd(spec: str, out: str, resume: bool, retry_failed: bool, scheduler: str | None,
              workers: int | None, no_progress: bool) -> None:
    """Run every variant of the sweep SPEC (TOML) as a task on Dask; one row each in
    DIR/results.parquet and DIR/results.csv (see README "Sweeps")."""
    from kvmfw.sweep import load, run

    if retry_failed and not resume:
        raise ConfigError("--retry-failed needs --resume (it re-runs rows DIR already has)")
    s = load(spec)  # a bad spec is one line, before any cluster or task starts
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: give at least 1")
    run(s, out=out, resume=resume, retry_failed=retry_failed, scheduler=scheduler,
        workers=workers,
        progress=not no_progress, echo=_echo_err)


def _run(cfg: dict[str, Any]) -> int:
    """Check everything, build, run, and end (terminal, stats, summary) whatever happens;
    returns the process exit status."""
    from kvmfw.machine import MachineConfig
    from kvmfw.plugins import host_arch, load_arch

    if cfg.get("debug_flags"):
        debug.enable(cfg["debug_flags"])
    check_restore_keys(cfg)
    _check_emu_keys(cfg)
    restore_dir = cfg.get("restore")
    arch = cfg.get("arch") or host_arch()
    plugin: Any = None
    if restore_dir is None:
        check_arch_host(arch)
        arch, plugin = load_arch(arch)
    options: dict[str, Any] = parse_options(cfg.get("option", []), arch, plugin) \
        if restore_dir is None else {}
    for k in ("cmdline", "initrd", "fw_cfg", "pseudo_op_dir", "load_addr"):
        if cfg.get(k) is not None:
            options[k] = cfg[k]
    if cfg.get("no_reboot"):
        options["reboot"] = False
    if cfg.get("initrd") and not re.search(r"[ ,]", cfg["initrd"]) \
            and not Path(cfg["initrd"]).is_file():
        raise ImageError(f"initrd {cfg['initrd']} does not exist or is not a file")
    kernel = cfg.get("kernel")
    if kernel is not None and not Path(kernel).is_file():
        raise ImageError(f"kernel {kernel} does not exist or is not a file")
    stats_path: str = cfg.get("stats") or ""
    stats_made = False
    if stats_path:
        try:  # the file exists from the start: a run never ends with stats it cannot write
            stats_made = not os.path.exists(stats_path)
            open(stats_path, "a").close()  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(f"cannot write --stats {stats_path}: {exc.strerror} (pick a "
                              "writable path)") from None
    console_spec = cfg.get("console", "stdio")
    console = _ConsoleSink(console_spec)
    options["console_output"] = console
    if console_spec == "stdio":
        options["console_input"] = "stdin"  # the terminal, in raw mode; Ctrl-A x quits
    mc = MachineConfig.from_run(cfg, arch, options)
    terminal = _Terminal(console_spec == "stdio")
    error: BaseException | None = None
    status, reason, timed_out = 0, "", False
    try:
        with _Signals() as sigs, _make_machine(mc, plugin, arch, restore_dir,
                                               options) as machine:
            if restore_dir is not None:
                pass  # the guest is in the checkpoint
            else:
                if kernel is None:
                    kernel = machine.hooks.call("default_guest", machine=machine)
                    if kernel is None:
                        raise ConfigError(f"the {arch} plugin has no embedded guest: give "
                                          "one with --kernel FILE")
                    _check_embedded_guest_board(machine)
                machine.load_guest(str(kernel), **options)
            gdb_spec = cfg.get("gdb") or ("tcp::1234" if cfg.get("gdb_default") or
                                          cfg.get("gdb_wait") else None)
            if gdb_spec:
                from kvmfw.gdb import parse_endpoint

                host, port = parse_endpoint(str(gdb_spec))
                machine.start_gdb(port, host, wait=bool(cfg.get("gdb_wait")))
            watchdog = sigs.watchdog = _Watchdog(terminal, cfg.get("timeout"))
            sigs.arm(machine)
            _arm_checkpoints(machine, cfg, sigs)
            profile = None
            if cfg.get("profile"):
                from kvmfw.profile import ExitProfile

                profile = ExitProfile(machine)
                profile.install()
            t0 = time.monotonic()
            try:
                result = _run_machine(machine, cfg)
                status, reason = result.status, result.reason
            except RunTimeoutError as exc:
                status, reason, timed_out = exc.exit_status, str(exc), True
                error = exc
            except (KvmfwError, KeyboardInterrupt) as exc:
                error = exc
                status = getattr(exc, "exit_status", 130)
                reason = "stopped by the error below"
            finally:
                sigs.phase = "end"
                watchdog.close()
                terminal.restore()  # first: everything below must be readable
                if machine.gdb is not None:
                    machine.gdb.close(status)  # GDB sees the guest exit with its status
            host_seconds = time.monotonic() - t0
            console.flush()
            stats_error = None
            if stats_path:
                try:
                    _write_stats(machine, stats_path)
                except ConfigError as exc:
                    stats_error = exc
            if not cfg.get("no_summary"):
                exits = sum(c.stats.vm_exits for c in machine.cpus)
                code = host_status(status)
                shown = f"status {status}" + (f" (exit status {code})" if code != status
                                              else "")
                _echo_err(f"{reason}; {shown}; {exits} exits; "
                          f"{machine.eventq.cur_tick / 1e12:.6f} s simulated in "
                          f"{host_seconds:.3f} s")
                if timed_out:
                    error = None  # the summary said it; the status says 124
            if not cfg.get("no_summary"):
                for path in machine.checkpoints_taken:
                    _echo_err(f"checkpoint: {path}")
                refused = machine.checkpoints_refused
                if refused:
                    _echo_err(f"warning: {len(refused)} checkpoint(s) refused, the first: "
                              f"{refused[0]}")
            if profile is not None:
                profile.stop()
                _echo_err(profile.report())
            if console.error is not None:
                _echo_err(f"warning: console output to {console_spec} failed: "
                          f"{console.error}; the guest's output after that was lost")
            if error is None and stats_error is not None:
                error = stats_error
    finally:
        terminal.restore()
        console.close()
        if stats_made and os.path.exists(stats_path) and not os.path.getsize(stats_path):
            os.unlink(stats_path)  # made at start-up, and the guest never ran
    if error is not None:
        raise error
    return host_status(status)


def _check_emu_keys(cfg: dict[str, Any]) -> None:
    """The hand-over and instruction-stop options go together only in these ways."""
    has = {k for k in ("switch_at", "emulate_insts", "trace", "max_insts")
           if cfg.get(k) is not None}
    if ("switch_at" in has) != ("emulate_insts" in has):
        raise ConfigError("--switch-at and --emulate-insts go together (when to hand the "
                          "CPU to the emulator, and for how many instructions)")
    if "max_insts" in has and "switch_at" in has:
        raise ConfigError("--max-insts runs the whole budget itself: leave out --switch-at")
    if "trace" in has and not has & {"emulate_insts", "max_insts"}:
        raise ConfigError("--trace records emulated instructions: give --switch-at with "
                          "--emulate-insts, or --max-insts")
    if "switch_at" in has and cfg.get("max_ticks") is not None \
            and cfg["switch_at"] >= cfg["max_ticks"]:
        raise ConfigError("--switch-at must come before --max-ticks")


def _run_machine(machine: Any, cfg: dict[str, Any]) -> Any:
    """The run, with the emulated-CPU options (--switch-at, --max-insts) if given."""
    timeout, max_ticks = cfg.get("timeout"), cfg.get("max_ticks")
    if cfg.get("switch_at") is None and cfg.get("max_insts") is None:
        return machine.run(timeout=timeout, max_ticks=max_ticks)
    from kvmfw.emu import Trace

    trace = Trace(cfg["trace"]) if cfg.get("trace") else None
    try:
        if cfg.get("max_insts") is not None:
            from kvmfw.emu.stop import run_until_instructions

            return run_until_instructions(machine, cfg["max_insts"], trace=trace,
                                          timeout=timeout)
        if cfg["switch_at"]:
            result = machine.run(timeout=timeout, max_ticks=cfg["switch_at"])
            if result.reason != "simulated tick limit reached":
                return result  # the guest ended first
        machine.emulate(cfg["emulate_insts"], trace=trace)
        if machine.stop_requested:  # the guest ended the run while emulated
            return machine_result(machine)
        left = None if max_ticks is None else max(1, max_ticks - machine.eventq.cur_tick)
        return machine.run(timeout=timeout, max_ticks=left)
    finally:
        if trace is not None:
            trace.close()


def machine_result(machine: Any) -> Any:
    from kvmfw.machine import RunResult

    return RunResult(machine.exit_status, machine.exit_reason, machine.eventq.cur_tick, 0.0)


def _make_machine(mc: Any, plugin: Any, arch: str, restore_dir: str | None,
                  options: dict[str, Any]) -> Any:
    """A new machine, or the one saved in checkpoint ``restore_dir`` with the host-side
    ``options`` (console, pseudo-op directory) of this run."""
    from kvmfw.machine import Machine

    if restore_dir is None:
        return Machine(mc, arch_plugin=plugin, arch_name=arch)
    host = {k: v for k, v in options.items()
            if k in ("console_output", "console_input", "pseudo_op_dir")}
    return Machine.restore(restore_dir, options=host)


def _arm_checkpoints(machine: Any, cfg: dict[str, Any], sigs: _Signals) -> None:
    """--checkpoint-dir/-at/-on, --exit-after-checkpoint, --checkpoint-incremental."""
    directory = cfg.get("checkpoint_dir")
    if directory is not None:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create --checkpoint-dir {directory}: "
                              f"{exc.strerror}") from None
    machine.checkpoint_dir = directory
    machine.exit_after_checkpoint = bool(cfg.get("exit_after_checkpoint"))
    machine.checkpoint_incremental = bool(cfg.get("checkpoint_incremental"))
    if cfg.get("checkpoint_limit") is not None:
        machine.checkpoint_limit = cfg["checkpoint_limit"]
    if machine.checkpoint_incremental and cfg.get("restore") is not None:
        from kvmfw.checkpoint.api import track_from_here

        track_from_here(machine)  # the first checkpoint builds on the restored one
    at = cfg.get("checkpoint_at")
    if at is not None:
        tick, period = at
        eq = machine.eventq
        if tick < eq.cur_tick:  # a restored run is past it: the next period, if any
            if period is None:
                _echo_err(f"warning: --checkpoint-at {tick} is before the restored "
                          f"tick {eq.cur_tick}: no checkpoint at it")
                tick = -1
            else:
                tick += -(-(eq.cur_tick - tick) // period) * period

        def take() -> None:
            machine.request_checkpoint()
            if period is not None:
                eq.schedule(ev, eq.cur_tick + period)

        ev = Event(take, "cli.checkpoint-at")
        if tick >= 0:
            eq.schedule(ev, tick)
    name = cfg.get("checkpoint_on") or "SIGUSR1"
    if name != "none" and threading.current_thread() is threading.main_thread():
        signum = getattr(signal, name)
        old = signal.signal(signum, lambda s, f: machine.request_checkpoint())
        sigs._old.setdefault(signum, old)


def _check_embedded_guest_board(machine: Any) -> None:
    """The embedded guest talks to the default board (its UART, its pseudo-op exit):
    without those devices it would spin on a port nobody answers."""
    board = machine.arch_board()
    need = {parse_device_spec(s)[0] for s in board}
    have = {d.name for d in machine.devices}
    missing = sorted(need - have)
    if missing:
        raise ConfigError(f"the embedded guest needs the default board's {', '.join(missing)}"
                          ": drop --no-default-devices (or -o board=), add them with --device, "
                          "or give --kernel FILE")


def _write_stats(machine: Any, path: str) -> None:
    """Every dump of the run (the guest's, then a final one) to ``path``; ``.json`` gives a
    JSON list of dumps, anything else gem5-style text blocks."""
    machine.dump_stats()
    if path.endswith(".json"):
        text = json.dumps(machine.stats_dumps, indent=2, sort_keys=True)
    else:
        text = "".join(machine.stats.format(s) for s in machine.stats_dumps)
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise ConfigError(f"cannot write --stats {path}: {exc.strerror}") from None


def _add_plugin_commands(name: str | None = None) -> None:
    """Add the commands plugins publish under the ``kvmfw.cli`` entry-point group (e.g. the
    x86 plugin's ``kvmfw cpuid``), or only command ``name``; one that fails to load is
    skipped, and ``list-plugins`` still shows the plugin."""
    from kvmfw.plugins import CLI_GROUP, entry_points

    for ep in entry_points(CLI_GROUP):
        if ep.name in cli.commands or (name is not None and ep.name != name):
            continue
        try:
            cmd = ep.load()
        except Exception:  # reported by list-plugins, not fatal here
            continue
        if isinstance(cmd, click.Command):
            cli.add_command(cmd, ep.name)


_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning every error into one line and an exit status.

    As the program itself (the ``kvmfw`` script or ``python -m kvmfw.cli``, ``argv`` None,
    no tracer or profiler attached) it ends the process once the command is done: atexit
    handlers run (logging's flush among them), stdout and stderr are flushed, then
    ``os._exit``. The interpreter's own teardown, freeing every module and object one by
    one, has nothing left to do for the user and costs a tenth of a second here, a second
    or more on a slow (emulated) host: time between the guest's end and the shell prompt.
    Called any other way it raises ``SystemExit`` as usual."""
    code: Any = 0
    try:
        _main(argv)
    except SystemExit as exc:
        if argv is not None or not _is_the_program():
            raise
        code = exc.code
    finally:
        _settle_output()
    if argv is None and _is_the_program():
        _exit_process(code)


def _is_the_program() -> bool:
    """Whether this process is ``kvmfw`` itself: ``__main__`` is the console script or this
    module, and nothing (coverage, cProfile, a debugger) traces it and would want to write
    its results after ``main`` returns."""
    if sys.gettrace() is not None or sys.getprofile() is not None:
        return False
    mon = getattr(sys, "monitoring", None)  # (3.12+: coverage may use sys.monitoring)
    if mon is not None and any(mon.get_tool(i) for i in range(6)):
        return False
    main_mod = sys.modules.get("__main__")
    spec = getattr(main_mod, "__spec__", None)
    if spec is not None and spec.name == "kvmfw.cli":
        return True
    return os.path.basename(str(getattr(main_mod, "__file__", "") or "")) == "kvmfw"


def _exit_process(code: Any) -> None:
    """End the process with ``code`` (a ``SystemExit`` code) without the interpreter's
    teardown, unless a non-daemon thread is still running (the normal exit waits for it)
    or the code is not a status (a message: Python prints it)."""
    status = 0 if code is None else code
    others = [t for t in threading.enumerate()
              if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not isinstance(status, int) or others:
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()  # (what a normal exit runs first: logging.shutdown, coverage, ...)
    _settle_output()
    os._exit(status & 0xFF)  # (what the OS keeps of sys.exit(status) too)


def _settle_output() -> None:
    """Flush stdout and stderr now; one that cannot be written any more (a hung-up
    terminal, a closed pipe) is pointed at /dev/null, or the interpreter's own flush at
    exit would fail and replace the exit status with 120."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError, ValueError):
                fd = os.open(os.devnull, os.O_WRONLY)
                os.dup2(fd, stream.fileno())
                os.close(fd)


def _main(argv: list[str] | None) -> None:
    try:
        cli.main(args=argv, prog_name="kvmfw", standalone_mode=False)
    except click.exceptions.Abort:
        _echo_err("aborted")
        sys.exit(130)
    except _NO_ARGS_IS_HELP as exc:  # plain "kvmfw": the help, as click prints it
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # one line, like every other error
        cmd = exc.ctx.command_path if exc.ctx is not None else "kvmfw"
        _echo_err(f"error: {exc.format_message()} (see {cmd} --help)")
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KvmfwError as exc:
        if os.environ.get("KVMFW_TRACEBACK"):
            raise
        _echo_err(f"error: {exc}")
        if isinstance(exc, GuestError) and exc.dump:
            click.echo(exc.dump, err=True)
        sys.exit(exc.exit_status)
    except KeyboardInterrupt:
        _echo_err("interrupted")
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("KVMFW_TRACEBACK"):
            raise
        _echo_err(f"internal error: {type(exc).__name__}: {exc} (this is a kvmfw bug: "
                  "rerun with KVMFW_TRACEBACK=1 and report it)")
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()

"""``kvmfw run``: its options, their parser, and the run itself (check, build, run, end).

Nothing here imports click: ``kvmfw run`` is what users start over and over, and on a slow
(emulated) host click's import alone is a fifth of a second before the guest's first
instruction. :data:`OPTIONS` is the one list of run options; :mod:`kvmfw.cli.commands`
builds the click command (``kvmfw run --help``, errors) from it, and :func:`parse` reads
the command lines it can read exactly as click would, handing every other one to click.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import sys
import termios
import threading
import time
from typing import Any

from kvmfw import debug
from kvmfw.config import (
    Source,
    check_arch_host,
    check_restore_keys,
    check_run_config,
    host_status,
    parse_options,
)
from kvmfw.device import parse_device_spec
from kvmfw.entry import resume as resume_gc
from kvmfw.errors import ConfigError, ImageError, KvmfwError, RunTimeoutError, StoppedBySignal
from kvmfw.eventq import Event
from kvmfw.record import Frozen


def echo_err(text: str) -> None:
    """``kvmfw: text`` on stderr; a hung-up terminal must not turn an ending into a bug."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"kvmfw: {text}\n")
        sys.stderr.flush()


# --- the options -------------------------------------------------------------------------

class Option(Frozen):
    """One ``kvmfw run`` option. ``kind``: ``value`` (a string; the last one given wins),
    ``flag`` (True when given, else None) or ``multi`` (repeatable: a tuple)."""

    flags: tuple[str, ...]
    dest: str
    kind: str
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None


OPTIONS: tuple[Option, ...] = (
    Option(("--arch",), "arch", "value", "Architecture plugin (default: the host's; KVM runs "
           "only the host's own architecture)."),
    Option(("--kernel",), "kernel", "value", "Guest image: multiboot/ELF, Linux bzImage or "
           "Image, or a flat binary with --load-addr. Default: the embedded guest."),
    Option(("--load-addr",), "load_addr", "value", "Load address of a flat binary."),
    Option(("--initrd",), "initrd", "value",
           "Initial ramdisk (multiboot module 0 for multiboot)."),
    Option(("--cmdline",), "cmdline", "value", "Kernel command line."),
    Option(("--memory", "-m"), "memory", "value", "Guest RAM, e.g. 256M or 1G; a bare number "
           "is MiB as in QEMU (default 256M; at most the host's RAM).", "SIZE"),
    Option(("--cpus",), "cpus", "value", "Number of vCPUs (default 1; at most what KVM and "
           "the arch allow: see kvmfw info).", "N"),
    Option(("--device",), "device", "multi",
           "Add a device to the board: NAME,key=value,... (repeatable)."),
    Option(("--config",), "config_path", "value", "TOML file with the same keys (relative "
           "paths in it are relative to the file)."),
    Option(("--console",), "console", "value", "stdio (default), file:PATH or none."),
    Option(("--stats",), "stats", "value", "Write statistics to FILE (.json for JSON) at "
           "every ending, also timeouts and signals."),
    Option(("--debug-flags",), "debug_flags", "value",
           "Comma-separated debug flags (see --help-flags) or kvmfw.* logger names."),
    Option(("--timeout",), "timeout", "value",
           "Stop after this many host seconds (> 0; status 124).", "SECONDS"),
    Option(("--max-ticks",), "max_ticks", "value",
           "Stop after this many simulated ticks (1 ps; >= 1).", "TICKS"),
    Option(("--unclaimed",), "unclaimed", "value",
           "What to do with accesses no device claims (default ignore).",
           choices=("ignore", "fatal")),
    Option(("--always-sync",), "always_sync", "flag",
           "Sync all state around every entry (debug aid, slow)."),
    Option(("--host-factor",), "host_factor", "value",
           "Simulated/host time scale, 1e-06..1e+06 (default 1.0).", "FACTOR"),
    Option(("--no-default-devices",), "no_default_devices", "flag",
           "Start from an empty board: only the --device list."),
    Option(("--no-reboot",), "no_reboot", "flag", "A guest reset (reboot, triple fault) ends "
           "the run instead of rebooting the machine (QEMU's -no-reboot; the default is to "
           "reboot, as QEMU)."),
    Option(("--no-summary",), "no_summary", "flag", "No stats summary on stderr."),
    Option(("--fw-cfg",), "fw_cfg", "multi",
           "Add a fw_cfg blob: name=opt/x,file=PATH or name=opt/x,string=TEXT."),
    Option(("--pseudo-op-dir",), "pseudo_op_dir", "value",
           "Existing directory the pseudo-op device may read and write host files in."),
    Option(("--option", "-o"), "option", "multi", "Arch/device machine option KEY=VALUE "
           "(e.g. irqchip=userspace, acpi=on); unknown names are refused."),
    Option(("--gdb",), "gdb", "value", "Listen for GDB on tcp::PORT (127.0.0.1; "
           "tcp:0.0.0.0:PORT for every interface)."),
    Option(("-s",), "gdb_default", "flag", "Shorthand for --gdb tcp::1234."),
    Option(("--gdb-wait", "-S"), "gdb_wait", "flag", "Wait for GDB to attach and continue "
           "before the first instruction (implies -s without --gdb)."),
    Option(("--checkpoint-at",), "checkpoint_at", "value", "Take a checkpoint at simulated "
           "tick TICK (then every PERIOD ticks); the run continues unless "
           "--exit-after-checkpoint.", "TICK[,PERIOD]"),
    Option(("--checkpoint-on",), "checkpoint_on", "value", "Take a checkpoint when kvmfw "
           "receives SIGNAL (SIGUSR1 (default), SIGUSR2 or none).", "SIGNAL"),
    Option(("--checkpoint-dir",), "checkpoint_dir", "value", "Where checkpoints go, one "
           "cpt.<tick> directory each (default: the current directory; created if "
           "missing).", "DIR"),
    Option(("--exit-after-checkpoint",), "exit_after_checkpoint", "flag",
           "End the run (status 0) after the first checkpoint."),
    Option(("--checkpoint-incremental",), "checkpoint_incremental", "flag",
           "Checkpoints after the first store only the pages changed since the previous "
           "one (a chain; restore needs every link)."),
    Option(("--checkpoint-limit",), "checkpoint_limit", "value", "At most N checkpoints "
           "asked for during the run (tick, signal, guest; default 1000); those past it, or "
           "with under 256 MiB free, are refused with a warning and the run goes on.", "N"),
    Option(("--restore",), "restore", "value", "Continue the guest saved in checkpoint DIR "
           "(machine, devices and guest come from it; host options such as --console, "
           "--timeout, --stats and --checkpoint-dir may be given anew).", "DIR"),
    Option(("--trust-host-files",), "trust_host_files", "flag", "With --restore: restore "
           "even when a device's host file (a disk image) changed since the checkpoint "
           "(refused by default: the guest's RAM holds its view of the file)."),
    Option(("--profile",), "profile", "flag", "At the end, a table of exits by reason and "
           "device with their host time, sync and timer costs, the busiest ports and "
           "addresses, and KVM's own counters (every exit, the ones the kernel handled "
           "itself included) (stderr)."),
    Option(("--switch-at",), "switch_at", "value", "Hand vCPU 0 to the emulated CPU "
           "(Unicorn) at simulated tick TICKS for --emulate-insts instructions, then back "
           "to KVM (needs kvmfw[emu]).", "TICKS"),
    Option(("--emulate-insts",), "emulate_insts", "value",
           "Instructions to emulate at --switch-at (exact; fewer before hlt/wfi).", "N"),
    Option(("--trace",), "trace", "value", "Write every emulated instruction (address, "
           "bytes, disassembly) to FILE.", "FILE"),
    Option(("--max-insts",), "max_insts", "value", "Stop after exactly N guest instructions "
           "of vCPU 0 (status 0; counted by the emulated CPU without a PMU: see the stats "
           "group system.cpu0.insts).", "N"),
    Option(("--help-flags",), "help_flags", "flag", "List the debug flags and exit."),
)

HELP = """Boot a guest and run it until it exits.

    Exit status: the guest's (see README: debug-exit gives (v << 1) | 1; values above 255
    keep their low 8 bits, and never 0 for a nonzero status), 2 bad configuration,
    3 no usable /dev/kvm, 4 plugin, 5 guest error, 6 device/bus, 7 bad image,
    8 arm64 feature missing, 9 checkpoint refused or not written, 70 kvmfw bug,
    124 host timeout, 128+N signal N (129 SIGHUP, 130 SIGINT, 143 SIGTERM).
    """

_BY_FLAG = {flag: opt for opt in OPTIONS for flag in opt.flags}


def parse(args: list[str]) -> dict[str, Any] | None:
    """The options of ``args`` (what follows ``run``) as click would give them to the
    command: every dest, None or () when absent. None when the line is anything but plain
    ``--name value``, ``--name=value``, ``-x value`` and flags (help, an unknown or misspelt
    option, a missing value, a value that looks like an option, a bad choice, bundled short
    flags): click then reads it and says what is wrong, as it always did."""
    opts: dict[str, Any] = {o.dest: [] if o.kind == "multi" else None for o in OPTIONS}
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=") if args[i][:2] == "--" else (args[i], "", "")
        i += 1
        opt = _BY_FLAG.get(name)
        if opt is None:
            return None
        if opt.kind == "flag":
            if eq:
                return None
            opts[opt.dest] = True
            continue
        if not eq:
            if i == len(args) or args[i][:1] == "-":
                return None
            value = args[i]
            i += 1
        if opt.choices is not None and value not in opt.choices:
            return None
        if opt.kind == "multi":
            opts[opt.dest].append(value)
        else:
            opts[opt.dest] = value
    return {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}


def command(opts: dict[str, Any]) -> None:
    """``kvmfw run`` with the options :func:`parse` (or click) gave; ends with
    ``sys.exit(status)``."""
    opts = dict(opts)
    config_path, help_flags = opts.pop("config_path"), opts.pop("help_flags")
    if help_flags:
        for name, (logger, text) in debug.FLAGS.items():
            print(f"{name:<12} {text} ({logger})")
        for name, members in debug.COMPOUND.items():
            print(f"{name:<12} = {','.join(members)}")
        print("kvmfw.NAME   any logger by name, e.g. a plugin's: kvmfw.x86.vmlinux (the "
              "kernel's KASLR layout and its seed)")
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


# --- the run -----------------------------------------------------------------------------

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
    if cfg.get("trust_host_files") and restore_dir is None:
        raise ConfigError("--trust-host-files applies to --restore DIR (a checkpoint's disk "
                          "images): give both, or neither")
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
            and not os.path.isfile(cfg["initrd"]):
        raise ImageError(f"initrd {cfg['initrd']} does not exist or is not a file")
    kernel = cfg.get("kernel")
    if kernel is not None and not os.path.isfile(kernel):
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
        with _Signals() as sigs, _make_machine(mc, plugin, arch, restore_dir, options,
                                               bool(cfg.get("trust_host_files"))) as machine:
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
            resume_gc()  # (the start-up is over: kvmfw.entry)
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
                echo_err(f"{reason}; {shown}; {exits} exits; "
                          f"{machine.eventq.cur_tick / 1e12:.6f} s simulated in "
                          f"{host_seconds:.3f} s")
                if timed_out:
                    error = None  # the summary said it; the status says 124
            if not cfg.get("no_summary"):
                for path in machine.checkpoints_taken:
                    echo_err(f"checkpoint: {path}")
                refused = machine.checkpoints_refused
                if refused:
                    echo_err(f"warning: {len(refused)} checkpoint(s) refused, the first: "
                              f"{refused[0]}")
            if profile is not None:
                profile.stop()
                echo_err(profile.report())
            if console.error is not None:
                echo_err(f"warning: console output to {console_spec} failed: "
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
                  options: dict[str, Any], trust: bool = False) -> Any:
    """A new machine, or the one saved in checkpoint ``restore_dir`` with the host-side
    ``options`` (console, pseudo-op directory) of this run (``trust``: even when a disk
    image changed since the checkpoint)."""
    from kvmfw.machine import Machine

    if restore_dir is None:
        return Machine(mc, arch_plugin=plugin, arch_name=arch)
    host = {k: v for k, v in options.items()
            if k in ("console_output", "console_input", "pseudo_op_dir")}
    return Machine.restore(restore_dir, options=host, trust_host_files=trust)


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
                echo_err(f"warning: --checkpoint-at {tick} is before the restored "
                          f"tick {eq.cur_tick}: no checkpoint at it")
                tick = -1
            else:
                tick += -(-(eq.cur_tick - tick) // period) * period

        def take() -> None:
            machine.request_checkpoint()
            # Past the limit every later request would be refused: say it once (this
            # request's refusal) and stop firing, so a short period costs the run nothing.
            if period is not None and \
                    len(machine.checkpoints_taken) < machine.checkpoint_limit:
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
        import json  # here: a run without --stats FILE.json does not need it

        text = json.dumps(machine.stats_dumps, indent=2, sort_keys=True)
    else:
        text = "".join(machine.stats.format(s) for s in machine.stats_dumps)
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise ConfigError(f"cannot write --stats {path}: {exc.strerror}") from None


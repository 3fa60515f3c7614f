"""The ``kvmfw`` command: ``run``, ``list-plugins``, ``info``.

Every error reaches the user as one line (``kvmfw: error: ...``) with a distinct exit
status per cause, plus a register dump for guest errors; never a traceback (set
``KVMFW_TRACEBACK=1`` to see one when reporting a bug).
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import click

from kvmfw import __version__, debug
from kvmfw.errors import ConfigError, GuestError, ImageError, KvmfwError

EXIT_INTERNAL = 70

_SIZE = re.compile(r"^\s*(0x[0-9a-fA-F]+|\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")


def parse_size(text: str | int) -> int:
    """``256M``, ``1G``, ``4096``, ``0x100000`` -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"not a size: {text!r} (use e.g. 256M, 1G, 65536)")
    value = int(m.group(1), 0)
    return value << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


def _echo_err(text: str) -> None:
    click.echo(f"kvmfw: {text}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvmfw")
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
    from kvmfw.kvm import Kvm
    from kvmfw.plugins import host_arch
    from kvmfw.timer import probe_perf

    with Kvm(kvm_path) as kvm:
        caps = kvm.capabilities()
        perf = probe_perf()
        data: dict[str, Any] = {
            "kvm_path": kvm_path,
            "module": kvm.module,
            "api_version": constants.KVM_API_VERSION,
            "vcpu_mmap_size": kvm.vcpu_mmap_size,
            "max_vcpus": kvm.max_vcpus,
            "recommended_vcpus": kvm.recommended_vcpus,
            "max_vcpu_id": kvm.max_vcpu_id,
            "memory_slots": kvm.nr_memslots,
            "coalesced_mmio_page": kvm.coalesced_mmio_page,
            "host": {"arch": host_arch(), "machine": platform.machine(),
                     "kernel": platform.release()},
            "perf": {"available": perf.available, "reason": perf.reason},
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
    h = data["host"]
    click.echo(f"{'host':<20} {h['arch']} ({h['machine']}, Linux {h['kernel']})")
    click.echo(f"{'perf':<20} {'available' if perf.available else 'unavailable'}: "
               f"{perf.reason}")
    click.echo(f"{'time source':<20} {data['time_source']}")
    supported = {k: v for k, v in caps.items() if v}
    click.echo(f"\ncapabilities: {len(supported)} of {len(caps)} supported")
    for name, value in caps.items():
        click.echo(f"  {name:<36} {value if value else 'no'}")


# --- run -----------------------------------------------------------------------------

_RUN_KEYS = ("arch", "kernel", "load_addr", "initrd", "cmdline", "memory", "cpus", "device",
             "console", "stats", "debug_flags", "timeout", "max_ticks", "unclaimed",
             "always_sync", "no_summary", "no_default_devices", "host_factor", "fw_cfg",
             "pseudo_op_dir", "option", "gdb", "gdb_default", "gdb_wait")


def _load_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    data = {k.replace("-", "_"): v for k, v in data.get("run", data).items()}
    if "devices" in data:
        data["device"] = data.pop("devices")
    unknown = sorted(set(data) - set(_RUN_KEYS))
    if unknown:
        raise ConfigError(f"config {path}: unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(_RUN_KEYS)})")
    return data


def _console(spec: str) -> Any:
    if spec == "stdio":
        return sys.stdout.buffer
    if spec == "none":
        return open(os.devnull, "wb")  # noqa: SIM115 - closed with the machine's devices
    if spec.startswith("file:"):
        try:
            return open(spec[5:], "wb")  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(f"--console {spec}: {exc.strerror}") from None
    raise ConfigError(f"--console must be stdio, none or file:PATH, not {spec!r}")


@cli.command("run")
@click.option("--arch", help="Architecture plugin (default: the host's).")
@click.option("--kernel", type=str, help="Guest image: multiboot/ELF, Linux bzImage or Image, "
              "or a flat binary with --load-addr. Default: the embedded guest.")
@click.option("--load-addr", type=str, help="Load address of a flat binary.")
@click.option("--initrd", type=str, help="Initial ramdisk (multiboot module 0 for multiboot).")
@click.option("--cmdline", type=str, help="Kernel command line.")
@click.option("--memory", "-m", type=str, help="Guest RAM, e.g. 256M (default 256M).")
@click.option("--cpus", type=int, help="Number of vCPUs (default 1).")
@click.option("--device", multiple=True,
              help="Add a device to the board: NAME,key=value,... (repeatable).")
@click.option("--config", "config_path", type=str, help="TOML file with the same keys.")
@click.option("--console", type=str, help="stdio (default), file:PATH or none.")
@click.option("--stats", type=str, help="Write statistics to FILE (.json for JSON).")
@click.option("--debug-flags", type=str, help="Comma-separated debug flags (see --help-flags).")
@click.option("--timeout", type=float, help="Stop after this many host seconds (status 124).")
@click.option("--max-ticks", type=int, help="Stop after this many simulated ticks (1 ps).")
@click.option("--unclaimed", type=click.Choice(["ignore", "fatal"]),
              help="What to do with accesses no device claims (default ignore).")
@click.option("--always-sync", is_flag=True, default=None,
              help="Sync all state around every entry (debug aid, slow).")
@click.option("--host-factor", type=float, help="Simulated/host time scale (default 1.0).")
@click.option("--no-default-devices", is_flag=True, default=None,
              help="Start from an empty board: only the --device list.")
@click.option("--no-summary", is_flag=True, default=None, help="No stats summary on stderr.")
@click.option("--fw-cfg", multiple=True,
              help="Add a fw_cfg blob: name=opt/x,file=PATH or name=opt/x,string=TEXT.")
@click.option("--pseudo-op-dir", type=str,
              help="Directory the pseudo-op device may read and write host files in.")
@click.option("--option", "-o", multiple=True,
              help="Arch/device machine option KEY=VALUE (e.g. irqchip=userspace, acpi=on).")
@click.option("--gdb", type=str, help="Listen for GDB on tcp::PORT (127.0.0.1; "
              "tcp:0.0.0.0:PORT for every interface).")
@click.option("-s", "gdb_default", is_flag=True, default=None,
              help="Shorthand for --gdb tcp::1234.")
@click.option("--gdb-wait", "-S", "gdb_wait", is_flag=True, default=None,
              help="Wait for GDB to attach and continue before the first instruction "
              "(implies -s without --gdb).")
@click.option("--help-flags", is_flag=True, help="List the debug flags and exit.")
def run_cmd(config_path: str | None, help_flags: bool, **opts: Any) -> None:
    """Boot a guest and run it until it exits."""
    if help_flags:
        for name, (logger, text) in debug.FLAGS.items():
            click.echo(f"{name:<12} {text} ({logger})")
        for name, members in debug.COMPOUND.items():
            click.echo(f"{name:<12} = {','.join(members)}")
        return
    cfg = _load_config(config_path)
    for k, v in opts.items():
        if k in ("device", "fw_cfg", "option"):
            if v:
                cfg[k] = list(cfg.get(k, [])) + list(v)
        elif v is not None:
            cfg[k] = v
    sys.exit(_run(cfg))


def _run(cfg: dict[str, Any]) -> int:
    from kvmfw.machine import Machine, MachineConfig

    if cfg.get("debug_flags"):
        debug.enable(cfg["debug_flags"])
    console_spec = cfg.get("console", "stdio")
    console = _console(console_spec)
    options: dict[str, Any] = {"console_output": console}
    if console_spec == "stdio":
        options["console_input"] = "stdin"  # the terminal, in raw mode; Ctrl-A x quits
    for k in ("cmdline", "initrd", "fw_cfg", "pseudo_op_dir"):
        if cfg.get(k) is not None:
            options[k] = cfg[k]
    for item in cfg.get("option", []):
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
        options[key.strip().replace("-", "_")] = value.strip()
    if cfg.get("load_addr") is not None:
        try:
            options["load_addr"] = int(str(cfg["load_addr"]), 0)
        except ValueError:
            raise ConfigError(f"--load-addr {cfg['load_addr']!r} is not a number") from None
    if cfg.get("initrd") and not Path(cfg["initrd"]).is_file():
        raise ImageError(f"initrd {cfg['initrd']} does not exist or is not a file")
    mc = MachineConfig(
        arch=cfg.get("arch"),
        memory=parse_size(cfg.get("memory", "256M")),
        cpus=int(cfg.get("cpus", 1)),
        devices=list(cfg.get("device", [])),
        default_devices=not cfg.get("no_default_devices", False),
        unclaimed=cfg.get("unclaimed", "ignore"),
        always_sync=bool(cfg.get("always_sync", False)),
        host_factor=float(cfg.get("host_factor", 1.0)),
        options=options,
    )
    with Machine(mc) as machine:
        kernel = cfg.get("kernel")
        if kernel is None:
            kernel = machine.hooks.call("default_guest", machine=machine)
            if kernel is None:
                raise ConfigError(f"the {machine.arch} plugin has no embedded guest: "
                                  "give one with --kernel FILE")
        elif not Path(kernel).is_file():
            raise ImageError(f"kernel {kernel} does not exist or is not a file")
        machine.load_guest(str(kernel), **options)
        gdb_spec = cfg.get("gdb") or ("tcp::1234" if cfg.get("gdb_default") or
                                      cfg.get("gdb_wait") else None)
        if gdb_spec:
            from kvmfw.gdb import parse_endpoint

            host, port = parse_endpoint(str(gdb_spec))
            machine.start_gdb(port, host, wait=bool(cfg.get("gdb_wait")))
        result = machine.run(timeout=cfg.get("timeout"), max_ticks=cfg.get("max_ticks"),
                             hard_timeout=True)
        console.flush()
        if machine.gdb is not None:
            machine.gdb.close(result.status)  # GDB sees the guest exit with its status
        if cfg.get("stats"):
            _write_stats(machine, str(cfg["stats"]))
        if not cfg.get("no_summary"):
            exits = sum(c.stats.vm_exits for c in machine.cpus)
            _echo_err(f"{result.reason}; status {result.status}; {exits} exits; "
                      f"{result.sim_seconds:.6f} s simulated in {result.host_seconds:.3f} s")
        return result.status


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


def _add_plugin_commands() -> None:
    """Commands plugins publish under the ``kvmfw.cli`` entry-point group (e.g. the x86
    plugin's ``kvmfw cpuid``); one that fails to load is skipped, and ``list-plugins``
    still shows the plugin."""
    import importlib.metadata

    for ep in importlib.metadata.entry_points(group="kvmfw.cli"):
        if ep.name in cli.commands:
            continue
        try:
            cmd = ep.load()
        except Exception:  # reported by list-plugins, not fatal here
            continue
        if isinstance(cmd, click.Command):
            cli.add_command(cmd, ep.name)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning every error into one line and an exit status."""
    try:
        _add_plugin_commands()
        cli.main(args=argv, prog_name="kvmfw", standalone_mode=False)
    except click.exceptions.Abort:
        _echo_err("aborted")
        sys.exit(130)
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

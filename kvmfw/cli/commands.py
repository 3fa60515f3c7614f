"""The click application of ``kvmfw``: every command and its ``--help``.

``kvmfw run`` is built from :data:`kvmfw.cli.run.OPTIONS`; a plain ``kvmfw run ...`` does not
come here at all (see :mod:`kvmfw.cli`). Plugins add commands under the ``kvmfw.cli``
entry-point group.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from kvmfw import __version__
from kvmfw.cli import run as run_
from kvmfw.cli.run import echo_err
from kvmfw.config import vcpu_limit
from kvmfw.errors import ConfigError


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

# --- run -------------------------------------------------------------------------------

def _with_run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``f`` with a click option for each of :data:`kvmfw.cli.run.OPTIONS`, in order."""
    for o in reversed(run_.OPTIONS):
        kw: dict[str, Any] = {"help": o.help}
        if o.metavar is not None:
            kw["metavar"] = o.metavar
        if o.kind == "flag":
            kw.update(is_flag=True, default=None)
        elif o.kind == "multi":
            kw["multiple"] = True
        else:
            kw["type"] = click.Choice(list(o.choices)) if o.choices else str
        f = click.option(*o.flags, o.dest, **kw)(f)
    return f


@cli.command("run", help=run_.HELP)
@_with_run_options
def run_cmd(**opts: Any) -> None:
    run_.command(opts)


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
        progress=not no_progress, echo=echo_err)


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


def invoke(args: list[str]) -> None:
    """Run the click application on ``args``; click's own errors become one line and an
    exit status (:func:`kvmfw.cli.main` reports the rest)."""
    try:
        cli.main(args=args, prog_name="kvmfw", standalone_mode=False)
    except click.exceptions.Abort:
        echo_err("aborted")
        sys.exit(130)
    except _NO_ARGS_IS_HELP as exc:  # plain "kvmfw": the help, as click prints it
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # one line, like every other error
        cmd = exc.ctx.command_path if exc.ctx is not None else "kvmfw"
        echo_err(f"error: {exc.format_message()} (see {cmd} --help)")
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)

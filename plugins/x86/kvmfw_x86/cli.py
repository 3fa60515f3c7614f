"""``kvmfw cpuid``: print the CPUID table the guest will see (a click command).

The core's CLI adds it (``kvmfw.cli`` entry point group); it also runs on its own:
``python -m kvmfw_x86.cli --vendor GenuineIntel --mask avx512f``.
"""

from __future__ import annotations

import json

import click

from kvmfw_x86.cpuid import CpuidModel, guest_cpuid
from kvmfw_x86.cpuid import format_table as _format


@click.command("cpuid")
@click.option("--vendor", help="12-character vendor string (e.g. GenuineIntel)")
@click.option("--family", type=lambda s: int(s, 0), help="CPU family")
@click.option("--model", "model_", type=lambda s: int(s, 0), help="CPU model")
@click.option("--stepping", type=lambda s: int(s, 0), help="CPU stepping")
@click.option("--mask", multiple=True, help="feature to hide (repeatable or comma-separated)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--kvm", "kvm_path", default="/dev/kvm", show_default=True)
def cpuid(vendor: str | None, family: int | None, model_: int | None, stepping: int | None,
          mask: tuple[str, ...], as_json: bool, kvm_path: str) -> None:
    """Print the CPUID table an x86 guest will see (KVM's supported set, or a model)."""
    names = [n for m in mask for n in m.split(",") if n]
    model = CpuidModel(vendor, family, model_, stepping, None, names) \
        if (vendor or family is not None or model_ is not None or stepping is not None
            or names) else None
    entries = guest_cpuid(model, kvm_path)
    if as_json:
        click.echo(json.dumps([vars(e) for e in entries], indent=1))
    else:
        click.echo(_format(entries))


if __name__ == "__main__":  # pragma: no cover
    cpuid()

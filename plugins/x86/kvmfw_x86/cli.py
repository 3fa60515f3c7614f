"""``kvmfw cpuid``: print the CPUID table the guest will see (a click command).

The core's CLI adds it (``kvmfw.cli`` entry point group); it also runs on its own:
``python -m kvmfw_x86.cli --vendor GenuineIntel --mask avx512f``.
"""

from __future__ import annotations

import json
from typing import Any

import click

from kvmfw_x86.cpuid import CpuidModel, guest_cpuid
from kvmfw_x86.cpuid import format_table as _format


class _Field(click.ParamType):
    """A CPUID leaf 1 field: decimal or 0x-hex, within what EAX can encode."""

    name = "integer"

    def __init__(self, high: int, why: str) -> None:
        self.high = high
        self.why = why

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        try:
            n = value if isinstance(value, int) else int(str(value), 0)
        except ValueError:
            self.fail(f"{value!r} is not a number (decimal or 0x-hex)", param, ctx)
        if not 0 <= n <= self.high:
            self.fail(f"{value} is outside 0..{self.high:#x} ({self.why})", param, ctx)
        return n


@click.command("cpuid")
@click.option("--vendor", help="12-character vendor string (e.g. GenuineIntel)")
@click.option("--family", type=_Field(0x10E, "base family 0xf plus an 8-bit extended family"),
              help="CPU family, 0..0x10e")
@click.option("--model", "model_", type=_Field(0xFF, "4-bit model, 4-bit extended model"),
              help="CPU model, 0..0xff")
@click.option("--stepping", type=_Field(0xF, "a 4-bit field"), help="CPU stepping, 0..0xf")
@click.option("--mask", multiple=True, help="feature to hide (repeatable or comma-separated)")
@click.option("--hyperv", help="Hyper-V enlightenments, comma-separated, or all "
              "(kvmfw_x86.hyperv)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--kvm", "kvm_path", default="/dev/kvm", show_default=True)
def cpuid(vendor: str | None, family: int | None, model_: int | None, stepping: int | None,
          mask: tuple[str, ...], hyperv: str | None, as_json: bool, kvm_path: str) -> None:
    """Print the CPUID table an x86 guest will see (KVM's supported set, or a model)."""
    from kvmfw_x86.hyperv import expand

    names = [n for m in mask for n in m.split(",") if n]
    hv = [h.strip().lower() for h in (hyperv or "").split(",") if h.strip()]
    expand(hv)
    model = CpuidModel(vendor, family, model_, stepping, None, names, hv) \
        if (vendor or family is not None or model_ is not None or stepping is not None
            or names or hv) else None
    entries = guest_cpuid(model, kvm_path)
    if as_json:
        click.echo(json.dumps([vars(e) for e in entries], indent=1))
    else:
        click.echo(_format(entries))


if __name__ == "__main__":  # pragma: no cover
    cpuid()

"""The core of the emulated CPU (kvmfw.emu) without an arch plugin: the protocol's refusals,
the trace format, the optional dependency, the stats and the CLI keys. The hand-overs
themselves run real guests in plugins/x86/tests/test_handover*.py and
plugins/armv8/tests/test_handover_glue.py (they need an arch's glue)."""

from __future__ import annotations

import io
import sys

import pytest

from kvmfw import hookspecs
from kvmfw.config import MAX_INSTS, Source, check_run_config
from kvmfw.emu import (
    EmulatedCPU,
    EmuUnavailableError,
    HandoverError,
    Trace,
    TraceRecord,
    _runs,
    emulate,
    require_unicorn,
)
from kvmfw.errors import ConfigError, StateError


def test_page_runs() -> None:
    assert _runs([]) == []
    assert _runs([1, 2, 3, 7, 9, 10]) == [(1, 3), (7, 1), (9, 2)]


def test_trace_record_line() -> None:
    rec = TraceRecord(5, 0x1000, b"\x31\xdb", "xor ebx, ebx", {"rax": 1})
    assert str(rec) == (f"{5:>10} 0x0000000000001000: 31 db{' ' * 20}xor ebx, ebx"
                        "  ; rax=0x1")


def test_trace_to_file_and_callback() -> None:
    pytest.importorskip("capstone", reason="the trace needs the 'emu' extra (capstone)")
    buf = io.StringIO()
    got: list[TraceRecord] = []
    tr = Trace(buf, callback=got.append)
    rec = TraceRecord(0, 0x10, b"\x90", "nop")
    tr.emit(rec)
    tr.close()
    assert got == [rec] and tr.records == 1 and buf.getvalue().endswith("nop\n")


def test_missing_unicorn_is_a_state_error_saying_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "unicorn", None)  # import unicorn -> ImportError
    with pytest.raises(EmuUnavailableError, match=r"kvmfw\[emu\]") as ei:
        require_unicorn()
    assert isinstance(ei.value, StateError)


def test_hookspecs_are_documented() -> None:
    for name in ("emu_glue", "emu_started"):
        fn = getattr(hookspecs, name)
        assert fn.__doc__ and len(fn.__doc__) > 80
    assert hookspecs.emu_glue.kvmfw_spec["firstresult"] is True  # type: ignore[attr-defined]
    assert not hookspecs.emu_started.kvmfw_spec["firstresult"]  # type: ignore[attr-defined]


def test_an_arch_without_glue_refuses_and_changes_nothing(make_machine) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("unicorn", reason="the emulated CPU needs the 'emu' extra (unicorn)")
    m, _, _ = make_machine(1)
    emu = EmulatedCPU(m)
    with pytest.raises(HandoverError, match="no emulated CPU"):
        emu.take_over_from(m.cpus[0])
    assert emu.cpu is None and not m.cpus[0].switched_out
    with pytest.raises(HandoverError, match="take_over_from first"):
        emu.run(1)
    with pytest.raises(StateError, match="no vcpu 3"):
        emulate(m, 1, cpu=3)


def test_until_instructions_bounds(make_machine) -> None:  # type: ignore[no-untyped-def]
    m, _, _ = make_machine(1)
    for bad in (-1, MAX_INSTS + 1, True, 1.5):
        with pytest.raises(ConfigError, match="instruction limit"):
            m.run(until_instructions=bad)  # type: ignore[arg-type]
    m2, _, _ = make_machine(1, cpus=2)
    with pytest.raises(ConfigError, match="single vCPU"):
        m2.run(until_instructions=10)


@pytest.mark.parametrize("key, value, msg", [
    ("switch_at", -1, "between 0"), ("emulate_insts", 0, "between 1"),
    ("max_insts", MAX_INSTS + 1, "between 0"), ("max_insts", "x", "whole number"),
    ("trace", "/proc/self/status", "kernel interface"),
])
def test_cli_keys_are_checked(key: str, value: object, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        check_run_config({key: value}, set(), Source(None))


def test_cli_keys_accepted() -> None:
    out = check_run_config({"switch_at": 5, "emulate_insts": 3, "max_insts": 0}, set(),
                           Source(None))
    assert out == {"switch_at": 5, "emulate_insts": 3, "max_insts": 0}

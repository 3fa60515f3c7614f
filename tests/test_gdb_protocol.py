"""The GDB remote protocol's framing, the endpoint syntax and target descriptions."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmfw.errors import ConfigError
from kvmfw.gdb import Feature, GdbTarget, Reg, parse_endpoint
from kvmfw.gdb.protocol import MAX_PACKET, PacketReader, Received, checksum, escape, frame, unescape


def feed(data: bytes, chunk: int = 0) -> list[Received]:
    r = PacketReader()
    if not chunk:
        return list(r.feed(data))
    out: list[Received] = []
    for i in range(0, len(data), chunk):
        out += r.feed(data[i:i + chunk])
    return out


def test_frame_and_checksum_match_gdbs_examples() -> None:
    assert frame(b"OK") == b"$OK#9a"
    assert frame(b"") == b"$#00"
    assert checksum(b"qSupported") == 0x37
    assert feed(b"$qSupported#37") == [Received("packet", b"qSupported")]


def test_acks_interrupts_and_noise_between_packets() -> None:
    items = feed(b"+-\x03junk$g#67+")
    assert [i.kind for i in items] == ["ack", "nak", "interrupt", "packet", "ack"]
    assert items[3].data == b"g"


def test_a_bad_checksum_or_a_bad_checksum_digit_is_reported_not_raised() -> None:
    assert feed(b"$g#68") == [Received("bad", b"g")]
    assert feed(b"$g#zz")[0].kind == "bad"


def test_an_overlong_packet_is_dropped_without_buffering_it() -> None:
    reader = PacketReader()
    items = list(reader.feed(b"$" + b"a" * (3 * MAX_PACKET) + b"#00"))
    assert [i.kind for i in items] == ["bad"]
    assert len(reader._buf) == 0
    assert list(reader.feed(b"$g#67")) == [Received("packet", b"g")]  # and it recovers


def test_escapes_round_trip_in_binary_data() -> None:
    data = b"a$b#c}d*e"
    esc = escape(data)
    assert b"$" not in esc and b"#" not in esc and b"*" not in esc
    assert unescape(esc) == data
    assert unescape(b"ab}") == b"ab"  # a dangling escape is dropped, not an error


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=17))
def test_any_payload_survives_framing_in_any_chunking(payload: bytes, chunk: int) -> None:
    items = feed(frame(payload), chunk)
    assert len(items) == 1 and items[0].kind == "packet"
    assert unescape(items[0].data) == payload


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    for item in feed(data, 7):
        assert item.kind in ("packet", "bad", "ack", "nak", "interrupt")
        assert len(item.data) <= MAX_PACKET + 3


@pytest.mark.parametrize(("spec", "want"), [
    ("tcp::1234", ("127.0.0.1", 1234)), ("tcp:0.0.0.0:5000", ("0.0.0.0", 5000)),
    (":99", ("127.0.0.1", 99)), ("1234", ("127.0.0.1", 1234)), ("tcp::0", ("127.0.0.1", 0))])
def test_endpoints_in_qemus_spelling(spec: str, want: tuple[str, int]) -> None:
    assert parse_endpoint(spec) == want


@pytest.mark.parametrize("spec", ["tcp::", "tcp::x", "tcp::70000", "udp:1", "tcp::-1"])
def test_bad_endpoints_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError, match="--gdb"):
        parse_endpoint(spec)


def test_target_xml_numbers_registers_in_order_and_is_well_formed() -> None:
    t = GdbTarget("test-arch", (
        Feature("org.test.core", (Reg("r0", 64), Reg("pc", 64, "code_ptr")),
                '<flags id="f" size="4"><field name="Z" start="0" end="0"/></flags>'),
        Feature("org.test.fp", (Reg("f0", 80, "i387_ext", "float"), Reg("ctl", 32, "f")))))
    root = ET.fromstring(t.xml().split("\n", 2)[2])  # (past the XML and DOCTYPE lines)
    assert root.findtext("architecture") == "test-arch"
    regs = root.findall("feature/reg")
    assert [(r.get("name"), r.get("regnum")) for r in regs] == [
        ("r0", "0"), ("pc", "1"), ("f0", "2"), ("ctl", "3")]
    assert regs[2].get("group") == "float"
    assert t.sizes == [8, 8, 10, 4]
    assert root.find("feature/flags") is not None

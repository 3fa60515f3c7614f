"""``--device`` and ``--fw-cfg`` values may hold commas when quoted or escaped (issue 10: a
device option value could not contain a comma)."""

from __future__ import annotations

import pytest

from kvmfw.device import parse_device_spec, split_options
from kvmfw.errors import ConfigError


@pytest.mark.parametrize(("spec", "params"), [
    ('virtio-blk,file="a,b.img"', {"file": "a,b.img"}),
    ("virtio-blk,file='a,b.img',readonly=on", {"file": "a,b.img", "readonly": "on"}),
    (r"virtio-blk,file=a\,b.img", {"file": "a,b.img"}),
    (r'virtio-blk,file=dir/"x,y"\,z.img', {"file": "dir/x,y,z.img"}),
    ('fw-cfg,string=" spaced, kept ",name=opt/x', {"string": " spaced, kept ",
                                                   "name": "opt/x"}),
    (r'fw-cfg,string="say \"hi\", \\o/"', {"string": 'say "hi", \\o/'}),
    ('fw-cfg,string="a=b",name = opt/y ', {"string": "a=b", "name": "opt/y"}),
    ("fw-cfg,string=", {"string": ""}),
    ('fw-cfg,string=""', {"string": ""}),
    (r"fw-cfg,string=key\=value", {"string": "key=value"}),
])
def test_quoted_and_escaped_values(spec: str, params: dict[str, str]) -> None:
    name, got = parse_device_spec(spec)
    assert got == params and name in ("virtio-blk", "fw-cfg")


def test_unquoted_specs_parse_as_before() -> None:
    assert parse_device_spec(" uart16550 , port=0x3f8, irq = 4 ,") == (
        "uart16550", {"port": "0x3f8", "irq": "4"})
    assert parse_device_spec("fw_cfg,file-name=a=b") == ("fw_cfg", {"file_name": "a=b"})


@pytest.mark.parametrize(("spec", "match"), [
    ('virtio-blk,file="a,b.img', "unterminated"),
    ("virtio-blk,file=a.img\\", "trailing backslash"),
    ("virtio-blk,a,b.img", "expected key=value"),
    ("port=1", "device name comes first"),
    ('"",port=1', "device name comes first"),
    (" , ", "empty"),
])
def test_bad_specs_are_config_errors(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_device_spec(spec)


def test_split_options_keeps_order_and_bare_words() -> None:
    assert split_options('a,"b,c",d=e') == [("a", None), ("b,c", None), ("d", "e")]

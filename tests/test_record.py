"""``kvmfw.record.Frozen``: an immutable record that behaves as ``typing.NamedTuple`` does."""

from __future__ import annotations

import collections
import copy
import keyword
import pickle
from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmfw.record import Frozen


class Window(Frozen):
    """A test record."""

    space: str
    base: int
    size: int = 1
    name: str = ""
    kind: ClassVar[str] = "window"  # a class attribute, not a field

    @property
    def end(self) -> int:
        return self.base + self.size

    def shifted(self, by: int) -> Window:
        return self._replace(base=self.base + by)


def test_fields_defaults_and_construction() -> None:
    assert Window._fields == ("space", "base", "size", "name")
    assert Window._field_defaults == {"size": 1, "name": ""}
    assert Window.__match_args__ == Window._fields
    w = Window("pio", 0x3F8, 8, "com1")
    assert (w.space, w.base, w.size, w.name) == ("pio", 0x3F8, 8, "com1")
    assert Window("pio", 0x80) == ("pio", 0x80, 1, "")
    assert Window("mmio", base=16, name="x") == ("mmio", 16, 1, "x")
    assert Window(name="y", base=2, space="pio") == ("pio", 2, 1, "y")
    assert Window.kind == "window" and w.end == 0x400 and w.shifted(8).base == 0x400


@pytest.mark.parametrize(("args", "kwargs", "why"), [
    ((), {}, "missing argument 'space'"),
    (("pio",), {}, "missing argument 'base'"),
    (("pio", 1, 2, "n", "extra"), {}, "takes 4 positional arguments but 5"),
    (("pio", 1), {"bogus": 3}, "unexpected keyword argument 'bogus'"),
    (("pio", 1), {"base": 3}, "multiple values for argument 'base'"),
])
def test_bad_calls_are_type_errors(args: tuple[Any, ...], kwargs: dict[str, Any],
                                   why: str) -> None:
    with pytest.raises(TypeError, match=why):
        Window(*args, **kwargs)


def test_a_record_is_an_immutable_tuple() -> None:
    w = Window("pio", 0x70, 2)
    assert isinstance(w, tuple) and w == ("pio", 0x70, 2, "") and hash(w) == hash(tuple(w))
    space, base, size, name = w
    assert (space, base, size, name) == ("pio", 0x70, 2, "") and w[1] == 0x70 and len(w) == 4
    with pytest.raises(AttributeError):
        w.base = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        w.other = 1  # type: ignore[attr-defined]
    assert not hasattr(w, "__dict__")


def test_replace_asdict_make_repr_pickle_copy_match() -> None:
    w = Window("mmio", 0x1000, 0x200, "virtio")
    assert w._replace(size=4) == ("mmio", 0x1000, 4, "virtio") and type(w._replace()) is Window
    with pytest.raises(TypeError, match="no field bogus"):
        w._replace(bogus=1)
    assert w._asdict() == {"space": "mmio", "base": 0x1000, "size": 0x200, "name": "virtio"}
    assert Window._make(["pio", 1, 2, "n"]) == ("pio", 1, 2, "n")
    with pytest.raises(TypeError, match="takes 4 values, not 2"):
        Window._make(["pio", 1])
    assert repr(w) == "Window(space='mmio', base=4096, size=512, name='virtio')"
    for clone in (pickle.loads(pickle.dumps(w)), copy.copy(w), copy.deepcopy(w)):
        assert clone == w and type(clone) is Window
    match w:
        case Window(space, base, size=size):
            assert (space, base, size) == ("mmio", 0x1000, 0x200)
        case _:  # pragma: no cover
            pytest.fail("no match")


def test_bad_declarations_are_refused() -> None:
    with pytest.raises(TypeError, match="'b' without a default follows field 'a'"):
        class NoDefault(Frozen):
            a: int = 0
            b: int
    with pytest.raises(TypeError, match="cannot start with '_'"):
        class Private(Frozen):
            _a: int
    with pytest.raises(TypeError, match="cannot extend another"):
        class Wider(Window):
            extra: int = 0


names = st.lists(st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)
                 .filter(lambda name: not keyword.iskeyword(name)),  # (namedtuple refuses them)
                 min_size=1, max_size=6, unique=True)


@given(names, st.data())
def test_construction_matches_namedtuple(fields: list[str], data: st.DataObject) -> None:
    """Any mix of positional, keyword and default arguments gives what a namedtuple gives."""
    n_defaults = data.draw(st.integers(0, len(fields)))
    defaults = tuple(range(100, 100 + n_defaults))
    reference = collections.namedtuple("Reference", fields, defaults=defaults)  # type: ignore[misc]
    ns: dict[str, Any] = {"__annotations__": dict.fromkeys(fields, "int")}
    ns.update(zip(fields[len(fields) - n_defaults:], defaults, strict=True))
    record: Any = type(Frozen)("Record", (Frozen,), ns)
    n_pos = data.draw(st.integers(0, len(fields)))
    given_kw = [f for f in fields[n_pos:] if f not in reference._field_defaults
                or data.draw(st.booleans())]
    args = list(range(n_pos))
    kwargs = {f: i + 10 for i, f in enumerate(given_kw)}
    assert tuple(record(*args, **kwargs)) == tuple(reference(*args, **kwargs))
    assert record._field_defaults == reference._field_defaults

"""Records for classes on the start-up path of every ``kvmfw run``: :class:`Record` (mutable)
and :class:`Frozen` (an immutable named tuple).

A ``@dataclass`` generates and compiles its ``__init__``, ``__repr__`` and ``__eq__`` when
the class is created: about 0.5 ms per class natively, and ~30 times that in an emulated
host (the nested x86 environment), paid by every process at import. A :class:`Record`
subclass writes its ``__init__`` by hand and gets equality and a repr over its instance
attributes (``vars()``), which is what those dataclasses were used for.
"""

from __future__ import annotations

from typing import Any, dataclass_transform


class Record:
    """Equality and repr over the instance's attributes; unhashable, as a mutable
    dataclass is. Subclasses assign every field in ``__init__``."""

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return vars(self) == vars(other)

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({body})"

    def as_dict(self) -> dict[str, Any]:
        """The fields, as a new dict."""
        return dict(vars(self))

    def replace(self, **changes: Any) -> Any:
        """A new record of the same type with ``changes`` (as ``dataclasses.replace``:
        TypeError for a name that is not a field)."""
        unknown = sorted(set(changes) - set(vars(self)))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(unknown)}")
        return type(self)(**{**vars(self), **changes})


# --------------------------------------------------------------------------- immutable records
# ``typing.NamedTuple`` builds each class through ``collections.namedtuple``, which compiles
# a ``__new__`` from source and, under ``from __future__ import annotations``, a
# ``ForwardRef`` (another ``compile``) per field: ~0.2 ms per class natively, ~13 classes on
# every run's path. :class:`Frozen` builds the same shape of class from the annotations,
# with no code generation.

try:  # C descriptors reading one tuple item, as namedtuple's fields use (CPython)
    from collections import _tuplegetter  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - other interpreters
    from operator import itemgetter

    def _tuplegetter(index: int, doc: str) -> Any:
        return property(itemgetter(index), doc=doc)

_tuple_new = tuple.__new__


class _FrozenMeta(type):
    """Makes each :class:`Frozen` subclass's fields from its annotations."""

    def __new__(mcls, name: str, bases: tuple[type, ...], ns: dict[str, Any],
                **kwargs: Any) -> Any:
        records: list[Any] = [b for b in bases if isinstance(b, _FrozenMeta)]
        if not records:  # Frozen itself
            return super().__new__(mcls, name, bases, ns, **kwargs)
        if records[0]._fields:
            raise TypeError(f"{name}: a record cannot extend another ({records[0].__name__})")
        # Annotations stay unevaluated strings (the modules use postponed annotations):
        # only their names are read, in order.
        fields = tuple(f for f, hint in ns.get("__annotations__", {}).items()
                       if not str(hint).startswith(("ClassVar", "typing.ClassVar")))
        defaults: dict[str, Any] = {}
        for index, field in enumerate(fields):
            if field.startswith("_"):
                raise TypeError(f"{name}: field names cannot start with '_': {field!r}")
            if field in ns:
                defaults[field] = ns[field]
            elif defaults:
                raise TypeError(f"{name}: field {field!r} without a default follows "
                                f"field {next(iter(defaults))!r} with one")
            ns[field] = _tuplegetter(index, f"Field {index}: {field}")
        ns["__slots__"] = ()
        ns["_fields"] = fields
        ns["_size"] = len(fields)
        ns["_field_defaults"] = defaults
        ns["__match_args__"] = fields
        return super().__new__(mcls, name, bases, ns, **kwargs)


@dataclass_transform(frozen_default=True)
class Frozen(tuple, metaclass=_FrozenMeta):  # type: ignore[type-arg]
    """An immutable record that is a tuple, as a ``typing.NamedTuple`` (positional and
    keyword construction, defaults, ``_replace``, ``_asdict``, ``_fields``, pickling,
    equality and hashing as a tuple), declared the same way::

        class Range(Frozen):
            space: str
            base: int
            name: str = ""

    Fields are read-only properties; a subclass may add methods and properties, not
    instance attributes (``__slots__`` is empty), nor extend another record."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()
    _size = 0
    _field_defaults: dict[str, Any] = {}

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if not kwargs and len(args) == cls._size:  # the common call: every field, in order
            return _tuple_new(cls, args)
        fields = cls._fields
        if len(args) > len(fields):
            raise TypeError(f"{cls.__name__}() takes {len(fields)} positional arguments "
                            f"but {len(args)} were given")
        values = list(args)
        defaults = cls._field_defaults
        for field in fields[len(args):]:
            if field in kwargs:
                values.append(kwargs.pop(field))
            elif field in defaults:
                values.append(defaults[field])
            else:
                raise TypeError(f"{cls.__name__}() missing argument {field!r}")
        if kwargs:
            extra = next(iter(kwargs))
            why = "multiple values for" if extra in fields else "an unexpected keyword"
            raise TypeError(f"{cls.__name__}() got {why} argument {extra!r}")
        return _tuple_new(cls, values)

    @classmethod
    def _make(cls, iterable: Any) -> Any:
        """A record from an iterable of exactly its fields' values."""
        values = tuple(iterable)
        if len(values) != len(cls._fields):
            raise TypeError(f"{cls.__name__} takes {len(cls._fields)} values, "
                            f"not {len(values)}")
        return _tuple_new(cls, values)

    def _replace(self, **changes: Any) -> Any:
        """A new record with ``changes`` (TypeError for a name that is not a field)."""
        unknown = sorted(set(changes) - set(self._fields))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(unknown)}")
        values = [changes.get(f, v) for f, v in zip(self._fields, self, strict=True)]
        return _tuple_new(type(self), values)

    def _asdict(self) -> dict[str, Any]:
        """The fields, as a new dict."""
        return dict(zip(self._fields, self, strict=True))

    def __getnewargs__(self) -> tuple[Any, ...]:
        return tuple(self)

    def __repr__(self) -> str:
        body = ", ".join(f"{f}={v!r}" for f, v in zip(self._fields, self, strict=True))
        return f"{type(self).__name__}({body})"

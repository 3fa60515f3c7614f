"""A plain mutable record, for classes on the start-up path of every ``kvmfw run``.

A ``@dataclass`` generates and compiles its ``__init__``, ``__repr__`` and ``__eq__`` when
the class is created: about 0.5 ms per class natively, and ~30 times that in an emulated
host (the nested x86 environment), paid by every process at import. A :class:`Record`
subclass writes its ``__init__`` by hand and gets equality and a repr over its instance
attributes (``vars()``), which is what those dataclasses were used for.
"""

from __future__ import annotations

from typing import Any


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

"""Reading a saved device state back: every value checked before a device uses it.

A checkpoint is a file, so it is as hostile as a guest: a missing key, a value of the wrong
type or out of range, or a list longer than the hardware's buffer is a
:class:`~kvmfw.errors.CheckpointError` naming the device and the key, never a ``KeyError``,
a huge allocation or a device left in an impossible state. Devices read every value first
and assign afterwards, so a refused state leaves the device as it was.
"""

from __future__ import annotations

import math
from typing import Any

from kvmfw.errors import CheckpointError

_MISSING: Any = object()


class SavedState:
    """Checked, typed access to one device's saved state (a dict from ``save()``)."""

    def __init__(self, device: str, state: Any, path: str = "") -> None:
        if not isinstance(state, dict):
            raise CheckpointError(f"{device}: saved state{path} is {type(state).__name__}, "
                                  "not a mapping (a corrupt or foreign checkpoint)")
        self.device, self.state, self.path = device, state, path

    def _bad(self, key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{self.device}: saved state {self.path}{key!s} {why} "
                               "(a corrupt or foreign checkpoint)")

    def _get(self, key: str, default: Any) -> Any:
        if key in self.state:
            return self.state[key]
        if default is _MISSING:
            raise self._bad(key, "is missing")
        return default

    def integer(self, key: str, lo: int, hi: int, default: Any = _MISSING) -> int:
        """An integer in ``[lo, hi]``."""
        v = self._get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise self._bad(key, f"must be an integer in [{lo:#x}, {hi:#x}], not {_short(v)}")
        return v

    def opt_int(self, key: str, lo: int, hi: int) -> int | None:
        """An integer in ``[lo, hi]``, or None (also when absent)."""
        if self.state.get(key) is None:
            return None
        return self.integer(key, lo, hi)

    def flag(self, key: str, default: Any = _MISSING) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise self._bad(key, f"must be true or false, not {_short(v)}")
        return v

    def number(self, key: str, lo: float, hi: float) -> float:
        v = self._get(key, _MISSING)
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) \
                or not lo <= v <= hi:
            raise self._bad(key, f"must be a number in [{lo:g}, {hi:g}], not {_short(v)}")
        return float(v)

    def integers(self, key: str, lo: int, hi: int, max_len: int) -> list[int]:
        """A list of at most ``max_len`` integers in ``[lo, hi]``."""
        v = self._get(key, _MISSING)
        if not isinstance(v, list) or len(v) > max_len:
            raise self._bad(key, f"must be a list of at most {max_len} integers")
        for x in v:
            if not isinstance(x, int) or isinstance(x, bool) or not lo <= x <= hi:
                raise self._bad(key, f"holds {_short(x)}, not an integer in [{lo:#x}, {hi:#x}]")
        return list(v)

    def raw(self, key: str, length: int) -> bytes:
        """Exactly ``length`` bytes, saved as a hex string."""
        v = self._get(key, _MISSING)
        if not isinstance(v, str) or len(v) != 2 * length:
            raise self._bad(key, f"must be {length} bytes as hex")
        try:
            return bytes.fromhex(v)
        except ValueError:
            raise self._bad(key, "is not hex") from None

    def sub(self, key: str) -> SavedState:
        """A nested state."""
        return SavedState(self.device, self._get(key, _MISSING), f"{self.path}{key}.")

    def mapping(self, key: str, max_len: int) -> list[tuple[str, Any]]:
        """The entries of a nested mapping of at most ``max_len`` entries."""
        v = self._get(key, _MISSING)
        if not isinstance(v, dict) or len(v) > max_len:
            raise self._bad(key, f"must be a mapping of at most {max_len} entries")
        return list(v.items())



def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else f"{text[:37]}..."

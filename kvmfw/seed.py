"""Seeds for what a guest gets at random from its VMM (an architecture plugin's KASLR
layout): the ``on|off|SEED`` machine option, and numbers drawn from a seed.

A random layout by default is what the guest gets on hardware or under QEMU; a seed gives
an experiment the same layout on every run.
"""

from __future__ import annotations

import os
from typing import Any

from kvmfw.errors import ConfigError

SEED_MAX = (1 << 64) - 1
_M64 = SEED_MAX
_OFF = ("off", "no", "false")  # (numbers are seeds: 0 is seed 0)
_ON = ("on", "yes", "true")


def seed_option(key: str, value: Any) -> int | None:
    """The seed option ``key=value`` asks for: a fresh random one when it is unset, empty
    or ``on``; the number it gives (decimal or 0x hex, 0 to 2**64-1) for the same result
    every run; None for ``off``. A :class:`ConfigError` (one line, what to give)
    otherwise."""
    text = str(value).strip().lower() if value is not None else ""
    if text in _OFF:
        return None
    if text in ("", *_ON):
        return int.from_bytes(os.urandom(8), "little")
    try:
        seed = int(text, 0)
    except ValueError:
        seed = -1
    if not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{key}={value!r}: give {key}=on (random, the default), {key}=off, "
                          "or a seed from 0 to 2**64-1 for the same result every run")
    return seed


def draw(seed: int, n: int) -> list[int]:
    """``n`` well-mixed 64-bit numbers from ``seed`` (SplitMix64: no ``random`` import on
    the start-up path; the same seed gives the same numbers on every host and version)."""
    out, x = [], seed & _M64
    for _ in range(n):
        x = (x + 0x9E3779B97F4A7C15) & _M64
        z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        out.append(z ^ (z >> 31))
    return out

"""kvmfw.seed: the on|off|SEED option of what a guest gets at random, and draws from a seed."""

from __future__ import annotations

import pytest

from kvmfw.errors import ConfigError
from kvmfw.seed import SEED_MAX, draw, seed_option


def test_a_seed_option_gives_random_fixed_or_no_seed() -> None:
    for unset in (None, "", "on", "ON", " yes ", "true"):
        seed = seed_option("kaslr", unset)
        assert seed is not None and 0 <= seed <= SEED_MAX
    assert seed_option("kaslr", "on") != seed_option("kaslr", "on")  # (64 random bits each)
    assert seed_option("kaslr", "12345") == 12345
    assert seed_option("kaslr", "0x10") == 16
    assert seed_option("kaslr", "0") == 0  # a number is a seed, not a switch
    assert seed_option("kaslr", str(SEED_MAX)) == SEED_MAX
    for off in ("off", "no", "False"):
        assert seed_option("kaslr", off) is None


@pytest.mark.parametrize("bad", ["-1", str(SEED_MAX + 1), "maybe", "1.5", "0x"])
def test_a_bad_seed_option_is_one_line_saying_what_to_give(bad: str) -> None:
    with pytest.raises(ConfigError) as e:
        seed_option("kaslr", bad)
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"kaslr={bad!r}") and "2**64-1" in text


def test_draws_are_splitmix64_the_same_everywhere() -> None:
    # SplitMix64's published first outputs for seed 0
    assert draw(0, 2) == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    assert draw(7, 3)[:2] == draw(7, 2) and draw(7, 1) != draw(8, 1)
    assert all(0 <= x <= SEED_MAX for x in draw(SEED_MAX, 16))

"""``kvmfw run``'s own parser (:func:`kvmfw.cli.run.parse`) against click's: on every command
line it reads, it gives the command exactly what click gives it; every line it does not read
(help, unknown or misspelt options, missing values, bad choices, bundled flags) is left to
click, which reads it or reports it as before. No KVM needed: parsing only."""

from __future__ import annotations

from typing import Any

import click
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmfw.cli import run
from kvmfw.cli.commands import run_cmd

FLAGS = [f for o in run.OPTIONS for f in o.flags]
VALUES = st.sampled_from(["64M", "1", "", "a b", "x=y", "-1", "--kernel", "ignore", "fatal",
                          "virtio-blk,file=/x", "=", "ü"])
TOKENS = st.one_of(
    st.sampled_from(FLAGS),
    st.builds(lambda f, v: f"{f}={v}", st.sampled_from(FLAGS), VALUES),
    VALUES,
    st.sampled_from(["-h", "--help", "--", "-sS", "-m64M", "--kern", "--no-summary=1", "pos"]),
)


def click_params(args: list[str]) -> dict[str, Any] | None:
    """What click hands the run command for ``args``, or None when it refuses them."""
    try:
        with run_cmd.make_context("run", list(args)) as ctx:
            return dict(ctx.params)
    except (click.exceptions.UsageError, click.exceptions.Exit):
        return None


@settings(max_examples=400, deadline=None)
@given(st.lists(TOKENS, max_size=8))
def test_what_the_fast_parser_reads_it_reads_as_click(args: list[str]) -> None:
    mine = run.parse(args)
    if mine is not None:
        assert mine == click_params(args)


@pytest.mark.parametrize("args", [
    [],
    ["--kernel", "k", "--initrd=i", "--cmdline", "console=ttyS0 quiet", "-m", "256M"],
    ["--cpus", "2", "--device", "virtio-blk,file=a", "--device=b", "-o", "x=1", "--option", "y"],
    ["--no-summary", "--console", "none", "-s", "-S", "--unclaimed", "fatal"],
    ["--memory", "1", "--memory", "2"],  # the last one wins, as in click
    ["--cmdline="],
])
def test_plain_lines_are_read_without_click(args: list[str]) -> None:
    mine = run.parse(args)
    assert mine is not None
    assert mine == click_params(args)


@pytest.mark.parametrize("args", [
    ["--help"], ["-h"], ["--bogus"], ["--kernel"], ["--unclaimed", "maybe"], ["-sS"],
    ["-m64M"], ["--no-summary=yes"], ["positional"], ["--cmdline", "-x"], ["--", "--kernel"],
])
def test_everything_else_is_left_to_click(args: list[str]) -> None:
    assert run.parse(args) is None


def test_the_table_is_every_option_of_the_click_command() -> None:
    names = {p.name for p in run_cmd.params}
    assert names == {o.dest for o in run.OPTIONS}

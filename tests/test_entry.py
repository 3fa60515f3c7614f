"""The ``kvmfw`` console script (kvmfw.entry): the garbage collector is paused while the CLI
starts and is back on before a command other than ``run`` does its work. (A run, which
needs an arch plugin, is checked in plugins/x86/tests/test_startup_x86.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import gc, json, sys
    {before}
    import kvmfw.entry
    seen = {{}}

    def at_import():  # (kvmfw.cli is imported by kvmfw.entry.main, under the pause)
        import kvmfw.cli.commands as commands
        seen["import"] = gc.isenabled()
        invoke = commands.invoke

        def invoke_probe(args):
            seen["command"] = gc.isenabled()
            return invoke(args)

        commands.invoke = invoke_probe

    import builtins
    real_import = builtins.__import__

    def hook(name, *a, **k):
        module = real_import(name, *a, **k)
        if name == "kvmfw.cli" and "import" not in seen:
            seen["import"] = None
            at_import()
        return module

    builtins.__import__ = hook
    sys.argv = ["kvmfw", *{args!r}]
    try:
        kvmfw.entry.main()
    except SystemExit as exc:
        seen["status"] = exc.code
    builtins.__import__ = real_import
    seen["after"] = gc.isenabled()
    print("PROBE " + json.dumps(seen))
""")


def probe(args: list[str], before: str = "") -> dict[str, object]:
    r = subprocess.run([sys.executable, "-c", PROBE.format(args=args, before=before)],
                       capture_output=True, text=True, timeout=120, cwd="/")
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")]
    assert line, r.stdout + r.stderr
    return json.loads(line[-1][6:])


def test_other_commands_do_their_work_with_the_collector_on() -> None:
    seen = probe(["list-plugins"])
    assert seen.get("status") in (0, None)
    assert seen["import"] is False and seen["command"] is True and seen["after"] is True


def test_a_collector_the_user_turned_off_stays_off() -> None:
    seen = probe(["list-plugins"], before="gc.disable()")
    assert seen.get("status") in (0, None)
    assert seen["import"] is False and seen["command"] is False and seen["after"] is False

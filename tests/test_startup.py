"""Start-up: what a ``kvmfw`` command imports, and the on-disk entry-point index.

Start-up is paid by every process, and on a slow host (the nested environment's TCG-emulated
userspace) each imported module costs milliseconds to find, read and execute: these tests
guard *which* modules a command imports (behaviour), never how long it takes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from kvmfw import plugins

# Nothing `kvmfw run --help` (or the parsing of any run) needs: the machine and the plugins
# come with the run itself, the rest belongs to other subcommands or optional extras.
HEAVY = ("stevedore", "importlib.metadata", "email", "kvmfw.machine", "kvmfw.cpu",
         "kvmfw.plugins", "kvmfw.checkpoint", "kvmfw.sweep", "kvmfw.emu", "kvmfw.gdb",
         "kvmfw.profile", "kvmfw.fork", "kvmfw.doctor", "kvmfw_x86", "kvmfw_devices",
         "dask", "pandas", "pyarrow", "numpy", "elftools", "hypothesis", "unicorn", "capstone")

PROBE = textwrap.dedent("""
    import json, sys
    import kvmfw.cli
    try:
        kvmfw.cli.main(sys.argv[1:])
    except SystemExit:
        pass
    heavy = sorted(m for m in sys.modules for h in HEAVY if m == h or m.startswith(h + "."))
    sys.stderr.write("KVMFW-MODULES " + json.dumps(heavy) + "\\n")
""")


def probe(*args: str, env: dict[str, str] | None = None) -> tuple[list[str], str]:
    """Run ``kvmfw ARGS`` in a fresh isolated interpreter; (heavy modules loaded, stdout)."""
    code = PROBE.replace("HEAVY", repr(HEAVY))
    r = subprocess.run([sys.executable, "-I", "-c", code, *args], capture_output=True,
                       text=True, timeout=120, cwd="/", env=env, stdin=subprocess.DEVNULL)
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("KVMFW-MODULES ")]
    assert line, r.stderr
    return json.loads(line[-1].split(" ", 1)[1]), r.stdout


def test_run_help_imports_no_machine_plugin_or_extra() -> None:
    heavy, out = probe("run", "--help")
    assert "--kernel" in out
    assert heavy == []


def test_version_imports_no_machine_either() -> None:
    heavy, out = probe("--version")  # reads every plugin distribution's version, nothing more
    assert out.startswith("kvmfw ")
    assert not {m for m in heavy if m.startswith(("kvmfw.machine", "kvmfw_x86", "dask"))}


def test_importing_kvmfw_is_lazy_but_every_public_name_resolves() -> None:
    code = ("import sys, kvmfw; assert 'kvmfw.machine' not in sys.modules; "
            "from kvmfw import Machine, Device, hookimpl, RunEnd, PLUGIN_API; "
            "assert 'kvmfw.machine' in sys.modules; import kvmfw as k; "
            "assert all(hasattr(k, n) for n in k.__all__); print('ok')")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       timeout=60, cwd="/")
    assert r.stdout.strip() == "ok", r.stderr
    import kvmfw

    with pytest.raises(AttributeError):
        kvmfw.NoSuchThing  # noqa: B018


# --- the entry-point index ---------------------------------------------------------------

def _fake_dist(root: Path, name: str, entry_points: str) -> None:
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


@pytest.fixture
def index_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache home and a path directory with one fake plugin distribution."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    site = tmp_path / "site"
    _fake_dist(site, "kvmfw-idx", "[kvmfw.devices]\nidx-dev = kvmfw.device:Device\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(plugins, "_installed", None)
    return tmp_path


def _index_files(home: Path) -> list[Path]:
    return sorted((home / "cache" / "kvmfw").glob("entry-points-*.txt"))


def test_the_index_is_written_and_then_used_without_a_scan(
        index_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ("kvmfw.devices", "idx-dev") in plugins._installed_entry_points()
    (path,) = _index_files(index_home)
    assert "idx-dev" in path.read_text()

    def no_scan() -> None:
        raise AssertionError("scanned although the index is valid")

    monkeypatch.setattr(plugins, "_installed", None)  # a new process, as far as we care
    monkeypatch.setattr(plugins, "_scan_distributions", no_scan)
    found = plugins._installed_entry_points()
    (pkg, ver, ep), = found[("kvmfw.devices", "idx-dev")]
    assert (pkg, ver, ep.value) == ("kvmfw-idx", "0.1", "kvmfw.device:Device")
    from kvmfw.device import Device

    assert ep.load() is Device


def test_a_new_distribution_on_the_path_makes_the_index_stale(
        index_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plugins._installed_entry_points()
    _fake_dist(index_home / "site", "kvmfw-late", "[kvmfw.boards]\nlate = kvmfw.device:Device\n")
    monkeypatch.setattr(plugins, "_installed", None)
    assert ("kvmfw.boards", "late") in plugins._installed_entry_points()  # dir mtime moved
    other = index_home / "other"
    other.mkdir()
    monkeypatch.syspath_prepend(str(other))
    plugins._installed_entry_points()
    assert len(_index_files(index_home)) == 1  # one per interpreter, whatever the path


@pytest.mark.parametrize("content", [
    b"not an index", b"", b"\n\n\n", b"kvmfw entry points 1\n", b"\xff\xfe" * 10,
    b'{"version": 1}',  # the format before version 2
    b"\t" * 100000,
    b" " * (plugins.INDEX_MAX_BYTES + 1),
])
def test_a_damaged_index_is_rebuilt_not_trusted(index_home: Path, content: bytes) -> None:
    plugins._installed_entry_points()
    (path,) = _index_files(index_home)
    path.write_bytes(content)
    plugins._installed = None
    assert ("kvmfw.devices", "idx-dev") in plugins._installed_entry_points()
    assert path.read_text().splitlines()[0] == f"kvmfw entry points {plugins.INDEX_VERSION}"


def test_an_index_with_a_forged_row_is_refused(index_home: Path) -> None:
    plugins._installed_entry_points()
    (path,) = _index_files(index_home)
    head = path.read_text().splitlines()[:2]
    key, _ = plugins._path_fingerprint()
    index = plugins._read_index(str(path))
    assert index is not None and index.key == repr(key)
    for bad in ("os\tx\tos:system\tp\tv", "kvmfw.devices\tx\tm:a\tp",
                "kvmfw.devices\tx\tm:a\tp\tv\textra",
                "kvmfw.devices\t" + "x" * 5000 + "\tm:a\tp\tv", "kvmfw.devices",
                # listings: a relative directory, a bad mtime, names that are not metadata
                # directories or that leave the directory, too short a line
                "L\tsite\t1\tx-1.dist-info", "L\t/site\tsoon\tx-1.dist-info",
                "L\t/site\t1\tx.py", "L\t/site\t1\t../x-1.dist-info", "L\t/site",
                "L\t/site\t1\t" + "\t".join(["x.dist-info"] * 9000)):
        path.write_text("\n".join([*head, bad]) + "\n")
        assert plugins._read_index(str(path)) is None, bad
    path.write_text("\n".join([*head, "L\t/site\t1\tx-1.dist-info\tEGG-INFO.egg-info"]) + "\n")
    index = plugins._read_index(str(path))
    assert index is not None and index.listings == {
        "/site": (1, ("x-1.dist-info", "EGG-INFO.egg-info"))}
    path.write_text("\n".join([head[0], repr(((str(index_home), 0, ()),))]) + "\n")
    index = plugins._read_index(str(path))
    assert index is not None and index.key != repr(key)  # another key: stale
    path.write_text("\n".join(head))  # cut short: no final line break
    assert plugins._read_index(str(path)) is None


def test_an_entry_point_the_format_cannot_carry_leaves_no_index(
        index_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dist(index_home / "site", "kvmfw-tab",
               "[kvmfw.devices]\ntab-dev = kvmfw.device:Device [with\ttab]\n")
    found = plugins._scan_distributions()
    key, _ = plugins._path_fingerprint()
    path = plugins._index_file()
    assert key is not None and path is not None
    if not any("\t" in ep.value for entries in found.values() for _, _, ep in entries):
        pytest.skip("this importlib.metadata drops the tab")
    plugins._write_index(path, key, found)
    assert not os.path.exists(path)


def test_an_unwritable_cache_home_is_no_error(index_home: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = index_home / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file: no directory under it
    plugins._installed = None
    assert ("kvmfw.devices", "idx-dev") in plugins._installed_entry_points()


def test_devices_are_imported_when_named(index_home: Path) -> None:
    site = index_home / "site"
    (site / "idx_lazy_mod.py").write_text("from kvmfw.device import Device\n"
                                          "class Lazy(Device):\n    name = 'idx-lazy'\n")
    (site / "idx_broken_mod.py").write_text("raise ImportError('needs libbar')\n")
    _fake_dist(site, "kvmfw-idx2", "[kvmfw.devices]\nidx-lazy = idx_lazy_mod:Lazy\n"
                                   "idx-broken = idx_broken_mod:X\n")
    plugins._installed = None
    reg = plugins.DeviceRegistry.from_entry_points()
    assert "idx_lazy_mod" not in sys.modules and "idx_broken_mod" not in sys.modules
    assert reg.get("idx-lazy").__name__ == "Lazy"
    assert "idx_broken_mod" not in sys.modules
    from kvmfw.errors import ConfigError, PluginLoadError

    with pytest.raises(PluginLoadError, match="idx-broken.*needs libbar"):
        reg.get("idx-broken")
    with pytest.raises(ConfigError, match="unknown device 'nope'.*idx-lazy"):
        reg.get("nope")
    assert "idx-broken" not in reg.names() and "idx-lazy" in reg.names()
    sys.modules.pop("idx_lazy_mod", None)


def test_path_entries_without_distributions_share_the_index(
        index_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The script's directory (``kvmfw``), the current directory (``python -c``, ``-m``) and
    path-hook names hold no distribution: they do not change the key, so no new scan."""
    plugins._installed_entry_points()
    empty = index_home / "bin"
    empty.mkdir()
    (empty / "kvmfw").write_text("# a console script\n")

    def no_scan() -> None:
        raise AssertionError("scanned although no distribution changed")

    monkeypatch.setattr(plugins, "_scan_distributions", no_scan)
    # "" is the current directory: one without distributions (a source checkout that was
    # built holds NAME.egg-info, a distribution importlib.metadata would see there)
    monkeypatch.chdir(empty)
    for entry in (str(empty), "", "__editable__.x-0.1.finder.__path_hook__"):
        monkeypatch.syspath_prepend(entry)
        monkeypatch.setattr(plugins, "_installed", None)
        assert ("kvmfw.devices", "idx-dev") in plugins._installed_entry_points()


def _age(path: Path, seconds: int = 60) -> None:
    """Move ``path``'s mtime back, out of the racy window (and past coarse clocks)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 1_000_000_000))


def test_a_distribution_reinstalled_under_the_same_name_makes_the_index_stale(
        index_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip replaces a ``.dist-info`` whole: the path directory's mtime moves (the key stamps
    the directory, not each ``entry_points.txt``)."""
    import shutil

    site = index_home / "site"
    _age(site)
    plugins._installed_entry_points()
    shutil.rmtree(site / "kvmfw_idx-0.1.dist-info")
    _fake_dist(site, "kvmfw-idx", "[kvmfw.devices]\nidx-new = kvmfw.device:Device\n")
    monkeypatch.setattr(plugins, "_installed", None)
    found = plugins._installed_entry_points()
    assert ("kvmfw.devices", "idx-new") in found and ("kvmfw.devices", "idx-dev") not in found


def test_an_egg_info_rewritten_in_place_makes_the_index_stale(
        index_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``setup.py develop`` rewrites a source tree's ``NAME.egg-info`` in place: its
    ``entry_points.txt`` mtime is in the key."""
    src = index_home / "src"
    info = src / "kvmfw_egg.egg-info"
    info.mkdir(parents=True)
    (info / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: kvmfw-egg\nVersion: 0.1\n")
    eps = info / "entry_points.txt"
    eps.write_text("[kvmfw.devices]\negg-dev = kvmfw.device:Device\n")
    monkeypatch.syspath_prepend(str(src))
    assert ("kvmfw.devices", "egg-dev") in plugins._installed_entry_points()
    eps.write_text("[kvmfw.devices]\negg-new = kvmfw.device:Device\n")
    st = eps.stat()
    os.utime(eps, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # (coarse clocks)
    monkeypatch.setattr(plugins, "_installed", None)
    found = plugins._installed_entry_points()
    assert ("kvmfw.devices", "egg-new") in found and ("kvmfw.devices", "egg-dev") not in found


def _listed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The directories ``os.scandir`` is asked to list from now on."""
    listed: list[str] = []
    real = os.scandir

    def counting(path: Any = ".") -> Any:
        listed.append(os.path.abspath(path))
        return real(path)

    monkeypatch.setattr(plugins.os, "scandir", counting)
    return listed


def test_a_start_up_stats_path_directories_instead_of_listing_them(
        index_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index keeps each path directory's listing with its mtime: a later start-up
    lists none whose mtime is unchanged, and the standard library's never."""
    site = index_home / "site"
    _age(site)
    plugins._installed_entry_points()
    (path,) = _index_files(index_home)
    assert f"L\t{site}\t" in path.read_text()
    scan = plugins._scan_distributions
    listed = _listed(monkeypatch)
    monkeypatch.setattr(plugins, "_installed", None)
    monkeypatch.setattr(plugins, "_scan_distributions", lambda: pytest.fail("scanned"))
    assert ("kvmfw.devices", "idx-dev") in plugins._installed_entry_points()
    assert str(site) not in listed
    assert not set(listed) & plugins._STDLIB_DIRS
    # a directory that changed is listed again, and the change is seen
    _fake_dist(site, "kvmfw-late", "[kvmfw.boards]\nlate = kvmfw.device:Device\n")
    monkeypatch.setattr(plugins, "_scan_distributions", scan)
    monkeypatch.setattr(plugins, "_installed", None)
    assert ("kvmfw.boards", "late") in plugins._installed_entry_points()
    assert str(site) in listed


def test_a_racy_listing_is_not_kept_until_it_settles(
        index_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory changed within the last seconds may change again without its mtime
    moving: its listing is not stored, and it is listed by every start-up until it
    settles; then the index is rewritten once with it (no scan)."""
    site = index_home / "site"
    plugins._installed_entry_points()
    (path,) = _index_files(index_home)
    assert f"L\t{site}\t" not in path.read_text()
    monkeypatch.setattr(plugins, "_scan_distributions", lambda: pytest.fail("scanned"))
    monkeypatch.setattr(plugins, "_installed", None)
    listed = _listed(monkeypatch)
    plugins._installed_entry_points()
    assert str(site) in listed and f"L\t{site}\t" not in path.read_text()
    real_ns = plugins.time.time_ns
    monkeypatch.setattr(plugins.time, "time_ns", lambda: real_ns() + 60_000_000_000)
    monkeypatch.setattr(plugins, "_installed", None)
    plugins._installed_entry_points()
    assert f"L\t{site}\t" in path.read_text()
    listed.clear()
    monkeypatch.setattr(plugins, "_installed", None)
    assert ("kvmfw.devices", "idx-dev") in plugins._installed_entry_points()
    assert str(site) not in listed


def test_a_listing_with_another_mtime_is_not_used(
        index_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stored listing is only a cache of the directory at that mtime: a forged or stale
    one (another mtime) is ignored and the directory listed."""
    site = index_home / "site"
    _age(site)
    plugins._installed_entry_points()
    (path,) = _index_files(index_home)
    lines = path.read_text().splitlines()
    forged = [f"L\t{site}\t1\tkvmfw_ghost-0.1.dist-info" if ln.startswith(f"L\t{site}\t")
              else ln for ln in lines]
    path.write_text("\n".join(forged) + "\n")
    monkeypatch.setattr(plugins, "_installed", None)
    monkeypatch.setattr(plugins, "_scan_distributions", lambda: pytest.fail("scanned"))
    listed = _listed(monkeypatch)
    assert ("kvmfw.devices", "idx-dev") in plugins._installed_entry_points()
    assert str(site) in listed


def test_python_c_python_m_and_the_script_share_one_index(tmp_path: Path) -> None:
    """Each way of starting kvmfw finds the index the first one wrote and scans nothing (the
    index file is replaced by every scan: its inode would change)."""
    script = Path(sys.executable).parent / "kvmfw"
    if not script.exists():
        pytest.skip("the kvmfw console script is not installed beside this interpreter")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = ["run", "--arch", "no-such-arch", "--console", "none", "--no-summary"]
    work = tmp_path / "work"
    work.mkdir()
    ways = [[sys.executable, "-I", "-c", "import kvmfw.cli; kvmfw.cli.main()", *args],
            [sys.executable, "-c", "import kvmfw.cli; kvmfw.cli.main()", *args],
            [sys.executable, "-m", "kvmfw.cli", *args],
            [str(script), *args]]
    seen = []
    for cmd in ways:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=work,
                           env=env, stdin=subprocess.DEVNULL)
        assert "no-such-arch" in r.stderr, r.stderr  # the arch was looked up in the index
        (path,) = _index_files(tmp_path)
        seen.append(path.stat().st_ino)
    assert len(set(seen)) == 1, seen


def test_the_index_lives_under_xdg_cache_home(index_home: Path) -> None:
    path = plugins._index_file()
    assert path is not None and path.startswith(os.environ["XDG_CACHE_HOME"])


# --- the end of the process --------------------------------------------------------------

ENDING = textwrap.dedent("""
    import atexit, sys, threading, time
    import kvmfw.cli

    class Teardown:
        def __del__(self):
            sys.stdout.write("TEARDOWN-RAN\\n")
            sys.stdout.flush()

    keep = Teardown()  # freed by the interpreter's teardown, if there is one
    atexit.register(lambda: print("ATEXIT-RAN", flush=True))
    if "thread" in sys.argv:
        sys.argv.remove("thread")
        threading.Thread(target=lambda: (time.sleep(0.5), print("THREAD-DONE", flush=True))
                         ).start()
    print("buffered before the end", end="")  # not flushed by anyone but the ending
    kvmfw.cli.main()
""")


def ending(tmp_path: Path, *args: str, how: str = "script") -> subprocess.CompletedProcess[str]:
    """Run ENDING as the ``kvmfw`` console script would be (a file named ``kvmfw``), as
    ``python -c``, or under cProfile."""
    script = tmp_path / "kvmfw"
    script.write_text(ENDING)
    argv = {"script": [str(script)], "c": ["-c", ENDING],
            "cprofile": ["-m", "cProfile", "-o", str(tmp_path / "prof"), str(script)]}[how]
    return subprocess.run([sys.executable, "-I", *argv, *args], capture_output=True,
                          text=True, timeout=60, cwd="/", stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("args", "status"), [
    (["list-plugins", "--json"], 0),
    (["run", "--bogus"], 2),
    (["info", "--kvm", "/nonexistent/kvm"], 3),
])
def test_the_process_entry_skips_the_interpreter_teardown_but_not_atexit(
        tmp_path: Path, args: list[str], status: int) -> None:
    r = ending(tmp_path, *args)
    assert r.returncode == status, r.stderr
    assert "buffered before the end" in r.stdout and "ATEXIT-RAN" in r.stdout
    assert "TEARDOWN-RAN" not in r.stdout  # os._exit after the atexit handlers
    assert "Traceback" not in r.stderr


def test_a_running_non_daemon_thread_gets_the_normal_exit(tmp_path: Path) -> None:
    r = ending(tmp_path, "thread", "run", "--bogus")
    assert r.returncode == 2
    assert "THREAD-DONE" in r.stdout and "ATEXIT-RAN" in r.stdout


@pytest.mark.parametrize("how", ["c", "cprofile"])
def test_main_called_by_other_code_or_under_a_profiler_exits_normally(
        tmp_path: Path, how: str) -> None:
    r = ending(tmp_path, "run", "--bogus", how=how)
    assert r.returncode == (2 if how == "c" else 0), r.stderr  # (cProfile swallows exits)
    assert "TEARDOWN-RAN" in r.stdout and "ATEXIT-RAN" in r.stdout
    if how == "cprofile":
        assert (tmp_path / "prof").stat().st_size > 0  # the profiler wrote its results


def test_main_with_arguments_returns_or_raises_as_before() -> None:
    import kvmfw.cli

    with pytest.raises(SystemExit) as exc:
        kvmfw.cli.main(["run", "--bogus"])
    assert exc.value.code == 2
    assert kvmfw.cli.main(["list-plugins", "--json"]) is None


# --- hook registration -------------------------------------------------------------------

def test_the_plugin_manager_finds_exactly_the_hooks_plain_pluggy_finds() -> None:
    import pluggy

    from kvmfw import hookspecs
    from kvmfw.device import Device

    impl = hookspecs.hookimpl

    class Base(Device):
        name = "base"

        @impl
        def pre_run(self, cpu):  # inherited
            return None

    class Probe(Base):
        name = "probe"
        __slots__ = ()

        @property
        def explodes(self):  # a descriptor: never evaluated by the search
            raise AssertionError("evaluated")

        @impl(specname="post_run")
        def after(self, cpu):
            return None

        @classmethod
        @impl
        def dump_state(cls, cpu):
            return None

        def plain(self):
            return None

    probe = Probe.__new__(Probe)
    probe.__dict__["machine_created"] = impl(lambda machine: None)  # held by the instance

    def found(pm: pluggy.PluginManager) -> set[tuple[str, str]]:
        pm.add_hookspecs(hookspecs)
        pm.register(probe, name="probe")
        return {(hook, i.function.__name__) for hook in ("pre_run", "post_run", "dump_state",
                                                         "machine_created")
                for i in getattr(pm.hook, hook).get_hookimpls()}

    ours = found(plugins.make_plugin_manager.__globals__["_PluginManager"](hookspecs.PROJECT))
    assert ours == found(pluggy.PluginManager(hookspecs.PROJECT))
    assert {h for h, _ in ours} == {"pre_run", "post_run", "dump_state", "machine_created"}


def test_the_run_path_generates_no_namedtuple_code() -> None:
    """kvmfw's records are ``kvmfw.record.Frozen``: no module of the core or of an installed
    plugin builds a class through ``collections.namedtuple`` (which compiles its
    ``__new__`` from source at import, as ``typing.NamedTuple`` does)."""
    code = textwrap.dedent("""
        import collections, json, sys
        made = []
        real = collections.namedtuple
        def spy(*a, **k):
            f = sys._getframe(1)
            while f is not None and f.f_globals.get("__name__", "") in ("typing", "collections"):
                f = f.f_back
            made.append((f.f_globals.get("__name__", "?") if f else "?", a[0]))
            return real(*a, **k)
        collections.namedtuple = spy
        import kvmfw.cli.run, kvmfw.machine, kvmfw.cpu
        from kvmfw import plugins
        plugins.list_plugins()  # imports every installed plugin's entry points
        print("KVMFW-MADE " + json.dumps([m for m in made if m[0].startswith("kvmfw")]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd="/", stdin=subprocess.DEVNULL)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("KVMFW-MADE ")]
    assert line, r.stdout + r.stderr
    assert json.loads(line[-1].split(" ", 1)[1]) == []

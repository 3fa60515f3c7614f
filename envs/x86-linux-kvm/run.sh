#!/bin/bash
# run.sh - run kvmfw's tests on a real x86 KVM (hardware-virtualization semantics), one level
# down, on any x86_64 Linux host (no /dev/kvm needed on the host).
#
#   envs/x86-linux-kvm/run.sh [pytest args...]      (default: tests  - i.e. tests/ of the repo)
#   envs/x86-linux-kvm/run.sh tests ::: plugins/x86/tests ::: plugins/devices/tests
#                                  (":::" separates pytest sessions; status: first non-zero)
#   envs/x86-linux-kvm/run.sh --shell               (interactive shell in the outer guest)
#   envs/x86-linux-kvm/run.sh --bench [args...]     (benchmarks/boot.py inside instead of pytest)
#   envs/x86-linux-kvm/run.sh --cmd 'SHELL COMMAND'  (any command inside, in the checkout's copy;
#                                                    $KVMFW_LINUX_GUESTS has the test guests)
#
# How: qemu-system-x86_64 -accel tcg -cpu EPYC emulates AMD SVM with nested paging. Debian
# bookworm's generic kernel (linux-image-*-amd64) boots in it, loads kvm_amd and so has a
# working /dev/kvm ("the outer guest"). Its root file system is a debootstrapped Debian
# bookworm (python3, gcc, kernel headers, qemu-system-x86, e2fsprogs) shared over 9p, in which
# a venv holds the project's dependencies (wheels fetched from PyPI on the host, installed
# offline) and an editable install of a snapshot of this checkout (core + plugins; the core's
# cffi module is compiled by the root's own gcc). The outer guest runs pytest there against
# its /dev/kvm; pytest's exit status becomes this script's exit status.
#
# The inner test guests are made here too: Debian's cloud and generic kernels and a
# busybox-static initramfs per kernel (/init prints KVMFW-INIT-OK, runs the test named by
# kvmfw.test= and then `reboot -f` or `poweroff -f`), in /opt/kvmfw-guests of the root; the
# tests find them through $KVMFW_LINUX_GUESTS (see tests/linux/).
#
# Everything downloaded or built is cached in $KVMFW_X86_CACHE (default
# ~/.cache/kvmfw/x86-linux-kvm; outside the checkout, so never committed; pointing it into the
# checkout's .cache/ also works, that is git-ignored). Needs root (apt-get, debootstrap, chroot,
# 9p with security_model=none), as CI has.
#
# Hangs, either way (see envs/x86-linux-kvm/README.md): inside, every test has a limit scaled
# by the measured speed of the outer guest (pytest_watchdog.py says which test overran); here,
# a frozen outer guest is told by silence (no console output and no heartbeat for
# KVMFW_X86_SILENCE s): its registers are dumped, it is killed, and the tests it had not
# finished run once more in a fresh boot. The log says which of these happened.
#
# Knobs: KVMFW_X86_CACHE, KVMFW_X86_TIMEOUT (s per outer boot, a last resort: what is left
#   of the budget + 900, or 2400 without a budget),
#   KVMFW_X86_SILENCE (s without console output or heartbeat = frozen, 180), KVMFW_X86_CPU (EPYC),
#   KVMFW_X86_SNAPSHOT=REV (test commit REV, e.g. HEAD, instead of the work tree as it is),
#   KVMFW_X86_MEM (MiB, 2048), KVMFW_LINUX_* / KVMFW_BENCH_* / KVMFW_TEST_* (passed to the
#   tests inside, e.g. KVMFW_LINUX_VMMS=qemu, KVMFW_TEST_TIMEOUT=600), KVMFW_X86_RETRIES (2:
#   more boots when a boot freezes or dies before reporting; README "Known freezes"),
#   KVMFW_X86_REBUILD=1 (rebuild the root file system), KVMFW_X86_APPEND (words added to the
#   outer kernel's command line, e.g. idle=poll), KVMFW_X86_FAULT_FREEZE=TEXT (self-test:
#   pause the outer guest, as a freeze would, once the running test's id contains TEXT;
#   first boot only). A freeze's CPU and interrupt state: logs/console.log.hang; every
#   failed test's whole report, kept as it happens: logs/failures.log.
#   KVMFW_X86_BUDGET (s, 2700; 0: none): the tests' share of a CI run. Once that much time
#   has passed since the first boot, every test not yet started is skipped, saying so (the
#   core, x86 and devices suites ran on the host's own KVM before; tests/linux, which runs
#   only here, comes first). Under tox the budget is also cut to what is left of
#   KVMFW_TOX_LIMIT (s, 5400: CI's 90 minutes, counted from tox's start, toxfile.py's
#   KVMFW_TOX_STARTED) less 1500 s: up to 900 s for the test running at the deadline (the
#   boot's timeout), then a retry boot or the sessions that skip. On a slow host the
#   environments before this one leave it less. On a quiet host the whole run takes 40-47
#   min, so its last tests may be skipped there too.
set -euo pipefail
HERE=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=../host.sh
. "$REPO/envs/host.sh"
CACHE=${KVMFW_X86_CACHE:-${HOME:-/root}/.cache/kvmfw/x86-linux-kvm}
BUDGET=${KVMFW_X86_BUDGET:-2700}
TOX_LIMIT=${KVMFW_TOX_LIMIT:-5400}
SILENCE=${KVMFW_X86_SILENCE:-180}
CPU=${KVMFW_X86_CPU:-EPYC}
MEM=${KVMFW_X86_MEM:-2048}
RETRIES=${KVMFW_X86_RETRIES:-2}
SUITE=bookworm
export DEBIAN_FRONTEND=noninteractive

# Debian packages of the outer root: Python + C toolchain and <linux/kvm.h> (the core's cffi
# module is compiled there), e2fsprogs (ext4 images for the virtio-blk test), qemu-system-x86
# (the QEMU/KVM reference boots and benchmarks/boot.py).
ROOT_PKGS="python3,python3-venv,python3-dev,gcc,libc6-dev,linux-libc-dev,e2fsprogs,qemu-system-x86,procps"
ROOT_VERSION="2 $SUITE $ROOT_PKGS"        # change to force a rebuild of the cached root
# Python packages always wanted in the venv besides the projects' own dependencies.
PY_BASE="setuptools>=68 wheel cffi>=1.17 pytest>=8"

T0=$(date +%s)
say() { printf '[x86-kvm %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
die() { say "FAILED: $*"; exit 2; }
step() { # step NAME: print the time the previous step took
  local now; now=$(date +%s)
  [ -n "${STEP_NAME:-}" ] && TIMINGS="$TIMINGS ${STEP_NAME}=$(( now - STEP_T ))s"
  STEP_NAME=$1; STEP_T=$now
}
TIMINGS=""

MODE=pytest
case "${1:-}" in
  --shell) MODE=shell; shift;;
  --bench) MODE=bench; shift;;
  --cmd) MODE=cmd; shift;;
esac

[ "$(id -u)" = 0 ] || die "needs root (apt-get, debootstrap, chroot, 9p passthrough); run it with sudo"
[ "$(uname -m)" = x86_64 ] || die "needs an x86_64 host (found $(uname -m))"
mkdir -p "$CACHE"/{debs,logs}
exec 9>"$CACHE/.lock"
flock -w 1800 9 || die "another run holds $CACHE/.lock"

# ------------------------------------------------------------------ host tools
step host-tools
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v cpio >/dev/null || need+=(cpio)
command -v modprobe >/dev/null || need+=(kmod)
command -v unshare >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  say "installing host packages: ${need[*]}"
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || die "apt-get install ${need[*]} failed"
fi
command -v python3 >/dev/null || die "python3 is needed on the host"
# a pip for `pip download`: python3's own, or one made once in the cache (a tox-uv venv
# has no pip)
host_pip "$CACHE" || die "no pip for python3 on the host and none could be made (python3 -m venv, uv venv --seed): apt install python3-pip python3-venv"

# ------------------------------------------------------------------ kernels + busybox (cached)
step kernels
apt_download() { # apt_download PKG: the .deb of PKG in $CACHE/debs (downloaded once)
  local pkg=$1 f
  f=$(ls "$CACHE"/debs/"${pkg}"_*.deb 2>/dev/null | head -1 || true)
  if [ -z "$f" ]; then
    (cd "$CACHE/debs" && apt-get download "$pkg" >/dev/null 2>&1) || {
      apt-get update -qq || die "apt-get update failed"
      (cd "$CACHE/debs" && apt-get download "$pkg" >/dev/null) || die "apt-get download $pkg failed"
    }
    f=$(ls "$CACHE"/debs/"${pkg}"_*.deb | head -1)
  fi
  echo "$f"
}
KVER=${KVMFW_X86_KVER:-$(cat "$CACHE/kver" 2>/dev/null || true)}
if [ -z "$KVER" ]; then
  KVER=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-\(.*\)-amd64$/\1/p' | head -1)
  if [ -z "$KVER" ]; then
    apt-get update -qq || die "apt-get update failed"
    KVER=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: linux-image-\(.*\)-amd64$/\1/p' | head -1)
  fi
  [ -n "$KVER" ] || die "cannot tell the version of Debian's linux-image-amd64 (apt-cache depends)"
  echo "$KVER" > "$CACHE/kver"
fi
K=$CACHE/kernels
for flav in amd64 cloud-amd64; do
  if [ ! -s "$K/$flav/boot/vmlinuz-$KVER-$flav" ]; then
    deb=$(apt_download "linux-image-$KVER-$flav")
    rm -rf "$K/$flav"; mkdir -p "$K/$flav"
    dpkg -x "$deb" "$K/$flav" || die "dpkg -x $deb failed"
  fi
done
if [ ! -x "$CACHE/busybox/bin/busybox" ]; then
  deb=$(apt_download busybox-static)
  rm -rf "$CACHE/busybox"; mkdir -p "$CACHE/busybox"
  dpkg -x "$deb" "$CACHE/busybox" || die "dpkg -x $deb failed"
fi
BUSYBOX=$CACHE/busybox/bin/busybox
L1K=$K/amd64/boot/vmlinuz-$KVER-amd64
say "kernels $KVER (amd64, cloud-amd64), busybox $("$BUSYBOX" | head -1 | awk '{print $2}')"

# ------------------------------------------------------------------ outer root (cached)
step rootfs
ROOT=$CACHE/rootfs
if [ "${KVMFW_X86_REBUILD:-0}" = 1 ] || [ "$(cat "$CACHE/rootfs.stamp" 2>/dev/null)" != "$ROOT_VERSION" ]; then
  say "debootstrapping the outer root in $ROOT (one-off, 1-3 min)"
  rm -rf "$ROOT" "$ROOT.tmp" "$CACHE/rootfs.stamp" "$CACHE/venv.stamp"
  MIRROR=$(host_mirror "$SUITE")
  [ -n "$MIRROR" ] || die "the host's apt configuration names no Debian mirror (apt-get indextargets): add one to /etc/apt/sources.list.d/ or set KVMFW_DEBIAN_MIRROR"
  debootstrap --variant=minbase --include="$ROOT_PKGS" "$SUITE" "$ROOT.tmp" "$MIRROR" \
      > "$CACHE/logs/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/logs/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/logs/debootstrap.log)"; }
  rm -f "$ROOT.tmp"/var/cache/apt/archives/*.deb
  mkdir -p "$ROOT.tmp"/opt/{kvmfw-out,kvmfw-guests}
  mv "$ROOT.tmp" "$ROOT"
  echo "$ROOT_VERSION" > "$CACHE/rootfs.stamp"
fi
in_root() { # in_root CMD...: run CMD chrooted in the outer root (private /proc, /dev; undone at exit)
  unshare --mount --fork sh -c '
    mount --make-rprivate / && mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" &&
    exec chroot "$0" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
      HOME=/root LANG=C.UTF-8 "$@"' "$ROOT" "$@"
}

# ------------------------------------------------------------------ source snapshot
step snapshot
# The checkout as it is (tracked + untracked, not ignored files), copied into the root: the
# editable install and the tests use this private copy, never the shared work tree.
SRC=$ROOT/opt/kvmfw-src
rm -rf "$SRC"; mkdir -p "$SRC"
if [ -n "${KVMFW_X86_SNAPSHOT:-}" ]; then
  # a commit instead of the work tree (e.g. HEAD while others are mid-edit in a shared tree)
  (cd "$REPO" && git archive --format=tar "$KVMFW_X86_SNAPSHOT") | tar -x -C "$SRC" \
    || die "git archive $KVMFW_X86_SNAPSHOT failed"
else
(cd "$REPO" && if git rev-parse --git-dir >/dev/null 2>&1; then
   git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done
 else
   find . -path ./.git -prune -o -type f -print0
 fi | cpio -0 -pdm --quiet "$SRC") || die "copying the checkout to $SRC failed"
fi
PROJECTS=". $(cd "$SRC" && for p in plugins/x86 plugins/devices; do [ -f "$p/pyproject.toml" ] && printf '%s ' "$p"; done)"
say "projects: $PROJECTS"

# ------------------------------------------------------------------ wheels + venv (cached)
step venv
# Third-party dependencies of the core and plugins (runtime + test extras), read from their
# pyproject.toml files; kvmfw's own packages are installed from the snapshot.
DEPS=$(cd "$SRC" && python3 - $PROJECTS <<'EOF'
import re, sys, tomllib
own, deps = set(), set()
for p in sys.argv[1:]:
    meta = tomllib.load(open(f"{p}/pyproject.toml", "rb"))
    proj = meta.get("project", {})
    own.add(proj.get("name", ""))
    reqs = list(proj.get("dependencies", []))
    reqs += proj.get("optional-dependencies", {}).get("test", [])
    reqs += proj.get("optional-dependencies", {}).get("sweep", [])  # tests/linux sweep
    reqs += meta.get("build-system", {}).get("requires", [])
    deps.update(r.replace(" ", "") for r in reqs)
name = lambda r: re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-")
print(" ".join(sorted(d for d in deps if name(d) not in {name(o) for o in own})))
EOF
) || die "reading the projects' dependencies failed"
WHEELS_VERSION="1 $PY_BASE $DEPS"
W=$ROOT/opt/kvmfw-wheels
if [ "$(cat "$CACHE/venv.stamp" 2>/dev/null)" != "$WHEELS_VERSION" ]; then
  say "fetching wheels from PyPI: $PY_BASE $DEPS"
  rm -rf "$W" "$ROOT/opt/kvmfw-venv" "$CACHE/venv.stamp"; mkdir -p "$W"
  # shellcheck disable=SC2086
  "${HOST_PIP[@]}" download -q --only-binary=:all: --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      --python-version 3.11 --implementation cp -d "$W" $PY_BASE $DEPS \
      > "$CACHE/logs/pip-download.log" 2>&1 \
    || { tail -20 "$CACHE/logs/pip-download.log" >&2; die "pip download of the wheels failed"; }
  say "creating the venv /opt/kvmfw-venv in the outer root (offline install)"
  in_root /usr/bin/python3 -m venv /opt/kvmfw-venv || die "python3 -m venv failed in the outer root"
  # shellcheck disable=SC2086
  in_root /opt/kvmfw-venv/bin/pip install -q --no-index --find-links /opt/kvmfw-wheels $PY_BASE $DEPS \
    || die "offline pip install of the dependencies failed in the outer root"
  echo "$WHEELS_VERSION" > "$CACHE/venv.stamp"
fi
# kvmfw's own projects: editable installs of the snapshot (the core's cffi module is compiled
# with the root's gcc against its <linux/kvm.h>), dependencies already present. Compat mode:
# a .pth path entry, as an installed wheel puts its files on sys.path, and not setuptools'
# import-hook finder, which every process would import first (pathlib, urllib, fnmatch: a
# quarter of a second per `kvmfw run` under TCG, that no user's install pays).
for p in $PROJECTS; do
  if ! in_root /opt/kvmfw-venv/bin/pip install -q --no-index --no-build-isolation --no-deps \
        --config-settings editable_mode=compat \
        -e "/opt/kvmfw-src/$p" > "$CACHE/logs/install-${p//\//_}.log" 2>&1; then
    tail -20 "$CACHE/logs/install-${p//\//_}.log" >&2
    [ "$p" = . ] && die "installing the kvmfw core from the checkout failed"
    say "WARNING: installing $p failed (log: $CACHE/logs/install-${p//\//_}.log); its tests will fail"
  fi
done
# Bytecode for the snapshot, written here (native speed) as an installer would: inside, every
# process would otherwise compile each kvmfw module from source under TCG (seconds per
# `kvmfw run`), and guest-run.sh sets PYTHONDONTWRITEBYTECODE, so nothing would ever cache it.
in_root /opt/kvmfw-venv/bin/python -m compileall -q -j 0 /opt/kvmfw-src/kvmfw \
    /opt/kvmfw-src/plugins /opt/kvmfw-src/tests /opt/kvmfw-src/benchmarks \
    > "$CACHE/logs/compileall.log" 2>&1 \
  || say "WARNING: compileall of the snapshot failed (log: $CACHE/logs/compileall.log): start-up will be slower"

# ------------------------------------------------------------------ initramfs images (cached by content)
step initramfs
# mods_closure KROOT KVER MOD...: the .ko files (dependency order) that MOD... need
mods_closure() {
  local kroot=$1 kv=$2; shift 2
  [ -f "$kroot/lib/modules/$kv/modules.dep" ] || depmod -b "$kroot" "$kv"
  for m in "$@"; do
    modprobe -d "$kroot" -S "$kv" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" {print $2}'
  done | awk '!seen[$0]++'
}
mkcpio() { # mkcpio DIR OUT: pack DIR as a newc cpio.gz
  (cd "$1" && find . | cpio -o -H newc --quiet | gzip -6 > "$2.tmp") && mv "$2.tmp" "$2"
}
# The outer guest's initramfs: busybox, kvm/kvm-amd + virtio/9p modules, init-l1.sh.
L1_MODS="kvm-amd virtio_pci 9p 9pnet_virtio"
L1KEY=$(cat "$HERE/init-l1.sh" "$BUSYBOX" | sha256sum | cut -c1-16)-$KVER-$(echo "$L1_MODS" | sha256sum | cut -c1-8)
L1I=$CACHE/initramfs-l1.cpio.gz
if [ "$(cat "$L1I.key" 2>/dev/null)" != "$L1KEY" ] || [ ! -s "$L1I" ]; then
  say "building the outer initramfs"
  D=$CACHE/build/l1; rm -rf "$D"; mkdir -p "$D"/{bin,proc,sys,dev,newroot,lib/modules}
  cp "$BUSYBOX" "$D/bin/busybox"; cp "$HERE/init-l1.sh" "$D/init"; chmod +x "$D/init"
  # shellcheck disable=SC2086
  mods_closure "$K/amd64" "$KVER-amd64" $L1_MODS > "$D/lib/modules/load.list"
  [ -s "$D/lib/modules/load.list" ] || die "no modules found for $L1_MODS in $K/amd64"
  while read -r ko; do
    cp "$ko" "$D/lib/modules/"; echo "/lib/modules/$(basename "$ko")"
  done < "$D/lib/modules/load.list" > "$D/lib/modules/load.list.tmp"
  mv "$D/lib/modules/load.list.tmp" "$D/lib/modules/load.list"
  mkcpio "$D" "$L1I"; echo "$L1KEY" > "$L1I.key"; rm -rf "$D"
fi
# The inner test guests: each kernel + a busybox initramfs with its virtio-blk/ext4 modules.
G=$ROOT/opt/kvmfw-guests
mkdir -p "$G"
L2_MODS="virtio_pci virtio_mmio virtio_blk ext4"
for flav in cloud-amd64 amd64; do
  key=$(cat "$HERE/init-l2.sh" "$BUSYBOX" | sha256sum | cut -c1-16)-$KVER-$(echo "$L2_MODS" | sha256sum | cut -c1-8)
  out=$G/initramfs-$flav.cpio.gz
  if [ "$(cat "$out.key" 2>/dev/null)" != "$key" ] || [ ! -s "$out" ]; then
    say "building the inner initramfs for $flav"
    D=$CACHE/build/l2-$flav; rm -rf "$D"; mkdir -p "$D"/{bin,sbin,proc,sys,dev,mnt,tmp,lib/modules}
    cp "$BUSYBOX" "$D/bin/busybox"; cp "$HERE/init-l2.sh" "$D/init"; chmod +x "$D/init"
    # shellcheck disable=SC2086
    mods_closure "$K/$flav" "$KVER-$flav" $L2_MODS | while read -r ko; do
      cp "$ko" "$D/lib/modules/"; echo "/lib/modules/$(basename "$ko")"
    done > "$D/lib/modules/load.list"
    mkcpio "$D" "$out"; echo "$key" > "$out.key"; rm -rf "$D"
  fi
  cp -f "$K/$flav/boot/vmlinuz-$KVER-$flav" "$G/vmlinuz-$flav"
done
echo "$KVER" > "$G/kernel-version"

# ------------------------------------------------------------------ boot the outer guest
step boot
OUT=$ROOT/opt/kvmfw-out
mkdir -p "$OUT"
printf '%s\n' "$MODE" > "$OUT/mode"
# KVMFW_LINUX_*, KVMFW_BENCH_* and KVMFW_TEST_* variables go through to the tests / benchmark inside
env | grep -E '^KVMFW_(LINUX|BENCH|TEST)_[A-Z0-9_]*=' | sed "s/'/'\\\\''/g; s/=\(.*\)/='\1'/; s/^/export /" > "$OUT/env" || true
if [ $# -gt 0 ]; then printf '%s\n' "$@" > "$OUT/args"; elif [ "$MODE" = pytest ]; then echo tests > "$OUT/args"; else : > "$OUT/args"; fi
LOG=$CACHE/logs/console.log
APPEND="console=ttyS0 panic=-1 quiet loglevel=3${KVMFW_X86_APPEND:+ $KVMFW_X86_APPEND}"
QEMU=(qemu-system-x86_64 -accel tcg -cpu "$CPU" -smp 1 -m "$MEM" -nographic -no-reboot -nic none
      -kernel "$L1K" -initrd "$L1I"
      -virtfs "local,path=$ROOT,mount_tag=kvmfwroot,security_model=none,id=r0")
if [ "$MODE" = shell ]; then
  say "interactive outer guest (poweroff -f or Ctrl-A x to leave)"
  exec "${QEMU[@]}" -append "$APPEND kvmfw.shell"
fi
MON=$CACHE/monitor.sock
monitor() { # monitor CMD...: HMP commands to the running QEMU, their output on stdout
  python3 - "$MON" "$@" <<'EOF' 2>&1 || true
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.settimeout(0.5); s.connect(sys.argv[1])
def read(limit=3.0):
    out, t0 = b"", time.monotonic()
    while time.monotonic() - t0 < limit and not out.rstrip().endswith(b"(qemu)"):
        try:
            d = s.recv(65536)
        except socket.timeout:
            continue
        if not d:
            break
        out += d
    return out.decode(errors="replace")
read()
for c in sys.argv[2:]:
    s.sendall(c.encode() + b"\n")
    print(f"(qemu) {c}\n{read().rsplit('(qemu)', 1)[0].split(chr(10), 1)[-1]}", end="")
EOF
}
# watch PID: wait for the outer guest's QEMU; kill it when it is silent (no console output
# and no heartbeat) for $SILENCE s or runs longer than $TIMEOUT s. Sets WHY ("" if it ended).
watch() {
  local pid=$1 t0 now last_change sig last_sig="" frozen=0
  t0=$(date +%s); last_change=$t0; WHY=""
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    now=$(date +%s)
    sig="$(stat -c %s "$LOG" 2>/dev/null) $(cat "$OUT/alive" 2>/dev/null)"
    if [ "$sig" != "$last_sig" ]; then last_sig=$sig; last_change=$now; fi
    if [ -n "${KVMFW_X86_FAULT_FREEZE:-}" ] && [ "$attempt" = 1 ] && [ "$frozen" = 0 ] \
        && grep -qF -- "$KVMFW_X86_FAULT_FREEZE" "$OUT/current" 2>/dev/null; then
      say "self-test: pausing the outer guest during $(cat "$OUT/current") (KVMFW_X86_FAULT_FREEZE)"
      monitor stop > /dev/null; frozen=1
    fi
    if [ $(( now - last_change )) -ge "$SILENCE" ]; then
      WHY="froze: no console output and no heartbeat for ${SILENCE}s (KVMFW_X86_SILENCE)"
    elif [ $(( now - t0 )) -ge "$TIMEOUT" ]; then
      WHY="did not finish within ${TIMEOUT}s (KVMFW_X86_TIMEOUT)"
    else
      continue
    fi
    { echo "=== run.sh: the outer guest $WHY; its CPU state:"; monitor "info registers" "x/4i \$pc" "info lapic" "info pic"; } \
      >> "$LOG.hang"
    kill "$pid" 2>/dev/null; sleep 2; kill -9 "$pid" 2>/dev/null
    break
  done
  wait "$pid" 2>/dev/null || true
}
QPID=""
stop_qemu() { [ -z "$QPID" ] || kill "$QPID" 2>/dev/null || true; }
trap stop_qemu EXIT  # (a background QEMU ignores the terminal's Ctrl-C)
trap 'stop_qemu; exit 130' INT TERM
attempt=0
HISTORY=""
rm -f "$OUT/retry" "$OUT/done.list" "$OUT/failures.log" "$OUT/current" "$OUT/alive" "$LOG.hang" \
  "$LOG.1" "$CACHE/logs/failures.log"
TB=$(date +%s)
if [ "$BUDGET" -gt 0 ] && [ -n "${KVMFW_TOX_STARTED:-}" ]; then
  # the rest of the tox run's limit, less the reserve for the test running at the deadline
  # (900 s, the boot's timeout past the budget), the sessions that then skip, a retry boot
  left=$(( KVMFW_TOX_STARTED + TOX_LIMIT - TB - 1500 ))
  [ "$left" -ge 600 ] || left=600
  if [ "$left" -lt "$BUDGET" ]; then
    say "time budget cut to ${left}s: tox started $(( TB - KVMFW_TOX_STARTED ))s ago and has ${TOX_LIMIT}s (KVMFW_TOX_LIMIT)"
    BUDGET=$left
  fi
fi
while :; do
  attempt=$((attempt + 1))
  rm -f "$OUT/rc" "$OUT/started" "$OUT/alive" "$OUT/current" "$MON" "$CACHE/qemu.pid"
  # what is left of the time budget, for the tests of this boot (pytest_watchdog.py)
  # and this boot's last resort: the budget's rest plus time for the test then running
  if [ "$BUDGET" -gt 0 ]; then
    left=$(( BUDGET - ($(date +%s) - TB) ))
    echo "$left" > "$OUT/budget"
    [ "$left" -gt 0 ] || left=0
    TIMEOUT=${KVMFW_X86_TIMEOUT:-$(( left + 900 ))}
  else
    rm -f "$OUT/budget"
    TIMEOUT=${KVMFW_X86_TIMEOUT:-2400}
  fi
  say "booting the outer guest ($KVER-amd64, -cpu $CPU -smp 1, ${MEM} MiB, TCG; silence limit ${SILENCE}s, timeout ${TIMEOUT}s, attempt $attempt$([ -e "$OUT/retry" ] && echo ": the tests left")); console log: $LOG"
  set +e
  "${QEMU[@]}" -monitor "unix:$MON,server=on,wait=off" -pidfile "$CACHE/qemu.pid" \
      -serial stdio -append "$APPEND" < /dev/null 2>&1 \
    | tee "$LOG" | grep --line-buffered -v -E "^\[ *[0-9]+\.[0-9]+\]|TCG doesn't support requested feature" &
  i=0; while [ ! -s "$CACHE/qemu.pid" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  QPID=$(cat "$CACHE/qemu.pid" 2>/dev/null || true)
  WHY=""
  [ -n "$QPID" ] && watch "$QPID"
  wait
  QPID=""
  set -e
  [ "$attempt" -gt 1 ] || [ -s "$OUT/rc" ] || cp "$LOG" "$LOG.1"  # the frozen boot's console
  if [ -s "$OUT/rc" ]; then
    HISTORY="$HISTORY attempt $attempt: finished."
    break
  fi
  [ -n "$WHY" ] || WHY="exited without a result"
  if [ -e "$OUT/started" ]; then
    doing=$(cat "$OUT/current" 2>/dev/null || echo "before its first test")
    ndone=$(wc -l < "$OUT/done.list" 2>/dev/null || echo 0)
    what="the outer guest $WHY during $doing, after $ndone tests"
  else
    what="the outer guest $WHY before its tests started"
  fi
  HISTORY="$HISTORY attempt $attempt: $what."
  if [ "$attempt" -gt "$RETRIES" ]; then
    grep -q KVMFW_L1_INIT "$LOG" || die "the outer kernel did not reach /init: qemu $WHY; console log: $LOG"
    grep -q 'KVMFW_L1_KVM ok' "$LOG" || die "no /dev/kvm in the outer guest (kvm_amd did not load: no SVM in -cpu $CPU?); console log: $LOG"
    die "$what; no retries left. Boots:$HISTORY Console log: $LOG$([ -s "$LOG.hang" ] && echo ", CPU state at the hang: $LOG.hang")"
  fi
  if [ -e "$OUT/started" ] && [ "$MODE" = pytest ]; then
    touch "$OUT/retry"
    say "$what: the outer guest failed, not a test (each test has its own limit inside it); retrying the tests left in a fresh boot$([ -s "$LOG.hang" ] && echo " (CPU state at the hang: $LOG.hang)")"
  else
    rm -f "$OUT/retry"
    say "$what: retrying once (known rare TCG hang)"
  fi
done
step done
RC=$(cat "$OUT/rc")
if [ -s "$OUT/failures.log" ]; then
  cp "$OUT/failures.log" "$CACHE/logs/failures.log"
  say "failed tests (whole reports: $CACHE/logs/failures.log); the end of each:"
  awk '/^=== /{ if (n) for (i = (n > 12 ? n - 11 : 1); i <= n; i++) print b[i]; n = 0; print; next }
       { b[++n] = $0 } END { if (n) for (i = (n > 12 ? n - 11 : 1); i <= n; i++) print b[i] }' \
    "$OUT/failures.log" >&2
fi
say "timings:$TIMINGS total=$(( $(date +%s) - T0 ))s"
[ "$attempt" -gt 1 ] && say "boots:$HISTORY"
say "$MODE inside the outer guest exited $RC"
exit "$RC"

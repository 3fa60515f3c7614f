#!/bin/bash
# run-arm64-kvm.sh - run the ARMv8 plugin's tests on a real arm64 KVM, on any Linux host.
#
#   plugins/armv8/env/run-arm64-kvm.sh [pytest args...]   (default: plugins/armv8/tests)
#   plugins/armv8/env/run-arm64-kvm.sh --bench [boot_arm64.py args...]
#       (Linux boot time, kvmfw vs qemu-system-aarch64 -M virt on the inner KVM:
#        benchmarks/boot_arm64.py, e.g. --runs 5 --cpus 1,2 --profile; the first --bench
#        run adds Debian's arm64 qemu-system-arm to the cached root)
#
# How: Debian's stock arm64 kernel boots at EL2 under qemu-system-aarch64 (TCG,
# -M virt,virtualization=on,gic-version=3 -cpu max,pauth=off), which gives the emulated
# machine a working /dev/kvm. Its root file system is a Debian bookworm arm64 tree made
# with `debootstrap --foreign` (python3, gcc, kernel headers) plus aarch64/pure wheels of
# the project's runtime dependencies fetched from PyPI on the host; it is shared over 9p,
# and so is this checkout (read-only). Inside, env/guest-run.sh copies the core and the
# plugin to tmpfs, compiles the core's cffi module with the guest's gcc against the arm64
# <linux/kvm.h> (cached by hash under the cache dir), registers the entry points and runs
# pytest; its exit status becomes this script's exit status.
#
# Everything downloaded or built goes to $KVMFW_ARM64_CACHE (default ~/.cache/kvmfw-arm64),
# outside the checkout. First run: ~5 min (apt + debootstrap). Cached run: ~2-4 min.
# Needs root (apt-get, debootstrap, 9p security_model=none), as CI has.
#
# Environment knobs:
#   KVMFW_ARM64_CACHE    cache dir                      KVMFW_ARM64_TIMEOUT  qemu timeout (s, 900)
#   KVMFW_ARM64_SMP      guest CPUs (2)                 KVMFW_ARM64_MEM      guest MiB (2048)
#   KVMFW_ARM64_REBUILD=1  rebuild the root file system
#   KVMFW_ARM64_ARMHF=0  do not fetch Debian's armhf armmp kernel + busybox (AArch32 boot test)
#   KVMFW_ARM64_ICOUNT   QEMU -icount shift (e.g. 0): the emulated PMU then counts retired
#                        instructions (QEMU's TCG PMU has no INST_RETIRED without it);
#                        single-threaded TCG, slower
#   KVMFW_ARM64_GIC      the emulated host's GIC: 3 (default) or 2 (GICv2 with virtualization
#                        extensions: KVM's vGICv2; the tests then build gic=v2 machines)
#   KVMFW_ARM64_MONITOR  a socket path: the emulated host's QEMU serves its HMP monitor there
#                        (-monitor unix:PATH,server,nowait, e.g. `socat - UNIX-CONNECT:PATH`
#                        then `info jit`) instead of -monitor none; for debugging
set -euo pipefail
HERE=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
# shellcheck source=../../envs/host.sh
. "$REPO/envs/host.sh"
CACHE=${KVMFW_ARM64_CACHE:-${HOME:-/root}/.cache/kvmfw-arm64}
TIMEOUT=${KVMFW_ARM64_TIMEOUT:-900}
SMP=${KVMFW_ARM64_SMP:-2}
MEM=${KVMFW_ARM64_MEM:-2048}
GIC=${KVMFW_ARM64_GIC:-3}
ICOUNT=${KVMFW_ARM64_ICOUNT:-}
MONITOR=${KVMFW_ARM64_MONITOR:+unix:$KVMFW_ARM64_MONITOR,server,nowait}
SUITE=bookworm
export DEBIAN_FRONTEND=noninteractive
MODE=test
if [ "${1:-}" = --bench ]; then MODE=bench; shift; TIMEOUT=${KVMFW_ARM64_TIMEOUT:-2400}; fi

# Debian arm64 packages of the guest root (C toolchain + headers: the core's cffi module is
# compiled inside the guest against the arm64 <linux/kvm.h>; gdb for the GDB stub tests,
# with the boost/icu libraries its source-highlight needs, which --include does not pull).
DEB_PKGS="python3,python3-dev,gcc,libc6-dev,linux-libc-dev,busybox-static,linux-image-arm64,device-tree-compiler,gdb,libboost-regex1.74.0,libicu72"
# PyPI: aarch64 / pure-Python wheels of the runtime and test dependencies (host-side pip).
PY_PKGS="cffi>=1.17 pycparser pluggy>=1.5 stevedore>=5.1 click>=8.1 fdt>=0.3 pytest>=8 setuptools unicorn>=2.1 capstone>=5"
ROOT_VERSION="3 $SUITE $DEB_PKGS"   # change to force a rebuild of the cached root
WHEELS_VERSION="1 $PY_PKGS"

T0=$(date +%s)
say() { printf '[arm64-kvm %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
die() { say "FAILED: $*"; exit 2; }

case "$GIC" in 2|3) ;; *) die "KVMFW_ARM64_GIC must be 2 or 3, not '$GIC'";; esac
[ "$(id -u)" = 0 ] || die "needs root (apt-get, debootstrap, 9p passthrough); run it with sudo"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -w 900 9 || die "another run holds $CACHE/.lock"

# --------------------------------------------------------------- host tools
need=()
command -v qemu-system-aarch64 >/dev/null || need+=(qemu-system-arm)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
  say "installing host packages: ${need[*]}"
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || die "apt-get install ${need[*]} failed"
fi
# a pip for `pip download`: python3's own, or one made once in the cache (a tox-uv venv
# has no pip)
host_pip "$CACHE" || die "no pip for python3 on the host and none could be made (python3 -m venv, uv venv --seed): apt install python3-pip python3-venv"

# --------------------------------------------------------------- guest root (cached)
ROOT=$CACHE/rootfs
if [ "${KVMFW_ARM64_REBUILD:-0}" = 1 ] || [ "$(cat "$CACHE/rootfs.stamp" 2>/dev/null)" != "$ROOT_VERSION" ]; then
  say "building the arm64 root file system in $ROOT (one-off, a few minutes)"
  rm -rf "$ROOT" "$ROOT.tmp" "$CACHE/rootfs.stamp" "$CACHE/initramfs.cpio.gz" "$CACHE/build" \
    "$CACHE/wheels.stamp" "$CACHE/qemu.stamp" "$CACHE/pyc.stamp"  # in the root: redo them
  MIRROR=$(host_mirror "$SUITE")
  [ -n "$MIRROR" ] || die "the host's apt configuration names no Debian mirror (apt-get indextargets): add one to /etc/apt/sources.list.d/ or set KVMFW_DEBIAN_MIRROR"
  say "debootstrap --foreign arm64 $SUITE from $MIRROR"
  debootstrap --foreign --arch=arm64 --variant=minbase --include="$DEB_PKGS" \
      "$SUITE" "$ROOT.tmp" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
  # --foreign unpacks only the 'required' set; unpack the rest too. No second stage is
  # run (no binfmt_misc needed): maintainer scripts never run, which python3 and gcc
  # do not need.
  for f in "$ROOT.tmp"/var/cache/apt/archives/*.deb; do dpkg -x "$f" "$ROOT.tmp"; done
  rm -f "$ROOT.tmp"/var/cache/apt/archives/*.deb
  mkdir -p "$ROOT.tmp"/{project,cache,proc,sys,dev,tmp}
  mv "$ROOT.tmp" "$ROOT"
  echo "$ROOT_VERSION" > "$CACHE/rootfs.stamp"
fi

# --------------------------------------------------------------- Python wheels (cached)
SITE=$ROOT/usr/local/lib/python3.11/dist-packages
if [ "$(cat "$CACHE/wheels.stamp" 2>/dev/null)" != "$WHEELS_VERSION" ]; then
  say "fetching aarch64/pure wheels from PyPI: $PY_PKGS"
  rm -rf "$CACHE/wheels" "$SITE" "$CACHE/wheels.stamp" "$CACHE/pyc.stamp"
  # shellcheck disable=SC2086
  "${HOST_PIP[@]}" download -q --only-binary=:all: --platform manylinux2014_aarch64 \
      --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
      --python-version 3.11 --implementation cp -d "$CACHE/wheels" $PY_PKGS \
      2> "$CACHE/pip.log" || { tail -20 "$CACHE/pip.log" >&2; die "pip download of the aarch64 wheels failed"; }
  mkdir -p "$SITE"
  for w in "$CACHE"/wheels/*.whl; do python3 -m zipfile -e "$w" "$SITE"; done
  echo "$WHEELS_VERSION" > "$CACHE/wheels.stamp"
fi

# --------------------------------------------------------------- QEMU for --bench (cached)
# Debian's arm64 qemu-system-arm, the reference VMM of the boot benchmark, added to the root
# only by --bench runs (the tests do not need it): the package and its dependency closure
# resolved against a private arm64 index (the host's apt state is untouched), and every
# package the root does not already have (debootstrap's debpaths) unpacked into it.
QEMU_VERSION="1 qemu-system-arm"
if [ "$MODE" = bench ] && [ "$(cat "$CACHE/qemu.stamp" 2>/dev/null)" != "$QEMU_VERSION" ]; then
  say "adding Debian's arm64 qemu-system-arm to the root (one-off, for --bench)"
  APTD=$CACHE/arm64-apt
  mkdir -p "$APTD/lists/partial" "$APTD/cache/archives/partial"
  APTO="-o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o Dir::State::Lists=$APTD/lists -o Dir::Cache=$APTD/cache -o Dir::State::status=/dev/null -o Debug::NoLocking=1"
  # shellcheck disable=SC2086
  apt-get $APTO update -qq >/dev/null 2>&1 || true
  # shellcheck disable=SC2086
  apt-get $APTO install -y -qq --download-only --no-install-recommends qemu-system-arm \
      > "$CACHE/qemu-apt.log" 2>&1 || { tail -20 "$CACHE/qemu-apt.log" >&2; die "apt-get could not fetch the arm64 qemu-system-arm (log: $CACHE/qemu-apt.log)"; }
  for f in "$APTD"/cache/archives/*.deb; do
    grep -q "^$(dpkg-deb -f "$f" Package) " "$ROOT/debootstrap/debpaths" 2>/dev/null \
      || dpkg -x "$f" "$ROOT"
  done
  rm -f "$APTD"/cache/archives/*.deb
  [ -x "$ROOT/usr/bin/qemu-system-aarch64" ] || die "no qemu-system-aarch64 in the root after unpacking"
  echo "$QEMU_VERSION" > "$CACHE/qemu.stamp"
fi

# --------------------------------------------------------------- bytecode (cached)
# Debian's postinst scripts (py3compile) and pip's install step are what compile Python
# modules to bytecode; neither ran here, so every guest Python process would compile the
# stdlib and the wheels from source again (seconds each under TCG, and most of a kvmfw
# start-up). Compile them once on the host: .pyc files are portable across machines of one
# Python minor version (3.11 here); -s/-p record the paths the guest sees.
PYC_VERSION="1 $ROOT_VERSION $WHEELS_VERSION"
if [ "$(cat "$CACHE/pyc.stamp" 2>/dev/null)" != "$PYC_VERSION" ]; then
  if python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    say "compiling the root's Python 3.11 stdlib and wheels to bytecode (one-off)"
    python3 -m compileall -q -j0 -s "$ROOT" -p / -x '/(test|tests|lib2to3|idlelib)/' \
      "$ROOT/usr/lib/python3.11" "$SITE" >/dev/null 2>&1 || true
    echo "$PYC_VERSION" > "$CACHE/pyc.stamp"
  else
    say "the host's python3 is not 3.11: guest Python start-ups compile the stdlib each time"
  fi
fi

KERNEL=$(ls "$ROOT"/boot/vmlinuz-* 2>/dev/null | head -1)
[ -n "$KERNEL" ] || die "no arm64 kernel in $ROOT/boot (set KVMFW_ARM64_REBUILD=1)"
KVER=${KERNEL##*/vmlinuz-}

# --------------------------------------------------------------- armhf kernel (cached, optional)
# Debian's 32-bit ARM kernel (linux-image-armmp zImage) and a static armhf busybox for the
# AArch32 guest boot test (tests/test_aarch32_linux.py, which skips without them). Fetched
# with apt-get download against a private armhf index (the host's apt state is untouched).
A32=$CACHE/armhf
if [ "${KVMFW_ARM64_ARMHF:-1}" = 1 ] && { [ ! -s "$A32/zImage" ] || [ ! -s "$A32/busybox" ]; }; then
  say "fetching Debian's armhf armmp kernel and busybox-static (one-off)"
  APTD=$CACHE/armhf-apt
  mkdir -p "$APTD/lists/partial" "$APTD/cache/archives/partial" "$A32.tmp"
  APTO="-o APT::Architecture=armhf -o APT::Architectures::=armhf -o Dir::State::Lists=$APTD/lists -o Dir::Cache=$APTD/cache -o Dir::State::status=/dev/null"
  # shellcheck disable=SC2086
  # update may report a failed optional index (exit 100) with the armhf main index in place
  apt-get $APTO update -qq >/dev/null 2>&1 || true
  if KPKG=$(apt-cache $APTO depends linux-image-armmp 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}') \
     && [ -n "$KPKG" ] \
     && (cd "$A32.tmp" && apt-get $APTO download "$KPKG" busybox-static >/dev/null 2>&1) \
     && dpkg-deb -x "$A32.tmp"/linux-image-*.deb "$A32.tmp/k" \
     && dpkg-deb -x "$A32.tmp"/busybox-static_*.deb "$A32.tmp/b"; then
    mkdir -p "$A32"
    cp "$A32.tmp"/k/boot/vmlinuz-* "$A32/zImage" && cp "$A32.tmp/b/bin/busybox" "$A32/busybox"
  else
    say "could not fetch the armhf files: the AArch32 Linux boot test will skip"
  fi
  rm -rf "$A32.tmp"
fi

# --------------------------------------------------------------- initramfs (cached)
INITRD=$CACHE/initramfs.cpio.gz
if [ ! -s "$INITRD" ] || [ "$HERE/init.sh" -nt "$INITRD" ]; then
  say "building the initramfs (busybox + 9p modules of $KVER)"
  IR=$CACHE/initramfs.d
  rm -rf "$IR"; mkdir -p "$IR"/{bin,proc,sys,dev,newroot,lib/modules}
  cp "$ROOT/bin/busybox" "$IR/bin/busybox"
  cp "$HERE/init.sh" "$IR/init"; chmod +x "$IR/init"
  for m in virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache 9pnet 9pnet_virtio 9p; do
    ko=$(find "$ROOT/lib/modules/$KVER" -name "$m.ko*" | head -1)
    [ -n "$ko" ] && cp "$ko" "$IR/lib/modules/"
  done
  (cd "$IR" && find . | cpio -o -H newc --quiet | gzip -1 > "$INITRD.tmp") && mv "$INITRD.tmp" "$INITRD"
fi

# --------------------------------------------------------------- boot and test
OUT=$CACHE/out
rm -rf "$OUT"; mkdir -p "$OUT" "$CACHE/build"
echo "$GIC" > "$OUT/gic"
echo "$MODE" > "$OUT/mode"
if [ "$MODE" = bench ]; then printf '%s\n' "$@" > "$OUT/bench-args"
elif [ $# -gt 0 ]; then printf '%s\n' "$@" > "$OUT/pytest-args"; else echo plugins/armv8/tests > "$OUT/pytest-args"; fi
LOG=$CACHE/console.log
say "booting $KVER under qemu-system-aarch64 (TCG, GICv$GIC, smp=$SMP, ${MEM} MiB, timeout ${TIMEOUT}s); console log: $LOG"
set +e
timeout --kill-after=10 "$TIMEOUT" qemu-system-aarch64 \
    -M virt,virtualization=on,gic-version="$GIC" -cpu max,pauth=off -smp "$SMP" -m "$MEM" \
    ${ICOUNT:+-icount shift=$ICOUNT} \
    -nographic -no-reboot -monitor "${MONITOR:-none}" \
    -serial stdio -nic none \
    -kernel "$KERNEL" -initrd "$INITRD" \
    -append "console=ttyAMA0 loglevel=3 panic=-1" \
    -virtfs local,path="$ROOT",mount_tag=kvmfwroot,security_model=none,id=r0 \
    -virtfs local,path="$REPO",mount_tag=project,security_model=none,readonly=on,id=p0 \
    -virtfs local,path="$CACHE",mount_tag=cache,security_model=none,id=c0 \
    < /dev/null 2>&1 | tee "$LOG" | grep --line-buffered -v -E '^\[ *[0-9]+\.[0-9]+\]' 
QRC=${PIPESTATUS[0]}
set -e
if [ "$QRC" = 124 ] || [ "$QRC" = 137 ]; then
  die "qemu did not finish within ${TIMEOUT}s (raise KVMFW_ARM64_TIMEOUT); console log: $LOG"
fi
grep -q 'KVMFW_GUEST_INIT' "$LOG" || die "the arm64 kernel did not reach /init (qemu exit $QRC); console log: $LOG"
grep -q 'KVMFW_GUEST_KVM ok' "$LOG" || die "no /dev/kvm inside the arm64 guest (KVM did not initialise at EL2); console log: $LOG"
[ -s "$OUT/rc" ] || die "the guest reported no test result (qemu exit $QRC); console log: $LOG"
RC=$(cat "$OUT/rc")
[ "$MODE" = bench ] && { say "benchmarks/boot_arm64.py inside the arm64 guest exited $RC (total $(( $(date +%s) - T0 ))s); output: $OUT/bench.log"; exit "$RC"; }
say "pytest inside the arm64 guest exited $RC (total $(( $(date +%s) - T0 ))s)"
exit "$RC"

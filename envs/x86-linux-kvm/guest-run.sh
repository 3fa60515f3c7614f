#!/bin/sh
# Runs in the outer guest, chrooted in the outer root: pytest (or benchmarks/boot.py) from the
# snapshot of the checkout, with the venv that holds the editable installs; writes the exit
# status to /opt/kvmfw-out/rc, which run.sh turns into its own.
#
# Bounds (none assumes an idle host): the outer guest's speed is measured first (a fixed
# Python loop against its time in a lightly loaded outer guest: KVMFW_L1_SPEED, at least 1)
# and scales the per-test limit (KVMFW_TEST_TIMEOUT, 300 s x speed; pytest_watchdog.py
# enforces it and says which test) and each Linux boot's limit (KVMFW_LINUX_TIMEOUT, 60 s x
# speed); either can be given on the host instead. A heartbeat (/opt/kvmfw-out/alive: uptime and the test running,
# every 10 s) lets run.sh tell a frozen outer guest from a slow test. After a frozen boot,
# run.sh boots again with /opt/kvmfw-out/retry: only the tests not in done.list run.
export PATH=/opt/kvmfw-venv/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
export HOME=/tmp USER=root LOGNAME=root LANG=C.UTF-8 TERM=dumb PYTHONDONTWRITEBYTECODE=1
# what the Linux tests look for (tests/linux/conftest.py)
export KVMFW_NESTED_ENV=x86-linux-kvm KVMFW_LINUX_GUESTS=/opt/kvmfw-guests
OUT=/opt/kvmfw-out
# shellcheck disable=SC1091
[ -f $OUT/env ] && . $OUT/env
rc=3
up() { cut -d' ' -f1 /proc/uptime; }
# (fsynced: the share is 9p with cache=loose, whose writes the host sees only at writeback)
( while :; do echo "$(up) $(cat $OUT/current 2>/dev/null)" > $OUT/alive.tmp &&
    sync $OUT/alive.tmp && mv $OUT/alive.tmp $OUT/alive; sleep 10; done ) &
HEARTBEAT=$!
finish() { kill $HEARTBEAT 2>/dev/null; echo "$rc" > $OUT/rc; sync; }
trap finish EXIT
touch $OUT/started
cd /opt/kvmfw-src || exit
mode=$(cat $OUT/mode)
set --
while IFS= read -r a; do set -- "$@" "$a"; done < $OUT/args
echo "KVMFW_L1 $mode in $(python3 -c 'import sys; print(sys.prefix, sys.version.split()[0])') /dev/kvm: $(ls -l /dev/kvm 2>&1) uptime=$(up)"
# The outer guest's speed and the limits it gives (pytest_watchdog.measure_speed; each pytest
# session measures again and raises the limits derived here if the machine got slower).
set -- $(python3 /opt/kvmfw-src/envs/x86-linux-kvm/pytest_watchdog.py --bounds 2>/dev/null || echo 1 - 300 60) "$@"
export KVMFW_L1_SPEED=$1 KVMFW_L1_OUT=$OUT KVMFW_L1_DERIVED=""
CALIBRATION=$2
[ -n "${KVMFW_TEST_TIMEOUT:-}" ] || { KVMFW_TEST_TIMEOUT=$3; KVMFW_L1_DERIVED=test; }
[ -n "${KVMFW_LINUX_TIMEOUT:-}" ] || { KVMFW_LINUX_TIMEOUT=$4; KVMFW_L1_DERIVED="$KVMFW_L1_DERIVED,linux"; }
export KVMFW_TEST_TIMEOUT KVMFW_LINUX_TIMEOUT
shift 4
if [ -e $OUT/retry ]; then export KVMFW_L1_RETRY=1; else : > $OUT/done.list; : > $OUT/failures.log; fi
# the time budget (run.sh: KVMFW_X86_BUDGET) as this boot's uptime past which no test starts
if [ -s $OUT/budget ]; then
  KVMFW_L1_DEADLINE=$(awk -v u="$(up)" -v b="$(cat $OUT/budget)" 'BEGIN { printf "%d", u + b }')
  export KVMFW_L1_DEADLINE
  echo "KVMFW_L1 time budget: $(cat $OUT/budget)s left; tests not started by uptime ${KVMFW_L1_DEADLINE}s are skipped"
fi
echo "KVMFW_L1 speed x$KVMFW_L1_SPEED (calibration loop ${CALIBRATION}s): per-test limit ${KVMFW_TEST_TIMEOUT}s, Linux boot limit ${KVMFW_LINUX_TIMEOUT}s$([ -e $OUT/retry ] && echo ", retry of the tests left ($(wc -l < $OUT/done.list) done)")"
export PYTHONPATH=/opt/kvmfw-src/envs/x86-linux-kvm${PYTHONPATH:+:$PYTHONPATH}
# one pytest session per group of arguments; groups are separated by ":::" (test trees with
# same-named conftest modules cannot share a session). rc: the first non-zero one.
# /tmp is a 1 GiB tmpfs: a passed test's tmp_path goes at once (tmp_path_retention_policy),
# or the checkpoints and disk images of earlier sessions leave later ones without room
# (kvmfw refuses a requested checkpoint with under 256 MiB free)
run_group() {
  echo "KVMFW_L1 pytest $* uptime=$(up) /tmp free=$(df -m /tmp | awk 'NR == 2 { print $4 }')MiB"
  n0=$(wc -l < $OUT/done.list)
  { pytest -p no:cacheprovider -p pytest_watchdog -o tmp_path_retention_policy=failed -rs --durations=10 "$@"; echo $? > /tmp/kvmfw-rc; } 2>&1 \
    | tee -a $OUT/pytest.log
  g=$(cat /tmp/kvmfw-rc 2>/dev/null || echo 3)
  stuck=$(tail -n +$((n0 + 1)) $OUT/done.list | grep '^stuck' | cut -f2)
  if [ -n "$stuck" ]; then
    # a test that no signal could end took its session down: run what it left, once
    echo "KVMFW_L1 session ended by a stuck test ($stuck): running the rest of it"
    { KVMFW_L1_RETRY=1 pytest -p no:cacheprovider -p pytest_watchdog -o tmp_path_retention_policy=failed -rs --durations=10 "$@"; echo $? > /tmp/kvmfw-rc; } 2>&1 \
      | tee -a $OUT/pytest.log
    g=$(cat /tmp/kvmfw-rc 2>/dev/null || echo 3)
    [ "$g" = 0 ] && g=1  # the stuck test failed
  fi
  [ "$rc" = 0 ] && rc=$g
}
# The VMMs of a benchmark start from a RAM copy of their files (KVMFW_BENCH_LOCAL=1, the
# default for --bench; 0 keeps them on the share). Every open and stat on the 9p share is a
# round trip to the host through emulated virtio, where a host's own disk answers from its
# page cache: kvmfw (Python: about 100 modules and their directories) reached its first
# KVM_RUN 0.10 s later from the share than from RAM (0.58 against 0.47 s), QEMU (one binary,
# its libraries and firmware) less. That is this environment's cost, not either VMM's, and
# it decided a 6% difference (the arm64 environment stages its benchmark alike). Copied:
# Python's standard library and binary, the venv (less the sweep's pandas, pyarrow and
# numpy), the checkout, the test guests, QEMU's binary, modules and firmware, and each
# binary's shared libraries, each bound over its own path.
local_files() {
  L=/run/kvmfw-local
  mkdir -p $L && mount -t tmpfs -o size=768m kvmfw-local $L || return 1
  for d in /usr/lib/python3.11 /opt/kvmfw-venv /opt/kvmfw-src /opt/kvmfw-guests \
           /usr/share/qemu /usr/share/seabios /usr/lib/ipxe /usr/lib/x86_64-linux-gnu/qemu; do
    [ -d $d ] || continue
    mkdir -p $L$d
    (cd $d && tar cf - --exclude=./lib/python3.11/site-packages/pandas \
       --exclude=./lib/python3.11/site-packages/pyarrow --exclude=./lib/python3.11/site-packages/numpy \
       --exclude=./lib/python3.11/site-packages/numpy.libs --exclude=./test .) \
      | (cd $L$d && tar xf -) && mount --bind $L$d $d || return 1
  done
  for b in /usr/bin/python3.11 /usr/bin/qemu-system-x86_64; do
    for f in $b $(ldd $b | sed -n 's/.*=> \(\/[^ ]*\).*/\1/p; s/^\t\(\/[^ ]*\) .*/\1/p'); do
      f=$(readlink -f "$f")
      [ -e "$L$f" ] && continue
      mkdir -p "$L$(dirname "$f")" && cp -p "$f" "$L$f" && mount --bind "$L$f" "$f" || return 1
    done
  done
  echo "KVMFW_L1 the VMMs' files are in RAM ($(df -m $L | awk 'NR == 2 { print $3 }') MiB; KVMFW_BENCH_LOCAL=0 keeps them on the 9p share)"
}
[ "${KVMFW_BENCH_LOCAL:-$([ "$mode" = bench ] && echo 1 || echo 0)}" = 1 ] && cd / \
  && { local_files || echo "KVMFW_L1 copying the VMMs' files to RAM failed: they stay on the 9p share"; } \
  && cd /opt/kvmfw-src
case "$mode" in
  pytest)
    [ -e $OUT/retry ] || : > $OUT/pytest.log  # (a retry adds to the first boot's log)
    rc=0
    group=""
    set -- "$@" ":::"
    while [ $# -gt 0 ]; do
      a=$1; shift
      if [ "$a" = ":::" ]; then
        # shellcheck disable=SC2086
        [ -n "$group" ] && eval "run_group $group"
        group=""
      else
        group="$group '$(printf '%s' "$a" | sed "s/'/'\\\\''/g")'"
      fi
    done
    ;;
  bench|cmd)
    if [ "$mode" = bench ]; then set -- python3 benchmarks/boot.py "$@"; else set -- sh -c "$*"; fi
    { "$@"; echo $? > /tmp/kvmfw-rc; } 2>&1 | tee $OUT/$mode.log
    rc=$(cat /tmp/kvmfw-rc 2>/dev/null || echo 3)
    ;;
  *) echo "KVMFW_L1 unknown mode $mode"; exit;;
esac
echo "KVMFW_L1 $mode done uptime=$(up)"

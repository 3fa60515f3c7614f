#!/bin/sh
# Runs in the outer guest, chrooted in the outer root: pytest (or benchmarks/boot.py) from the
# snapshot of the checkout, with the venv that holds the editable installs; writes the exit
# status to /opt/kvmfw-out/rc, which run.sh turns into its own.
export PATH=/opt/kvmfw-venv/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
export HOME=/tmp USER=root LOGNAME=root LANG=C.UTF-8 TERM=dumb PYTHONDONTWRITEBYTECODE=1
# what the Linux tests look for (tests/linux/conftest.py)
export KVMFW_NESTED_ENV=x86-linux-kvm KVMFW_LINUX_GUESTS=/opt/kvmfw-guests
OUT=/opt/kvmfw-out
# shellcheck disable=SC1091
[ -f $OUT/env ] && . $OUT/env
rc=3
finish() { echo "$rc" > $OUT/rc; sync; }
trap finish EXIT
touch $OUT/started
cd /opt/kvmfw-src || exit
mode=$(cat $OUT/mode)
set --
while IFS= read -r a; do set -- "$@" "$a"; done < $OUT/args
up() { cut -d' ' -f1 /proc/uptime; }
echo "KVMFW_L1 $mode in $(python3 -c 'import sys; print(sys.prefix, sys.version.split()[0])') /dev/kvm: $(ls -l /dev/kvm 2>&1) uptime=$(up)"
# one pytest session per group of arguments; groups are separated by ":::" (test trees with
# same-named conftest modules cannot share a session). rc: the first non-zero one.
run_group() {
  echo "KVMFW_L1 pytest $* uptime=$(up)"
  { pytest -p no:cacheprovider -rs --durations=10 "$@"; echo $? > /tmp/kvmfw-rc; } 2>&1 \
    | tee -a $OUT/pytest.log
  g=$(cat /tmp/kvmfw-rc 2>/dev/null || echo 3)
  [ "$rc" = 0 ] && rc=$g
}
case "$mode" in
  pytest)
    : > $OUT/pytest.log
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

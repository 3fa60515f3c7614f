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
case "$mode" in
  pytest) set -- pytest -p no:cacheprovider -rs --durations=10 "$@";;
  bench) set -- python3 benchmarks/boot.py "$@";;
  cmd) set -- sh -c "$*";;
  *) echo "KVMFW_L1 unknown mode $mode"; exit;;
esac
{ "$@"; echo $? > /tmp/kvmfw-rc; } 2>&1 | tee $OUT/$mode.log
rc=$(cat /tmp/kvmfw-rc 2>/dev/null || echo 3)
echo "KVMFW_L1 $mode done uptime=$(up)"

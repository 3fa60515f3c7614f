#!/bin/sh
# Runs inside the arm64 guest (chroot into the Debian root): stage the checkout on tmpfs,
# compile the core's cffi module (cached in /cache/build by the hash of its builder),
# register entry points, run pytest, write its exit status to /cache/out/rc.
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/tmp USER=root LOGNAME=root
export PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8
# the emulated host's GIC version (run-arm64-kvm.sh KVMFW_ARM64_GIC): the tests' gic= option
KVMFW_ARM64_GIC=$(cat /cache/out/gic 2>/dev/null || echo 3)
export KVMFW_ARM64_GIC
# loopback up: the GDB stub tests talk to kvmfw over 127.0.0.1
ip link set lo up 2>/dev/null || busybox ip link set lo up 2>/dev/null || true
W=/tmp/src
rc=3
finish() { echo "$rc" > /cache/out/rc; sync; }
trap finish EXIT
mkdir -p $W/plugins/devices
cd /project
for p in kvmfw pyproject.toml tests benchmarks plugins/armv8 plugins/devices/kvmfw_devices \
    plugins/devices/pyproject.toml; do
  [ -e "$p" ] && cp -a "$p" "$W/$(dirname "$p")/"
done
# drop host (x86) build products
find $W -name '__pycache__' -prune -exec rm -rf {} + 2>/dev/null
find $W -name '*x86_64-linux-gnu.so' -delete 2>/dev/null
cd $W
# the core's compiled ABI module, built against the arm64 <linux/kvm.h>
if [ -f kvmfw/abi/_build.py ]; then
  KEY=$(cat kvmfw/abi/_build.py | sha256sum | cut -c1-16)
  SO=/cache/build/_kvm-$KEY.so
  if [ ! -s "$SO" ]; then
    echo "KVMFW_GUEST compiling kvmfw.abi._kvm for aarch64"
    t0=$(cut -d' ' -f1 /proc/uptime)
    if python3 kvmfw/abi/_build.py > /tmp/build.log 2>&1; then
      cp kvmfw/abi/_kvm.cpython-*-aarch64-linux-gnu.so "$SO.tmp" && mv "$SO.tmp" "$SO"
      echo "KVMFW_GUEST compiled in $(python3 -c "import sys; print(round(float(sys.argv[1]) - float(sys.argv[2]), 1))" "$(cut -d' ' -f1 /proc/uptime)" "$t0") s"
    else
      tail -30 /tmp/build.log; echo "KVMFW_GUEST compiling the core's cffi module failed"; rc=4; exit
    fi
  fi
  cp "$SO" kvmfw/abi/_kvm.cpython-311-aarch64-linux-gnu.so
fi
# the guest-side pseudo-op tool for the Linux checkpoint test, static, cached by its hash
OPC=plugins/devices/kvmfw_devices/guest/kvmfwop.c
if [ -f "$OPC" ]; then
  KEY=$(cat "$OPC" plugins/devices/kvmfw_devices/guest/kvmfw_ops.h 2>/dev/null | sha256sum | cut -c1-16)
  OP=/cache/build/kvmfwop-$KEY
  if [ ! -s "$OP" ]; then
    echo "KVMFW_GUEST compiling kvmfwop (static)"
    gcc -O2 -static -o "$OP.tmp" "$OPC" > /tmp/kvmfwop.log 2>&1 && mv "$OP.tmp" "$OP" \
      || { tail -10 /tmp/kvmfwop.log; rm -f "$OP.tmp"; }
  fi
  [ -s "$OP" ] && export KVMFW_ARM64_KVMFWOP="$OP"
fi
# entry points / metadata of the core and the plugins (armv8; devices: PL011, pseudo-ops),
# as an install would write them
python3 plugins/armv8/env/write_dist_info.py site . plugins/armv8 plugins/devices || { rc=5; exit; }
export PYTHONPATH=$W/site:$W:$W/plugins/armv8:$W/plugins/devices
python3 -c "import os, sys; print('KVMFW_GUEST python', sys.version.split()[0], 'kvm', os.path.exists('/dev/kvm'))"
if [ "$(cat /cache/out/mode 2>/dev/null)" = bench ]; then
  # run-arm64-kvm.sh --bench: the boot benchmark instead of the tests, with what an install
  # has and this root lacks (no maintainer script ran): the dynamic linker's cache (QEMU
  # links ~100 libraries) and kvmfw's modules compiled to bytecode (pip does it at install;
  # one process: no /dev/shm for compileall -j here)
  t0=$(cut -d' ' -f1 /proc/uptime)
  ldconfig 2>/dev/null || true
  python3 -m compileall -q kvmfw plugins/armv8/kvmfw_armv8 plugins/devices/kvmfw_devices \
    tests/linux benchmarks site >/dev/null 2>&1 || echo "KVMFW_GUEST compileall failed"
  # What both VMMs start from is on tmpfs, as a real host has it in its page cache: here
  # the root is a 9p share, where every open and stat is a round trip through the emulated
  # virtio transport (~10 ms each: seconds for Python's ~200 imports, QEMU's ~100 libraries).
  # Copies bind-mounted over the originals (the big packages the benchmark never imports
  # are left out).
  R=/tmp/ram
  for f in /usr/bin/python3.11 /usr/bin/qemu-system-aarch64 /boot/vmlinuz-* /bin/busybox \
      $(ldd /usr/bin/qemu-system-aarch64 /usr/bin/python3.11 2>/dev/null \
        | busybox awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u); do
    [ -f "$f" ] || continue
    mkdir -p "$R$(dirname "$f")" && cp -L "$f" "$R$f" && mount --bind "$R$f" "$f" \
      || echo "KVMFW_GUEST could not stage $f on tmpfs"
  done
  for d in /usr/lib/python3.11 /usr/local/lib/python3.11/dist-packages; do
    mkdir -p "$R$d"
    tar -C "$d" -cf - --exclude=./test --exclude=./idlelib --exclude=./lib2to3 \
        --exclude=./tkinter --exclude=./ensurepip --exclude=./unicorn --exclude=./capstone \
        --exclude=./pygments --exclude=./setuptools --exclude=./_pytest . \
      | tar -C "$R$d" -xf - && mount --bind "$R$d" "$d" \
      || echo "KVMFW_GUEST could not stage $d on tmpfs"
  done
  echo "KVMFW_GUEST bench set-up (ldconfig, bytecode, tmpfs copies: $(du -sm $R | cut -f1) MiB) in $(python3 -c "import sys; print(round(float(sys.argv[1]) - float(sys.argv[2]), 1))" "$(cut -d' ' -f1 /proc/uptime)" "$t0") s"
  # shellcheck disable=SC2046
  { python3 benchmarks/boot_arm64.py $(cat /cache/out/bench-args); echo $? > /tmp/bench.rc; } 2>&1 \
    | tee /cache/out/bench.log
  rc=$(cat /tmp/bench.rc 2>/dev/null || echo 3)
  exit
fi
# shellcheck disable=SC2046
{ python3 -m pytest -p no:cacheprovider -rs $(cat /cache/out/pytest-args); echo $? > /tmp/pytest.rc; } 2>&1 \
  | tee /cache/out/pytest.log
rc=$(cat /tmp/pytest.rc 2>/dev/null || echo 3)

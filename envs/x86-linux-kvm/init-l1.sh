#!/bin/busybox sh
# /init of the outer guest (qemu-system-x86_64 -accel tcg -cpu EPYC): load kvm_amd, mount the
# outer root over 9p, run /opt/kvmfw-src/envs/x86-linux-kvm/guest-run.sh chrooted in it, power
# off. Kernel command line: kvmfw.shell = an interactive shell in the root instead.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
up() { cut -d' ' -f1 /proc/uptime; }
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up  # loopback: Dask (tests/linux sweep)
echo "KVMFW_L1_INIT uptime=$(up)"
# modules in dependency order (built by run.sh); kvm_amd with nested paging
while read -r ko; do
  case "$ko" in
    */kvm-amd.ko|*/kvm_amd.ko) insmod "$ko" npt=1 ;;
    *) insmod "$ko" ;;
  esac
done < /lib/modules/load.list
if [ -c /dev/kvm ]; then
  echo "KVMFW_L1_KVM ok ($(dmesg | grep -o -m1 'Nested Paging [a-z]*') uptime=$(up))"
else
  echo "KVMFW_L1_KVM missing"; dmesg | grep -i -E 'kvm|svm' | tail -20
fi
R=/newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose kvmfwroot $R \
  || { echo "KVMFW_L1 mount of the root share failed"; poweroff -f; }
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
ln -sf pts/ptmx $R/dev/ptmx 2>/dev/null || true
mount -t tmpfs shm $R/dev/shm
mount -t tmpfs -o size=1g tmp $R/tmp
for a in $(cat /proc/cmdline); do
  if [ "$a" = kvmfw.shell ]; then
    echo "KVMFW_L1 shell: the outer root is chrooted at $R; exit to power off"
    setsid cttyhack chroot $R /bin/bash -l
    sync; poweroff -f
  fi
done
chroot $R /bin/sh /opt/kvmfw-src/envs/x86-linux-kvm/guest-run.sh
echo "KVMFW_L1_DONE rc=$? uptime=$(up)"
sync
poweroff -f

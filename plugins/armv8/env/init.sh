#!/bin/busybox sh
# /init of the kvmfw arm64 test initramfs: mount the 9p shares (root file system,
# checkout, cache), check /dev/kvm, run env/guest-run.sh in the chroot, power off.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "KVMFW_GUEST_INIT uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache 9pnet 9pnet_virtio 9p; do
  for f in /lib/modules/$m.ko*; do [ -f "$f" ] && insmod "$f" 2>/dev/null; done
done
if [ -c /dev/kvm ]; then
  echo "KVMFW_GUEST_KVM ok"
else
  echo "KVMFW_GUEST_KVM missing"; dmesg | grep -i -E 'kvm|hyp' | tail -20
fi
OPTS=trans=virtio,version=9p2000.L,msize=512000
R=/newroot
mount -t 9p -o $OPTS,cache=loose kvmfwroot $R || { echo "KVMFW_GUEST mount of the root share failed"; poweroff -f; }
mount -t 9p -o $OPTS project $R/project || echo "KVMFW_GUEST mount of the checkout failed"
mount -t 9p -o $OPTS cache $R/cache || echo "KVMFW_GUEST mount of the cache failed"
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mount -t tmpfs -o size=512m tmp $R/tmp
chroot $R /bin/sh /project/plugins/armv8/env/guest-run.sh
echo "KVMFW_GUEST_DONE rc=$? uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f

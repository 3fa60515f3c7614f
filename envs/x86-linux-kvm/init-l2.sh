#!/bin/busybox sh
# /init of the inner test guests (busybox-static initramfs, one per kernel, built by run.sh).
# Prints KVMFW-INIT-OK, runs the test named on the kernel command line, then leaves.
#   kvmfw.test=none (default) | cpus | topology | blk | shell | dmesg | kaslr
#     cpus   prints KVMFW-CPUS=<n> KVMFW-ONLINE=<list>
#     topology  prints the CPU topology Linux derived (cpuinfo's ids, sysfs sibling lists,
#            which vCPUs share each cache),
#            the clocksource, /proc/stat's CPU times, /proc/interrupts and the 16550's counts
#     dmesg  prints the kernel log (with its timestamps) between KVMFW-DMESG-BEGIN and -END:
#            where a boot spends its time, compared between VMMs
#     blk    loads virtio-blk + ext4, mounts /dev/vda read-only, prints
#            KVMFW-BLK-BEGIN, /mnt/hello.txt, KVMFW-BLK-END
#     shell  an interactive busybox shell on the console (prompt "kvmfw# ")
#     kaslr  prints KVMFW-KASLR text=<_text's virtual address> code=<its physical address>
#   kvmfw.exit=poweroff (default) | reboot   how to leave: `poweroff -f` / `reboot -f`
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "KVMFW-INIT-OK uptime=$(cut -d' ' -f1 /proc/uptime)"
TEST=none; EXIT=poweroff
for a in $(cat /proc/cmdline); do case "$a" in
  kvmfw.test=*) TEST=${a#*=};; kvmfw.exit=*) EXIT=${a#*=};;
esac; done
case "$TEST" in
  cpus)
    echo "KVMFW-CPUS=$(grep -c '^processor' /proc/cpuinfo) KVMFW-ONLINE=$(cat /sys/devices/system/cpu/online)"
    ;;
  blk)
    # module.param=value on the kernel command line reaches a loadable module only through
    # its loader (as modprobe does): e.g. virtio_mmio.device=512@0xd0000000:5
    while read -r ko; do
      m=$(basename "$ko" .ko | tr - _); p=""
      for a in $(cat /proc/cmdline); do case "$a" in "$m".*=*) p="$p ${a#"$m".}";; esac; done
      echo "KVMFW-INSMOD $m$p"
      # shellcheck disable=SC2086
      insmod "$ko" $p 2>/dev/null
    done < /lib/modules/load.list
    i=0; while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    if mount -t ext4 -o ro /dev/vda /mnt; then
      echo KVMFW-BLK-BEGIN; cat /mnt/hello.txt; echo KVMFW-BLK-END
      umount /mnt
    else
      echo "KVMFW-BLK-FAIL $(ls /dev/vd* 2>&1) $(cat /proc/partitions | tail -n +3 | tr '\n' ' ')"
    fi
    ;;
  topology)
    grep -E '^(processor|physical id|siblings|core id|cpu cores|apicid|cache size|cpu family|model\s)' /proc/cpuinfo
    for c in /sys/devices/system/cpu/cpu[0-9]*; do
      echo "KVMFW-TOPO ${c##*/} package=$(cat $c/topology/physical_package_id)" \
        "core=$(cat $c/topology/core_id) threads=$(cat $c/topology/thread_siblings_list)" \
        "cores=$(cat $c/topology/core_siblings_list)" \
        "caches=$(for i in $c/cache/index*; do printf 'L%s:%s ' "$(cat $i/level)" \
          "$(cat $i/shared_cpu_list)"; done)"
    done
    echo "KVMFW-CLOCKSOURCE $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)" \
      "available: $(cat /sys/devices/system/clocksource/clocksource0/available_clocksource)"
    grep -E '^cpu' /proc/stat; cat /proc/interrupts; cat /proc/tty/driver/serial
    ;;
  dmesg)
    echo KVMFW-DMESG-BEGIN; dmesg; echo KVMFW-DMESG-END
    ;;
  kaslr)
    echo "KVMFW-KASLR text=$(sed -n 's/^\([0-9a-f]*\) T _text$/\1/p' /proc/kallsyms)" \
      "code=$(sed -n 's/^ *\([0-9a-f]*\)-[0-9a-f]* : Kernel code$/\1/p' /proc/iomem)"
    ;;
  shell)
    echo KVMFW-SHELL
    PS1='kvmfw# ' setsid cttyhack sh
    ;;
esac
echo "KVMFW-EXIT $EXIT"
case "$EXIT" in
  reboot) reboot -f;;
  *) poweroff -f;;
esac

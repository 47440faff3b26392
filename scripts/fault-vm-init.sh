#!/bin/sh
# /init of the fault VM's initramfs (busybox sh, PID 1; built in by scripts/fault-vm.sh).
# Mounts the basics and the 9p share "host" at /mnt/host, brings up QEMU user networking
# (the host's loopback is 10.0.2.2), streams the raw /dev/kmsg to the second serial port,
# runs the script named by cw.run= on the kernel command line, and powers off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /run/lock
[ -e /dev/ttyS1 ] && { cat /dev/kmsg > /dev/ttyS1 & }
modprobe virtio_pci
modprobe virtio_net
modprobe 9pnet_virtio
modprobe 9p
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 host /mnt/host || echo "FAULT-VM: no 9p share"
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
echo "FAULT-VM: ready uptime=$(cut -d' ' -f1 /proc/uptime) boot_id=$(cat /proc/sys/kernel/random/boot_id)"
RUN=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^cw.run=//p')
if [ -n "$RUN" ]; then
  sh "$RUN" < /dev/console > /dev/console 2>&1
  echo "FAULT-VM: script exit=$?"
fi
sync
echo o > /proc/sysrq-trigger
sleep 5

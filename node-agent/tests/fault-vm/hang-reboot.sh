# The guest side of tests/fault_vm.rs (busybox sh, run by the fault VM's /init after every
# boot). The test drives it through files in /mnt/host/ctl: it waits for each step's file.
S=/mnt/host
C=$S/ctl
cat /proc/sys/kernel/random/boot_id >> $C/boots
wait_for() { while [ ! -e "$C/$1" ]; do sleep 0.2; done; }
agent() {
  mkdir -p /tmp/state
  KUBECONFIG=$S/kubeconfig RUST_LOG=info $S/lib/ld-linux-x86-64.so.2 --library-path $S/lib \
    $S/crashwatch-agent run --node-name "$(cat $C/node)" --state-dir /tmp/state \
    --metrics-addr 127.0.0.1:9477 --watch-process dd --hang-threshold 3 \
    --condition-heartbeat 1 --publish-interval 1 --allow-reboot --sysrq-settle 1 \
    > $C/agent-$1.log 2>&1 &
  echo $! > /run/agent.pid
}
if [ "$(wc -l < $C/boots)" -gt 1 ]; then
  echo "SCENARIO: booted again"
  agent second
  wait_for poweroff
  exit 0
fi
modprobe nbd
cp $S/disk.img /tmp/disk.img
# The server in a process of its own: a stopped `qemu-nbd -c` disconnects the device instead.
qemu-nbd -k /run/nbd.sock -f raw -t --fork --pid-file=/run/server.pid /tmp/disk.img
nbd-client -unix /run/nbd.sock /dev/nbd0 -N ''
dd if=/dev/nbd0 of=/dev/null bs=4k count=1 2>/dev/null   # the first open scans partitions
agent first
touch $C/nbd-ready
reader() {
  dd if=/dev/nbd0 of=/dev/null bs=4k count=1 skip=$2 iflag=direct 2>/dev/null &
  echo $! > $C/$1.pid
  sleep 1
  cat /proc/$!/stat > $C/$1.stat
}
wait_for stop
kill -STOP "$(cat /run/server.pid)"
reader reader 3000
wait_for kill9
kill -9 "$(cat $C/reader.pid)"
sleep 2
cat /proc/"$(cat $C/reader.pid)"/stat > $C/reader-after-kill9.stat
wait_for cont
kill -CONT "$(cat /run/server.pid)"
wait_for stop2
kill -STOP "$(cat /run/server.pid)"
reader reader2 5000
# An agent restart (SIGKILL) while both conditions are True: its cursor is past the nbd
# error, so only the reread of the kernel ring can find it again.
wait_for restart-agent
kill -9 "$(cat /run/agent.pid)"
sleep 1
agent restarted
touch $C/agent-restarted
wait_for poweroff

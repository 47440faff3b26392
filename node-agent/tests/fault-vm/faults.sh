# The guest side of tests/fault_vm_kmsg.rs (busybox sh, run once by the fault VM's /init):
# our release agent follows this kernel's live /dev/kmsg while real faults happen. Crashes
# of the host-built static programs in /mnt/host/bin, a hung task on a stopped nbd server,
# and nbd failures. Every pid and result goes to /mnt/host/out for the host to check.
S=/mnt/host
O=$S/out
mkdir -p $O
log() { echo "FAULTS: $*"; }
# The guest's own settings (this kernel belongs to the test): hung tasks reported after 2 s,
# checked every second, every time; no printk rate limit. Never hung_task_panic.
echo 2 > /proc/sys/kernel/hung_task_timeout_secs
echo 1 > /proc/sys/kernel/hung_task_check_interval_secs
echo -1 > /proc/sys/kernel/hung_task_warnings
echo 0 > /proc/sys/kernel/printk_ratelimit
cat /proc/sys/kernel/hung_task_panic > $O/hung_task_panic

# The agent, from the share with its libraries. The /proc watcher's threshold is long: the
# hang must come from the kernel's report. Modules are found in the share by file name.
mkdir -p /tmp/state
$S/lib/ld-linux-x86-64.so.2 --library-path $S/lib $S/crashwatch-agent run --standalone \
  --node-name fault-vm --state-dir /tmp/state --metrics-addr 127.0.0.1:9477 \
  --search-path $S/bin --hang-threshold 600 > $O/events.jsonl 2> $O/agent.log &
AGENT=$!
ready=0
for _ in $(seq 1 300); do
  if wget -q -O - http://127.0.0.1:9477/readyz 2>/dev/null | grep -q '^ok'; then ready=1; break; fi
  kill -0 $AGENT 2>/dev/null || break
  sleep 0.2
done
echo $ready > $O/agent-ready
log "agent ready=$ready"

# Crashes: each program prints pid= (and what else it knows) before it dies.
crash() { out=$O/$1.out; shift; "$@" > "$out" 2>/dev/null; echo "status=$?" >> "$out"; }
crash member $S/bin/nullmember chain
for mode in null gpf div ud2 int3; do crash $mode $S/bin/crashy $mode; done
log "crashes done"

# A hung task: qemu-nbd serves /dev/nbd0 from a process of its own (a stopped `qemu-nbd -c`
# would disconnect the device instead) and is stopped; a buffered reader waits, is killed,
# and as the last user of the device it hangs in its exit path, flushing the page the server
# never sends. The kernel reports it; the server continues once the report is out.
modprobe nbd
serve() { # DEVICE NAME: a server for /dev/DEVICE on /run/NAME.sock, pid in /run/NAME.pid
  cp $S/disk.img /tmp/$2.img
  qemu-nbd -k /run/$2.sock -f raw -t --fork --pid-file=/run/$2.pid /tmp/$2.img
}
waitlog() { # TEXT SECONDS: until the kernel log has TEXT
  for _ in $(seq 1 $(($2 * 5))); do dmesg | grep -qF "$1" && return 0; sleep 0.2; done
  log "no kernel line with: $1"; return 1
}
serve nbd0 hang
nbd-client -unix /run/hang.sock /dev/nbd0 -N ''
dd if=/dev/nbd0 of=/dev/null bs=4k count=1 2>/dev/null # the first open scans partitions
kill -STOP "$(cat /run/hang.pid)"
dd if=/dev/nbd0 of=/dev/null bs=4k count=1 skip=3000 2>/dev/null &
HUNG=$!
echo $HUNG > $O/hung.pid
sleep 1
kill -9 $HUNG
waitlog "INFO: task dd:$HUNG blocked for more than" 30
cat /proc/$HUNG/stat > $O/hung.stat
kill -CONT "$(cat /run/hang.pid)"
wait $HUNG
nbd-client -d /dev/nbd0 2>/dev/null
log "hang done"

# A timeout: nbd-client -t 3, the server stopped under a direct reader. The driver times
# the request out, finds no other connection, shuts the socket down; the read fails.
serve nbd1 timeout
nbd-client -unix /run/timeout.sock /dev/nbd1 -N '' -t 3
dd if=/dev/nbd1 of=/dev/null bs=4k count=1 2>/dev/null
kill -STOP "$(cat /run/timeout.pid)"
dd if=/dev/nbd1 of=/dev/null bs=4k count=1 skip=4000 iflag=direct 2>/dev/null
echo "status=$?" > $O/timeout.out
kill -CONT "$(cat /run/timeout.pid)"
nbd-client -d /dev/nbd1 2>/dev/null
log "timeout done"

# A dead server: killed under a direct reader (no timeout). The receive fails; only a
# disconnect frees the reader, whose read fails.
serve nbd2 dead
nbd-client -unix /run/dead.sock /dev/nbd2 -N ''
dd if=/dev/nbd2 of=/dev/null bs=4k count=1 2>/dev/null
dd if=/dev/nbd2 of=/dev/null bs=4k count=1 skip=5000 iflag=direct 2>/dev/null &
READER=$!
sleep 1
kill -9 "$(cat /run/dead.pid)"
waitlog "block nbd2: Receive control failed" 10
nbd-client -d /dev/nbd2 2>/dev/null
wait $READER
echo "status=$?" > $O/dead.out
log "dead server done"

# The agent drains, then stops (SIGTERM); its events are in out/events.jsonl.
sleep 3
kill -TERM $AGENT
wait $AGENT
echo "status=$?" > $O/agent.exit
log "end"

#!/usr/bin/env bash
# The release agent in a crash storm: CRASHES (default 5000) real segfaults with the printk
# rate limit off (restored on exit), run under GNU time. Prints records seen/lost, the
# agent's CPU time, and its RSS idle, at the end of the storm, and at peak. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
crashes=${CRASHES:-5000}
cargo build --release -p node-agent --quiet
work=$(mktemp -d /tmp/crashwatch-storm.XXXXXX)
old_ratelimit=$(cat /proc/sys/kernel/printk_ratelimit)
cleanup() {
  echo "$old_ratelimit" > /proc/sys/kernel/printk_ratelimit
  [ -n "${agent_pid:-}" ] && kill -TERM "$agent_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
echo 0 > /proc/sys/kernel/printk_ratelimit
gcc -O2 -g -o "$work/crashy" node-agent/tests/programs/crashy.c
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# Start after the newest record, as a fresh node would after its first run.
python3 - "$work" <<'PY'
import os, sys, json
fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK); last = 0
while True:
    try: b = os.read(fd, 8192)
    except BlockingIOError: break
    except BrokenPipeError: continue
    last = int(b.split(b";")[0].split(b",")[1])
boot = open("/proc/sys/kernel/random/boot_id").read().strip()
open(os.path.join(sys.argv[1], "kmsg-cursor.json"), "w").write(json.dumps({"bootId": boot, "lastSeq": last}))
PY
/usr/bin/time -v -o "$work/time.txt" target/release/crashwatch-agent run --standalone \
  --state-dir "$work" --metrics-addr "127.0.0.1:$port" --binary "$work/crashy" >"$work/events.jsonl" 2>"$work/agent.log" &
time_pid=$!
until curl -sf "127.0.0.1:$port/healthz" >/dev/null; do sleep 0.1; done
agent_pid=$(pgrep -P "$time_pid")
sleep 2
rss() { awk '/VmRSS/ {print $2}' "/proc/$agent_pid/status"; }
cpu() { awk '{print $14 + $15}' "/proc/$agent_pid/stat"; }
idle_rss=$(rss); cpu_before=$(cpu)
start=$(date +%s.%N)
# (In a shell of its own, whose "Segmentation fault" notices go nowhere.)
bash -c 'for _ in $(seq "$1"); do "$0" null; done' "$work/crashy" "$crashes" >/dev/null 2>&1 || true
storm=$(python3 -c "print(round($(date +%s.%N) - $start, 2))")
metric() { curl -s "127.0.0.1:$port/metrics" | awk -v m="$1" 'index($1, m) == 1 && substr($1, length(m) + 1, 1) ~ /^[{]?$/ {print $2}'; }
until [ "$(grep -c '"Segfault"' "$work/events.jsonl")" -ge "$crashes" ] || \
      [ "$(metric crashwatch_kmsg_records_lost_total)" != 0 ]; do sleep 0.2; done
sleep 1
storm_rss=$(rss); cpu_after=$(cpu)
seen=$(metric crashwatch_kmsg_records_total); lost=$(metric crashwatch_kmsg_records_lost_total)
kill -TERM "$agent_pid"; wait "$time_pid" || true; agent_pid=
peak=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/time.txt")
ticks=$(getconf CLK_TCK)
echo "storm: $crashes crashes in ${storm}s; records seen $seen, lost $lost; events $(grep -c '"Segfault"' "$work/events.jsonl")"
echo "agent CPU during the storm: $(python3 -c "print(round(($cpu_after - $cpu_before) / $ticks, 2))") s; RSS idle $((idle_rss / 1024)) MiB, after the storm $((storm_rss / 1024)) MiB, peak $((peak / 1024)) MiB"

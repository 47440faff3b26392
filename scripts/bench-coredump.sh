#!/usr/bin/env bash
# The core handler's cost per crash and the time from a crash to its event, on the real
# kernel. A stripped -O2 -fomit-frame-pointer program (node-agent/tests/programs/checkout.c,
# its debug file by build-id) crashes RUNS times (default 30) under each core_pattern:
#
#   none        no dump at all (core_pattern "core", RLIMIT_CORE 0): what a crash costs anyway
#   pipe        a minimal pipe handler, `cat > core`: the kernel's dump into a pipe, no analysis
#   crashwatch  the release agent's handler (run --standalone --core-handler): registers, CFI
#               unwinding, pod lookup, symbolization of every frame, the spool
#
# hyperfine times each crash from exec to exit (with core_pipe_limit > 0 the kernel holds the
# process until the handler is done). Then, with the agent running, the time from starting a
# crash to its event on the agent's stdout. The benchmark fails unless the agent's frames equal
# gdb's `bt` on the core the pipe handler kept. Prints markdown. Needs root, gcc, gdb,
# hyperfine; restores core_pattern and core_pipe_limit on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-30}
cargo build --release -p node-agent --quiet
work=$(mktemp -d /tmp/crashwatch-bench-core.XXXXXX)
old_pattern=$(cat /proc/sys/kernel/core_pattern)
old_limit=$(cat /proc/sys/kernel/core_pipe_limit)
old_ratelimit=$(cat /proc/sys/kernel/printk_ratelimit)
cleanup() {
  echo "$old_ratelimit" > /proc/sys/kernel/printk_ratelimit
  [ -n "${agent_pid:-}" ] && kill -TERM "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null || true
  echo "$old_pattern" > /proc/sys/kernel/core_pattern
  echo "$old_limit" > /proc/sys/kernel/core_pipe_limit
  rm -rf "$work"
}
trap cleanup EXIT
# Every crash gets its kernel line, so each event is the merged one.
echo 0 > /proc/sys/kernel/printk_ratelimit

gcc -O2 -g -fomit-frame-pointer -o "$work/checkout.full" node-agent/tests/programs/checkout.c
id=$(readelf -n "$work/checkout.full" | awk '/Build ID/ {print $3}')
mkdir -p "$work/debug/.build-id/${id:0:2}"
objcopy --only-keep-debug "$work/checkout.full" "$work/debug/.build-id/${id:0:2}/${id:2}.debug"
strip -o "$work/checkout" "$work/checkout.full"
printf '#!/bin/sh\ncat > %s/core\n' "$work" > "$work/pipe-handler"
chmod +x "$work/pipe-handler"

crash() { hyperfine -N --runs "$runs" --warmup 2 --ignore-failure --style none --export-json "$work/$1.json" "$work/checkout" >/dev/null; }
mean_ms() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"][0]; print("%.2f %.2f" % (r["mean"]*1e3, r["stddev"]*1e3))' "$1"; }

echo core > /proc/sys/kernel/core_pattern
(ulimit -c 0; crash none)
echo "|$work/pipe-handler" > /proc/sys/kernel/core_pattern
echo 64 > /proc/sys/kernel/core_pipe_limit
crash pipe
echo "$old_pattern" > /proc/sys/kernel/core_pattern
echo "$old_limit" > /proc/sys/kernel/core_pipe_limit

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/crashwatch-agent run --standalone --core-handler --state-dir "$work/state" \
  --debug-dir "$work/debug" --metrics-addr "127.0.0.1:$port" >"$work/events.jsonl" 2>"$work/agent.log" &
agent_pid=$!
until curl -sf "127.0.0.1:$port/readyz" >/dev/null; do sleep 0.1; done
crash crashwatch

# Crash to event: each crash is started, and the clock stops when its event is printed.
python3 - "$work" "$runs" <<'PY'
import json, os, subprocess, sys, time
work, runs = sys.argv[1], int(sys.argv[2])
events = open(os.path.join(work, "events.jsonl"))
events.seek(0, 2)
took = []
for _ in range(runs):
    start = time.monotonic()
    pid = subprocess.Popen([os.path.join(work, "checkout")], stdout=subprocess.DEVNULL).pid
    pending = ""
    while True:
        line = events.readline()
        if line and not line.endswith("\n"):
            pending += line  # the rest is still being written
            continue
        line, pending = pending + line, ""
        if not line:
            time.sleep(0.002)
            if time.monotonic() - start > 30: sys.exit(f"no event for pid {pid} in 30 s")
            continue
        event = json.loads(line)
        if event.get("pid") == pid:
            took.append(time.monotonic() - start)
            if not event.get("kmsgSeq"): sys.exit(f"pid {pid}: the dump was not merged with its kernel line")
            last = event
            break
took.sort()
json.dump({"median": took[len(took) // 2], "p90": took[int(len(took) * 0.9)], "max": took[-1],
           "frames": [[f.get("function"), f.get("line")] for f in last["frames"]]},
          open(os.path.join(work, "latency.json"), "w"))
PY

# The answers: the agent's frames against gdb's bt on the core the pipe handler kept.
python3 - "$work" <<'PY'
import json, os, re, subprocess, sys
work = sys.argv[1]
ours = [tuple(f) for f in json.load(open(os.path.join(work, "latency.json")))["frames"]]
out = subprocess.run(["gdb", "-batch", "-nx", "-ex", "bt", os.path.join(work, "checkout.full"),
                      os.path.join(work, "core")], capture_output=True, text=True).stdout
bt = out[out.rfind("\n#0 ") + 1:]
gdb = []
for line in bt.splitlines():
    m = re.match(r"#\d+\s+(?:0x[0-9a-f]+ in )?(\S+) \(.*\) at .*:(\d+)$", line)
    if m: gdb.append((m.group(1), int(m.group(2))))
if ours != gdb:
    sys.exit(f"the agent's frames {ours} differ from gdb's bt {gdb}")
PY

read -r none none_sd < <(mean_ms "$work/none.json")
read -r pipe pipe_sd < <(mean_ms "$work/pipe.json")
read -r ours ours_sd < <(mean_ms "$work/crashwatch.json")
python3 - "$none" "$none_sd" "$pipe" "$pipe_sd" "$ours" "$ours_sd" "$work/latency.json" "$runs" <<'PY'
import json, sys
none, none_sd, pipe, pipe_sd, ours, ours_sd = map(float, sys.argv[1:7])
lat = json.load(open(sys.argv[7])); runs = sys.argv[8]
print(f"Each crash, exec to exit, {runs} runs (hyperfine):\n")
print("| core_pattern | mean ms | ± | × no dump | × pipe `cat` |")
print("|---|---|---|---|---|")
for name, m, sd in (("none (no dump)", none, none_sd), ("pipe: `cat > core`", pipe, pipe_sd), ("crashwatch handler", ours, ours_sd)):
    print(f"| {name} | {m:.2f} | {sd:.2f} | {m/none:.2f} | {m/pipe:.2f} |")
print(f"\nCrash to event on the agent's stdout, {runs} crashes: median {lat['median']*1e3:.0f} ms, "
      f"p90 {lat['p90']*1e3:.0f} ms, max {lat['max']*1e3:.0f} ms. "
      f"Frames equal gdb's bt: {' ← '.join(f for f, _ in lat['frames'])}.")
PY

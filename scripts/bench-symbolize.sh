#!/usr/bin/env bash
# Symbolization benchmark: crashwatch-agent explain against llvm-symbolizer and binutils'
# addr2line, on the same addresses of the same large binary, in one run.
#
# The subject is the debug build of crashwatch-agent itself (about 100 MB, most of it
# DWARF). "cold" is one address per process: start, load, answer. "warm" is 1000 addresses
# in one process. crashwatch answers from kernel lines (recognise + symbolize + explain,
# including the member analysis); the references answer from bare addresses.
# Prints markdown to stdout; hyperfine and GNU time do the measuring.
set -euo pipefail
cd "$(dirname "$0")/.."

ADDRESSES=${ADDRESSES:-1000}
RUNS=${RUNS:-5}
work=${KEEP:-$(mktemp -d)}
trap '[[ -n ${KEEP:-} ]] || rm -rf "$work"' EXIT

cargo build -q -p node-agent --bin crashwatch-agent
cargo build -q --release -p node-agent --bin crashwatch-agent
agent=$PWD/target/release/crashwatch-agent
subject=$work/subject
cp target/debug/crashwatch-agent "$subject"

python3 - "$subject" "$ADDRESSES" "$work" <<'EOF'
import subprocess, sys
subject, count, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
loads = []
for line in subprocess.run(["readelf", "-lW", subject], capture_output=True, text=True, check=True).stdout.splitlines():
    f = line.split()
    if f and f[0] == "LOAD":
        loads.append((int(f[1], 16), int(f[2], 16), int(f[4], 16), "E" in f[6:-1]))
functions = []
for line in subprocess.run(["nm", "-S", "--defined-only", subject], capture_output=True, text=True, check=True).stdout.splitlines():
    f = line.split()
    if len(f) == 4 and f[2] in "tT" and int(f[1], 16) > 16:
        functions.append((int(f[0], 16), int(f[1], 16)))
functions.sort()
step = max(1, len(functions) // count)
chosen = [start + size // 2 for start, size in functions[::step]][:count]
text = next(l for l in loads if l[3])
base = 0x5555_0000_0000
with open(f"{work}/addresses", "w") as out:
    out.writelines(f"{a:#x}\n" for a in chosen)
with open(f"{work}/lines", "w") as out:
    for a in chosen:
        offset, vaddr, size, _ = next(l for l in loads if l[1] <= a < l[1] + l[2])
        file_offset = a - vaddr + offset
        start = base + (text[0] & ~0xfff)
        ip = start + file_offset - (text[0] & ~0xfff)
        out.write(f"subject[4242]: segfault at 0 ip {ip:016x} sp 00007ffc00000000 error 4 "
                  f"in subject[{file_offset:x},{start:x}+{text[2]:x}]\n")
head = lambda name: open(f"{work}/{name}").readline()
open(f"{work}/address1", "w").write(head("addresses"))
open(f"{work}/line1", "w").write(head("lines"))
EOF

dwarf_mb=$(readelf -SW "$subject" | python3 -c '
import sys
total = 0
for line in sys.stdin:
    parts = line.replace("[ ", "[").split()
    if len(parts) > 5 and parts[1].startswith(".debug_"):
        total += int(parts[5], 16)
print(f"{total / 1e6:.0f}")')
size_mb=$(($(stat -c %s "$subject") / 1000000))

ours="$agent explain --binary $subject --debug-dir $work/none"
llvm="llvm-symbolizer --obj=$subject --inlining --demangle"
gnu="addr2line -f -i -C -e $subject"

# Same answers? The innermost function of every address, ours against llvm-symbolizer's.
$agent explain --json --binary "$subject" --debug-dir "$work/none" <"$work/lines" >"$work/ours.json"
$llvm <"$work/addresses" >"$work/llvm.txt"
agreement=$(python3 - "$work" <<'EOF'
import json, sys
work = sys.argv[1]
ours = [(json.loads(l).get("frames") or [{}])[0].get("function") for l in open(f"{work}/ours.json")]
# llvm-symbolizer 14 leaves Rust's legacy mangling half done (`_$LT$a..b$GT$::f::h0123…`);
# finish it the way rustc-demangle does, so that names compare.
import re
ESCAPES = {"$LT$": "<", "$GT$": ">", "$u20$": " ", "$C$": ",", "$RF$": "&", "$BP$": "*",
           "$LP$": "(", "$RP$": ")", "$u7b$": "{", "$u7d$": "}", "$u5b$": "[", "$u5d$": "]",
           "$u27$": "'", "$u22$": '"', "$u3b$": ";", "$u3d$": "=", "$u2b$": "+", "$u7e$": "~", "$SP$": "@"}
def rust(name):
    name = re.sub(r"::h[0-9a-f]{16}$", "", name)
    name = re.sub(r"(^|::)_\$", r"\1$", name)
    for escape, text in ESCAPES.items():
        name = name.replace(escape, text)
    return name.replace("..", "::")
theirs = [rust(block.splitlines()[0]) for block in open(f"{work}/llvm.txt").read().strip().split("\n\n")]
same = sum(a == b for a, b in zip(ours, theirs))
print(f"{same} of {len(theirs)} innermost functions equal to llvm-symbolizer's ({len(ours)} events)")
EOF
)

echo "Subject: the debug build of crashwatch-agent, ${size_mb} MB, ${dwarf_mb} MB of DWARF; $(wc -l <"$work/addresses") addresses, one per function. $agreement."
echo
for mode in cold warm; do
  if [[ $mode == cold ]]; then lines=line1 addrs=address1; else lines=lines addrs=addresses; fi
  echo "### $mode ($(wc -l <"$work/$addrs") address(es) per process)"
  echo
  hyperfine --warmup 1 --runs "$RUNS" --style none --export-markdown "$work/$mode.md" \
    -n crashwatch "$ours < $work/$lines > /dev/null" \
    -n llvm-symbolizer "$llvm < $work/$addrs > /dev/null" \
    -n addr2line "$gnu < $work/$addrs > /dev/null" >/dev/null
  cat "$work/$mode.md"
  echo
done
echo "### peak memory (warm, GNU time -v)"
echo
echo "| command | max RSS (MiB) |"
echo "|:---|---:|"
for name in crashwatch llvm-symbolizer addr2line; do
  case $name in
    crashwatch) cmd="$ours < $work/lines" ;;
    llvm-symbolizer) cmd="$llvm < $work/addresses" ;;
    addr2line) cmd="$gnu < $work/addresses" ;;
  esac
  kib=$( { /usr/bin/time -v sh -c "$cmd > /dev/null" ; } 2>&1 | awk -F': ' '/Maximum resident/ {print $2}')
  echo "| $name | $((kib / 1024)) |"
done

#!/usr/bin/env bash
# Symbolization benchmark: crashwatch-agent explain against llvm-symbolizer and binutils'
# addr2line, on the same addresses of the same large binary, in one run.
#
# The subject is the debug build of crashwatch-agent itself (about 200 MB, most of it
# DWARF). The addresses are instruction starts, one per function spread over the binary:
# the memory access nearest the function's middle (so the member analysis runs), else the
# instruction nearest it. The answers are checked before anything is timed: every
# innermost function must equal llvm-symbolizer's (or name the same folded code), else the
# script fails. "cold" is one address per process: start, load, answer. "warm" is 1000
# addresses in one process. crashwatch answers from kernel lines (recognise + symbolize + explain,
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
functions = sorted(set(functions))
step = max(1, len(functions) // count)
picked = functions[::step][:count]
# Crashes happen at instruction starts, and the member analysis runs for instructions that
# access memory: in each function, the memory access nearest its middle (else the
# instruction start nearest it), from objdump's disassembly.
best = {}  # function start -> (is a memory access, -distance to the middle, address)
i = 0
objdump = subprocess.Popen(["objdump", "-d", "-M", "intel", "--no-show-raw-insn", "--section=.text", subject],
                           stdout=subprocess.PIPE, text=True)
for line in objdump.stdout:
    head, tab, text = line.partition(":\t")
    if not tab:
        continue
    try:
        a = int(head.strip(), 16)
    except ValueError:
        continue
    while i < len(picked) and a >= picked[i][0] + picked[i][1]:
        i += 1
    if i == len(picked):
        break
    start, size = picked[i]
    if a < start:
        continue
    mnemonic = (text.split() or [""])[0]
    memory = "[" in text and mnemonic != "lea" and not mnemonic.startswith("nop")
    key = (memory, -abs(a - (start + size // 2)), a)
    if start not in best or key > best[start]:
        best[start] = key
objdump.stdout.close()
objdump.kill()
objdump.wait()
chosen = [(best[start][2], start, best[start][0]) for start, _ in picked if start in best]
text = next(l for l in loads if l[3])
base = 0x5555_0000_0000
with open(f"{work}/addresses", "w") as out:
    out.writelines(f"{a:#x}\n" for a, _, _ in chosen)
with open(f"{work}/starts", "w") as out:
    out.writelines(f"{s:#x}\n" for _, s, _ in chosen)
with open(f"{work}/memory", "w") as out:
    out.write(f"{sum(m for _, _, m in chosen)}\n")
with open(f"{work}/lines", "w") as out:
    for a, _, _ in chosen:
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
# Any difference fails the benchmark, except where identical-code folding gave one piece of
# code the names of several functions and each tool chose another of them.
$agent explain --json --binary "$subject" --debug-dir "$work/none" <"$work/lines" >"$work/ours.json"
$llvm <"$work/addresses" >"$work/llvm.txt"
nm --defined-only "$subject" | awk '$2 ~ /^[tT]$/ {print $1, $3}' >"$work/symbols"
cut -d' ' -f2 "$work/symbols" | llvm-cxxfilt >"$work/demangled"
agreement=$(python3 - "$work" <<'EOF'
import json, re, sys
work = sys.argv[1]
ours = [(json.loads(l).get("frames") or [{}])[0].get("function") for l in open(f"{work}/ours.json")]
# llvm-symbolizer 14 leaves Rust's legacy mangling half done (`_$LT$a..b$GT$::f::h0123…`);
# finish it the way rustc-demangle does, so that names compare.
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
addresses = [l.strip() for l in open(f"{work}/addresses")]
starts = [int(l, 16) for l in open(f"{work}/starts")]
names = {}
for symbol, demangled in zip(open(f"{work}/symbols"), open(f"{work}/demangled")):
    names.setdefault(int(symbol.split()[0], 16), set()).add(rust(demangled.strip()))
if not (len(ours) == len(theirs) == len(addresses)):
    print(f"FAIL: {len(ours)} events and {len(theirs)} llvm-symbolizer answers for {len(addresses)} addresses", file=sys.stderr)
    sys.exit(1)
same = sum(a == b for a, b in zip(ours, theirs))
folded, differ = 0, []
for address, start, a, b in zip(addresses, starts, ours, theirs):
    if a == b:
        continue
    if a in names.get(start, ()) and b in names.get(start, ()):
        folded += 1
    else:
        differ.append(f"{address}: ours {a!r}, llvm-symbolizer {b!r}")
memory = int(open(f"{work}/memory").read())
summary = (f"{same} of {len(theirs)} innermost functions equal to llvm-symbolizer's, {folded} more "
           f"name another function folded into the same code; {memory} of the addresses are memory accesses")
if differ:
    print(f"FAIL: {len(differ)} answers differ ({summary}):", *differ[:20], sep="\n", file=sys.stderr)
    sys.exit(1)
print(summary)
EOF
)

echo "Subject: the debug build of crashwatch-agent, ${size_mb} MB, ${dwarf_mb} MB of DWARF; $(wc -l <"$work/addresses") instruction starts, one per function. $agreement."
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

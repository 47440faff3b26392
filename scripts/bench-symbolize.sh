#!/usr/bin/env bash
# Symbolization benchmark: crashwatch-agent explain against llvm-symbolizer and binutils'
# addr2line, on the same addresses of the same large binaries, in one run.
#
# Subjects: the debug build of crashwatch-agent itself (about 200 MB, most of it DWARF),
# and a generated C++ program with at least $BIG_MIB MiB of DWARF (scripts/dwarf-subject.sh,
# built once into a cache outside the repository; BIG_MIB=0 skips it). The addresses are
# instruction starts, one per function spread over the binary: the memory access nearest
# the function's middle (so the member analysis runs), else the instruction nearest it.
# The answers are checked before anything is timed: the whole chain of frames (function,
# file, line of every inlined frame) must equal llvm-symbolizer's for at least 99.5% of the
# addresses, and every innermost function must (or name the same folded code), else the
# script fails. "cold" is one address per process: start, load, answer. "warm" is all
# addresses in one process. crashwatch answers from kernel lines (recognise + symbolize +
# explain, including the member analysis); the references answer from bare addresses.
# Peak RSS (GNU time -v) is measured for every tool, cold and warm. crashwatch is measured
# twice: as it answers the first crash of a build-id (addr2line over the DWARF), and
# through the symbol index that first crash builds (--symbol-index-dir), whose answers
# must be the very same events; the index's build is timed on its own.
# Prints markdown to stdout; hyperfine and GNU time do the measuring.
set -euo pipefail
cd "$(dirname "$0")/.."

ADDRESSES=${ADDRESSES:-1000}
RUNS=${RUNS:-5}
BIG_MIB=${BIG_MIB:-1024}
work=${KEEP:-$(mktemp -d)}
trap '[[ -n ${KEEP:-} ]] || rm -rf "$work"' EXIT

cargo build -q -p node-agent --bin crashwatch-agent
cargo build -q --release -p node-agent --bin crashwatch-agent
# A copy, so that a rebuild during the run does not change what is measured.
cp target/release/crashwatch-agent "$work/crashwatch"
agent=$work/crashwatch
subjects=("$work/crashwatch-agent")
cp target/debug/crashwatch-agent "$work/crashwatch-agent"
if ((BIG_MIB > 0)); then
  subjects+=("$(scripts/dwarf-subject.sh "$BIG_MIB")")
fi

bench() {
subject=$1
w=$work/$(basename "$subject").d
mkdir -p "$w"
# objdump disassembles one function at a time from a copy without symbols or DWARF,
# which it would otherwise load for every call.
strip -o "$w/stripped" "$subject"

python3 - "$subject" "$ADDRESSES" "$w" <<'EOF'
import os, subprocess, sys
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
for start, size in picked:
    listing = subprocess.run(["objdump", "-d", "-M", "intel", "--no-show-raw-insn",
                              f"--start-address={start:#x}", f"--stop-address={start + size:#x}",
                              f"{work}/stripped"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        head, tab, text = line.partition(":\t")
        if not tab:
            continue
        try:
            a = int(head.strip(), 16)
        except ValueError:
            continue
        mnemonic = (text.split() or [""])[0]
        memory = "[" in text and mnemonic != "lea" and not mnemonic.startswith("nop")
        key = (memory, -abs(a - (start + size // 2)), a)
        if start not in best or key > best[start]:
            best[start] = key
chosen = [(best[start][2], start, best[start][0]) for start, _ in picked if start in best]
text = next(l for l in loads if l[3])
base = 0x5555_0000_0000
with open(f"{work}/addresses", "w") as out:
    out.writelines(f"{a:#x}\n" for a, _, _ in chosen)
with open(f"{work}/starts", "w") as out:
    out.writelines(f"{s:#x}\n" for _, s, _ in chosen)
with open(f"{work}/memory", "w") as out:
    out.write(f"{sum(m for _, _, m in chosen)}\n")
module = os.path.basename(subject)
with open(f"{work}/lines", "w") as out:
    for a, _, _ in chosen:
        offset, vaddr, size, _ = next(l for l in loads if l[1] <= a < l[1] + l[2])
        file_offset = a - vaddr + offset
        start = base + (text[0] & ~0xfff)
        ip = start + file_offset - (text[0] & ~0xfff)
        out.write(f"subject[4242]: segfault at 0 ip {ip:016x} sp 00007ffc00000000 error 4 "
                  f"in {module}[{file_offset:x},{start:x}+{text[2]:x}]\n")
head = lambda name: open(f"{work}/{name}").readline()
open(f"{work}/address1", "w").write(head("addresses"))
open(f"{work}/line1", "w").write(head("lines"))
EOF

dwarf_mib=$(readelf -SW "$subject" | python3 -c '
import sys
total = 0
for line in sys.stdin:
    parts = line.replace("[ ", "[").split()
    if len(parts) > 5 and parts[1].startswith(".debug_"):
        total += int(parts[5], 16)
print(f"{total / 2**20:.0f}")')
size_mib=$(($(stat -c %s "$subject") / 1048576))

ours="$agent explain --binary $subject --debug-dir $w/none"
# The same, through the symbol index (built once below, before anything is timed).
indexed="$ours --symbol-index-dir $w/index"
llvm="llvm-symbolizer --obj=$subject --inlining --demangle"
gnu="addr2line -f -i -C -e $subject"

# Same answers? Every address's chain of frames, ours against llvm-symbolizer's.
$agent explain --json --binary "$subject" --debug-dir "$w/none" <"$w/lines" >"$w/ours.json"
$llvm <"$w/addresses" >"$w/llvm.txt"
nm --defined-only "$subject" | awk '$2 ~ /^[tT]$/ {print $1, $3}' >"$w/symbols"
cut -d' ' -f2 "$w/symbols" | llvm-cxxfilt >"$w/demangled"
agreement=$(python3 - "$w" <<'EOF'
import json, re, sys
work = sys.argv[1]
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
def chain_ours(line):
    frames = json.loads(line).get("frames") or [{}]
    return [(f.get("function") or "??", f.get("file") or "??", f.get("line") or 0) for f in frames]
def chain_theirs(block):
    lines = block.splitlines()
    chain = []
    for function, place in zip(lines[0::2], lines[1::2]):
        parts = place.rsplit(":", 2)
        line = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0
        chain.append((rust(function), parts[0], line))
    return chain
ours = [chain_ours(l) for l in open(f"{work}/ours.json")]
theirs = [chain_theirs(b) for b in open(f"{work}/llvm.txt").read().strip().split("\n\n")]
addresses = [l.strip() for l in open(f"{work}/addresses")]
starts = [int(l, 16) for l in open(f"{work}/starts")]
names = {}
for symbol, demangled in zip(open(f"{work}/symbols"), open(f"{work}/demangled")):
    names.setdefault(int(symbol.split()[0], 16), set()).add(rust(demangled.strip()))
if not (len(ours) == len(theirs) == len(addresses)):
    print(f"FAIL: {len(ours)} events and {len(theirs)} llvm-symbolizer answers for {len(addresses)} addresses", file=sys.stderr)
    sys.exit(1)
# The innermost function must always agree, except where identical-code folding gave one
# piece of code the names of several functions and each tool chose another of them.
same_chain = sum(a == b for a, b in zip(ours, theirs))
same, folded, differ, chains = 0, 0, [], []
for address, start, a, b in zip(addresses, starts, ours, theirs):
    if a != b:
        chains.append(f"{address}: ours {a!r}\n    llvm-symbolizer {b!r}")
    if a[0][0] == b[0][0]:
        same += 1
    elif a[0][0] in names.get(start, ()) and b[0][0] in names.get(start, ()):
        folded += 1
    else:
        differ.append(f"{address}: ours {a[0][0]!r}, llvm-symbolizer {b[0][0]!r}")
memory = int(open(f"{work}/memory").read())
summary = (f"{same_chain} of {len(theirs)} whole chains of frames (function, file, line of each) "
           f"equal to llvm-symbolizer's; {same} innermost functions equal, {folded} more name another "
           f"function folded into the same code; {memory} of the addresses are memory accesses")
with open(f"{work}/differences", "w") as out:
    out.write("\n".join(chains))
if differ or same_chain < 0.995 * len(theirs):
    print(f"FAIL: {len(differ)} innermost functions and {len(chains)} chains differ ({summary}):",
          *(differ or chains)[:20], sep="\n", file=sys.stderr)
    sys.exit(1)
print(summary)
EOF
)

# The first crash of a build-id builds its index (in the background; explain waits for it
# before it exits): one line, from nothing, is that crash's whole cost.
rm -rf "$w/index"
build=$( { /usr/bin/time -f "%e %M" $indexed --json <"$w/line1" >/dev/null; } 2>&1 | tail -1)
# Through the index the answers must be the very same events.
$indexed --json <"$w/lines" >"$w/indexed.json"
if ! cmp -s "$w/ours.json" "$w/indexed.json"; then
  echo "FAIL: answers through the symbol index differ from addr2line's (diff $w/ours.json $w/indexed.json)" >&2
  exit 1
fi
index_mib=$(du -m "$w/index" | cut -f1)

echo "## $(basename "$subject"): ${size_mib} MiB, ${dwarf_mib} MiB of DWARF"
echo
echo "$(wc -l <"$w/addresses") instruction starts, one per function. $agreement. Through the symbol index: the same $(wc -l <"$w/indexed.json") events, byte for byte."
echo
echo "First crash of this build-id, one line from nothing, building the index (${index_mib} MiB): $(echo "$build" | awk '{printf "%.2f s, peak RSS %d MiB", $1, $2 / 1024}')."
echo
for mode in cold warm; do
  if [[ $mode == cold ]]; then lines=line1 addrs=address1; else lines=lines addrs=addresses; fi
  echo "### $mode ($(wc -l <"$w/$addrs") address(es) per process)"
  echo
  hyperfine --warmup 1 --runs "$RUNS" --style none --export-markdown "$w/$mode.md" \
    -n crashwatch "$ours < $w/$lines > /dev/null" \
    -n "crashwatch, indexed" "$indexed < $w/$lines > /dev/null" \
    -n llvm-symbolizer "$llvm < $w/$addrs > /dev/null" \
    -n addr2line "$gnu < $w/$addrs > /dev/null" >/dev/null
  cat "$w/$mode.md"
  echo
done
echo "### peak memory (GNU time -v)"
echo
echo "| command | cold max RSS (MiB) | warm max RSS (MiB) |"
echo "|:---|---:|---:|"
for name in crashwatch "crashwatch, indexed" llvm-symbolizer addr2line; do
  row="| $name |"
  for mode in cold warm; do
    if [[ $mode == cold ]]; then lines=line1 addrs=address1; else lines=lines addrs=addresses; fi
    case $name in
      crashwatch) cmd="$ours < $w/$lines" ;;
      "crashwatch, indexed") cmd="$indexed < $w/$lines" ;;
      llvm-symbolizer) cmd="$llvm < $w/$addrs" ;;
      addr2line) cmd="$gnu < $w/$addrs" ;;
    esac
    kib=$( { /usr/bin/time -v sh -c "$cmd > /dev/null" ; } 2>&1 | awk -F': ' '/Maximum resident/ {print $2}')
    row="$row $((kib / 1024)) |"
  done
  echo "$row"
done
echo
}

echo "# Symbolization: $(date -u +%F), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "Command: \`RUNS=$RUNS ADDRESSES=$ADDRESSES BIG_MIB=$BIG_MIB scripts/bench-symbolize.sh\`"
echo
for subject in "${subjects[@]}"; do
  bench "$subject"
done

#!/usr/bin/env bash
# Builds (once) and prints the path of a C++ program with at least MIB MiB of DWARF, for the
# memory test and the symbolization benchmark.
#
#   scripts/dwarf-subject.sh MIB
#
# One generated C++ translation unit (3000 functions over templated types, with inlined
# template helpers: about 4.7 MB of gcc -O1 -g DWARF, with location lists, range lists and
# .debug_aranges) is compiled once; the subject links tests/programs/crashy.c (main,
# `null` crashes in read_null_offset) with as many copies of that object as it takes to
# reach MIB MiB of DWARF. Everything in the unit has internal linkage (an anonymous
# namespace), so the copies link side by side, each a compilation unit of its own with its
# own code and addresses: the binary has as many units as copies, all real gcc output.
# Built files are kept in $CRASHWATCH_SUBJECT_CACHE (default /var/cache/crashwatch-bench),
# outside the repository, keyed by the generator's and crashy.c's content.
# Times measured on the 2-core VM while other builds ran: compiling the unit 49 s of CPU
# (4.5 min wall at load 11), linking 542 MiB of DWARF 4 s of CPU (34 s wall).
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:?usage: scripts/dwarf-subject.sh MIB}
cache=${CRASHWATCH_SUBJECT_CACHE:-/var/cache/crashwatch-bench}
mkdir -p "$cache"
crashy=$PWD/node-agent/tests/programs/crashy.c

generator=$(cat <<'PY'
import sys
n = int(sys.argv[1])
out = ["#include <cstdint>\nnamespace {\n",
       "template <int N> struct Shape { long a[N % 5 + 1]; double w; Shape<N / 2> inner; };\n",
       "template <> struct Shape<0> { long a[1]; };\n",
       "template <int N, typename T> static inline __attribute__((always_inline)) long mix(const T* s, long i) {\n"
       "  long r = s->a[i % (N % 5 + 1)] * (N + 1);\n  if (r & 1) r ^= s->a[0];\n  return r + i; }\n",
       "template <int N, typename T> static inline __attribute__((always_inline)) long fold(const T* s, long i, long j) {\n"
       "  long r = mix<N>(s, i) + mix<N + 1>(s, j);\n  for (long k = 0; k < (N % 3) + 1; k++) r += mix<N + 2>(s, k + i);\n  return r; }\n"]
for i in range(n):
    out.append(f"struct Rec{i} {{ long id; Shape<{i % 64 + 1}> shape; const char* name; Rec{i}* next; int flags[{i % 7 + 1}]; }};\n")
    out.append(f"__attribute__((used, noinline)) long walk{i}(Rec{i}* r, long limit) {{\n"
               f"  long total = 0;\n  for (long i = 0; r && i < limit; i++, r = r->next) {{\n"
               f"    total += fold<{i % 50}>(&r->shape, i, total) + r->flags[i % {i % 7 + 1}];\n"
               f"    if (total > {1000 + i}) total -= mix<{i % 40}>(&r->shape, r->id);\n  }}\n  return total; }}\n")
out.append("}\n")
sys.stdout.write("".join(out))
PY
)
key=$( (echo "$generator"; cat "$crashy"; g++ --version | head -1) | sha256sum | cut -c1-12)
unit=$cache/unit-$key.o
if [[ ! -s $unit ]]; then
  python3 -c "$generator" 3000 >"$cache/unit-$key.cc"
  g++ -O1 -g -c "$cache/unit-$key.cc" -o "$unit.tmp"
  mv "$unit.tmp" "$unit"
fi

dwarf_bytes() {
  readelf -SW "$1" | python3 -c '
import sys
total = 0
for line in sys.stdin:
    parts = line.replace("[ ", "[").split()
    if len(parts) > 5 and parts[1].startswith(".debug_"):
        total += int(parts[5], 16)
print(total)'
}

out=$cache/dwarf-$mib-$key
if [[ ! -s $out ]]; then
  # The DWARF of one more copy, from links with one and two: the string tables merge
  # across copies.
  gcc -O2 -g -pthread -o "$cache/one-$key" "$crashy" "$unit" -lstdc++
  gcc -O2 -g -pthread -o "$cache/two-$key" "$crashy" "$unit" "$unit" -lstdc++
  one=$(dwarf_bytes "$cache/one-$key")
  per=$(($(dwarf_bytes "$cache/two-$key") - one))
  copies=$(( (mib * 1048576 - one + per - 1) / per + 1 ))
  args=()
  for ((i = 0; i < copies; i++)); do args+=("$unit"); done
  gcc -O2 -g -pthread -o "$out.tmp" "$crashy" "${args[@]}" -lstdc++
  total=$(dwarf_bytes "$out.tmp")
  if ((total < mib * 1048576)); then
    echo "dwarf-subject: $total bytes of DWARF, fewer than $mib MiB" >&2
    exit 1
  fi
  mv "$out.tmp" "$out"
fi
echo "$out"

#!/usr/bin/env bash
# Fuzzes crashwatch-agent's parsers with cargo fuzz (libFuzzer, nightly), each target for
# SECONDS_PER_TARGET (default 300), from seed corpora of real lines, real kmsg records and
# real binaries. Prints one line per target: executions, time, and the result. A crash
# leaves its input in node-agent/fuzz/artifacts/<target>/ and fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${SECONDS_PER_TARGET:-300}
targets=${TARGETS:-kmsg_records elf_symbolize code_disasm}
command -v cargo-fuzz >/dev/null || cargo +nightly install cargo-fuzz --locked --version 0.13.2
work=${FUZZ_WORK:-/var/tmp/crashwatch-fuzz}
corpus=$work/corpus
mkdir -p "$corpus"/{kmsg_records,elf_symbolize,code_disasm}

# Seeds. Lines: every line of the public corpus, and the kernel log of this machine as raw
# /dev/kmsg records (NUL-separated, as the target splits them).
grep -v '^##' node-agent/tests/data/public-kernel-lines.txt | split -l 4 - "$corpus/kmsg_records/public-"
python3 - "$corpus/kmsg_records/this-machine" <<'PY'
import os, sys
fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
records = []
while len(records) < 2000:
    try:
        records.append(os.read(fd, 8192))
    except BlockingIOError:
        break
    except BrokenPipeError:
        continue
open(sys.argv[1], "wb").write(b"\0".join(records))
PY
grep -o 'Code: .*' node-agent/tests/data/public-kernel-lines.txt | split -l 1 - "$corpus/code_disasm/public-"
# Binaries: the test programs built the ways production builds them, and their debug files.
for flags in "-O0 -g" "-O2 -g -fomit-frame-pointer" "-O2 -g -gz=zlib" "-O2 -g -gdwarf-4"; do
  name=$(echo "$flags" | tr -dc 'a-z0-9')
  gcc $flags -o "$work/crashy-$name" node-agent/tests/programs/crashy.c
  cp "$work/crashy-$name" "$corpus/elf_symbolize/crashy-$name"
  objcopy --only-keep-debug "$work/crashy-$name" "$corpus/elf_symbolize/crashy-$name.debug"
  strip -o "$corpus/elf_symbolize/crashy-$name.stripped" "$work/crashy-$name"
done
# …and the member program, whose NULL-member cases give the member analysis real work.
gcc -O2 -g -fomit-frame-pointer -o "$corpus/elf_symbolize/nullmember" node-agent/tests/programs/nullmember.c

cd node-agent
for target in $targets; do
  log=$work/$target.log
  # Binaries are big; kmsg records are at most 8 KiB and Code: lines short.
  case $target in elf_symbolize) max_len=1048576 ;; *) max_len=65536 ;; esac
  if cargo +nightly fuzz run "$target" "$corpus/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -max_len="$max_len" >"$log" 2>&1; then
    result=ok
  else
    result="FAILED (see $log and fuzz/artifacts/$target/)"
  fi
  runs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | tail -1 || true)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  echo "$target: ${runs:-no summary} ($cov): $result"
  [ "$result" = ok ] || exit 1
done

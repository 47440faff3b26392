#!/usr/bin/env bash
# Hang-to-cordon latency: a real hung qemu-nbd (twice), seen by the real agent, published as
# CrashReports, cordoned by the real operator; and report-to-cordon through the operator
# alone; and crash-to-CrashReport latency (30 real crashes, each of a new fingerprint, at the
# default --publish-interval of 2 s, timed on a watch of the API server). Starts its own
# control plane; RUNS repetitions (default 5) of the hang measurements. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
control_plane=$(mktemp -d /tmp/crashwatch-bench-cp.XXXXXX)
trap 'scripts/control-plane.sh stop "$control_plane"; rm -rf "$control_plane"' EXIT
scripts/control-plane.sh start "$control_plane" >/dev/null
export CRASHWATCH_CONTROL_PLANE=$control_plane CI=true
cargo build --workspace --tests --quiet
cargo test --quiet -p node-agent --test kubernetes crash_to_crash_report_latency -- --nocapture 2>&1 |
  grep -o 'crash-to-CrashReport: .*'
for i in $(seq "$runs"); do
  cargo test --quiet -p node-agent --test hang two_real_qemu_nbd_hangs -- --nocapture 2>&1 |
    grep -o 'hang-to-cordon: .*'
  cargo test --quiet -p operator --test remediation the_second_hang_of_qemu_nbd -- --nocapture 2>&1 |
    grep -o 'second report to cordon: .*'
done

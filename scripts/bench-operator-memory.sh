#!/usr/bin/env bash
# Operator memory with NODES Nodes and REPORTS CrashReports (defaults 1000 and 10000) in
# the test control plane: loads them, starts crashwatch-operator (release build) under
# GNU time, lets it reconcile a policy selecting every node for SECONDS (default 30), and
# prints its peak RSS and the RSS once settled.
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=${NODES:-1000}
reports=${REPORTS:-10000}
seconds=${SECONDS_TO_RUN:-30}
cargo build --release -p operator --quiet
control_plane=$(mktemp -d /tmp/crashwatch-bench-cp.XXXXXX)
trap 'scripts/control-plane.sh stop "$control_plane"; rm -rf "$control_plane"' EXIT
scripts/control-plane.sh start "$control_plane" >/dev/null
source "$control_plane/env"
kubectl="$CONTROL_PLANE_BIN/kubectl --kubeconfig $KUBECONFIG"
$kubectl apply --server-side -f crds/crashwatch-crds.yaml >/dev/null
$kubectl wait --for=condition=Established crd/crashreports.crashwatch.dev crd/remediationpolicies.crashwatch.dev >/dev/null
started=$(date +%s)
python3 - "$APISERVER_PORT" "$ADMIN_TOKEN" "$nodes" "$reports" <<'PY'
import json, ssl, sys, urllib.request, concurrent.futures, datetime
port, token, nodes, reports = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ctx = ssl._create_unverified_context()
base = f"https://127.0.0.1:{port}"
def call(method, path, body, content="application/json"):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": content})
    urllib.request.urlopen(req, context=ctx).read()
now = datetime.datetime.now(datetime.timezone.utc)
def node(i):
    call("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
         "metadata": {"name": f"bench-{i:04d}", "labels": {"pool": "bench"}}})
def report(i):
    n = f"bench-{i % nodes:04d}"
    name = f"{n}.hungtask.{i:016x}"
    path = "/apis/crashwatch.dev/v1alpha1/crashreports"
    call("POST", path, {"apiVersion": "crashwatch.dev/v1alpha1", "kind": "CrashReport",
        "metadata": {"name": name},
        "spec": {"nodeName": n, "kind": "HungTask", "comm": "qemu-nbd", "pid": 1000 + i,
                 "location": "bdrv_co_flush block/io.c:3105",
                 "kernelStack": ["fuse_direct_IO+0x2a5/0x3f0", "generic_file_read_iter+0xa1/0x150"]}})
    times = [(now - datetime.timedelta(hours=2, seconds=k)).isoformat() for k in range(3)]
    call("PATCH", f"{path}/{name}/status", {"status": {"count": 3, "firstSeen": times[-1],
        "lastSeen": times[0], "recent": [{"time": t, "pid": 1000 + i} for t in reversed(times)]}},
        "application/merge-patch+json")
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    list(pool.map(node, range(nodes)))
    list(pool.map(report, range(reports)))
PY
echo "loaded $nodes Nodes and $reports CrashReports in $(( $(date +%s) - started )) s"
cat <<YAML | $kubectl apply -f - >/dev/null
apiVersion: crashwatch.dev/v1alpha1
kind: RemediationPolicy
metadata: {name: bench}
spec:
  match: {processNames: [qemu-nbd], kinds: [HungTask], nodeSelector: {matchLabels: {pool: bench}}}
  threshold: {count: 2, window: 30m}
  action: Cordon
YAML
log=$(mktemp)
KUBECONFIG=$KUBECONFIG /usr/bin/time -v -o "$log" target/release/crashwatch-operator run \
  --metrics-addr 127.0.0.1:0 --lease-namespace default 2>/dev/null &
time_pid=$!
sleep "$seconds"
operator_pid=$(pgrep -P "$time_pid")
settled=$(awk '/VmRSS/ {print $2}' "/proc/$operator_pid/status")
reconciled=$($kubectl get rpol bench -o jsonpath='{.status.observedGeneration}')
kill -TERM "$operator_pid"
wait "$time_pid" || true
peak=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$log")
cpu_user=$(awk -F': ' '/User time/ {print $2}' "$log")
cpu_sys=$(awk -F': ' '/System time/ {print $2}' "$log")
echo "operator with $nodes Nodes and $reports CrashReports: peak RSS $((peak / 1024)) MiB, settled RSS $((settled / 1024)) MiB, CPU ${cpu_user}s user + ${cpu_sys}s system over ${seconds}s, policy reconciled (generation ${reconciled:-none})"

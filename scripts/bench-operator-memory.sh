#!/usr/bin/env bash
# Operator memory with NODES Nodes and REPORTS CrashReports (defaults 5000 and 50000) in
# the test control plane: loads them (every HOT-th report is recent and over the
# threshold, on a node with PODS pods, so drains and their Pod watches run), starts
# crashwatch-operator (release build) under GNU time, lets it reconcile a Drain policy
# selecting every node for SECONDS (default 60), then makes one more node cross the
# threshold and times its cordon. Prints peak and settled RSS, CPU, and that latency.
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=${NODES:-5000}
reports=${REPORTS:-50000}
hot=${HOT:-997}  # prime to NODES: the recent reports land on distinct nodes
pods=${PODS:-3}
seconds=${SECONDS_TO_RUN:-60}
cargo build --release -p operator --quiet
control_plane=$(mktemp -d /tmp/crashwatch-bench-cp.XXXXXX)
trap 'scripts/control-plane.sh stop "$control_plane"; rm -rf "$control_plane"' EXIT
scripts/control-plane.sh start "$control_plane" >/dev/null
source "$control_plane/env"
kubectl="$CONTROL_PLANE_BIN/kubectl --kubeconfig $KUBECONFIG"
$kubectl apply --server-side -f crds/crashwatch-crds.yaml >/dev/null
$kubectl wait --for=condition=Established crd/crashreports.crashwatch.dev crd/remediationpolicies.crashwatch.dev >/dev/null
started=$(date +%s)
$kubectl create namespace bench >/dev/null
python3 - "$APISERVER_PORT" "$ADMIN_TOKEN" "$nodes" "$reports" "$hot" "$pods" <<'PY'
import json, ssl, sys, urllib.request, concurrent.futures, datetime
port, token, nodes, reports, hot, pods = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
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
    age = datetime.timedelta(seconds=30) if i % hot == 0 else datetime.timedelta(hours=2)
    times = [(now - age - datetime.timedelta(seconds=k)).isoformat() for k in range(3)]
    if i % hot == 0:
        for p in range(pods):
            call("POST", "/api/v1/namespaces/bench/pods", {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{n}-{p}", "namespace": "bench", "ownerReferences": [
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "rs", "controller": True}]},
                "spec": {"nodeName": n, "terminationGracePeriodSeconds": 30,
                         "containers": [{"name": "c", "image": "registry.invalid/c"}]}})
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
  action: Drain
  safety: {maxUnavailable: "2%", cooldown: 0s}
YAML
log=$(mktemp)
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
KUBECONFIG=$KUBECONFIG /usr/bin/time -v -o "$log" target/release/crashwatch-operator run \
  --metrics-addr "127.0.0.1:$metrics_port" --lease-namespace default 2>/dev/null &
time_pid=$!
sleep "$seconds"
operator_pid=$(pgrep -P "$time_pid")
settled=$(awk '/VmRSS/ {print $2}' "/proc/$operator_pid/status")
reconciled=$($kubectl get rpol bench -o jsonpath='{.status.observedGeneration}')
draining=$($kubectl get rpol bench -o jsonpath='{range .status.nodes[*]}{.state}{"\n"}{end}' | sort | uniq -c | tr -s ' \n' ' ')
# One more node crosses the threshold: time until it is cordoned.
target=bench-$(printf %04d $((nodes - 1)))
latency=$(python3 - "$APISERVER_PORT" "$ADMIN_TOKEN" "$target" <<'PY'
import json, ssl, sys, time, urllib.request, datetime
port, token, node = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = ssl._create_unverified_context()
base = f"https://127.0.0.1:{port}"
def call(method, path, body=None, content="application/json"):
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
        method=method, headers={"Authorization": f"Bearer {token}", "Content-Type": content})
    return json.loads(urllib.request.urlopen(req, context=ctx).read())
path = "/apis/crashwatch.dev/v1alpha1/crashreports"
name = f"{node}.hungtask.ffffffffffffffff"
call("POST", path, {"apiVersion": "crashwatch.dev/v1alpha1", "kind": "CrashReport",
     "metadata": {"name": name}, "spec": {"nodeName": node, "kind": "HungTask", "comm": "qemu-nbd"}})
now = datetime.datetime.now(datetime.timezone.utc)
times = [(now - datetime.timedelta(seconds=k)).isoformat() for k in (1, 0)]
start = time.monotonic()
call("PATCH", f"{path}/{name}/status", {"status": {"count": 2, "firstSeen": times[0],
     "lastSeen": times[1], "recent": [{"time": t} for t in times]}}, "application/merge-patch+json")
while not call("GET", f"/api/v1/nodes/{node}").get("spec", {}).get("unschedulable"):
    if time.monotonic() - start > 60:
        print("never"); sys.exit()
    time.sleep(0.05)
print(f"{time.monotonic() - start:.2f} s")
PY
)
watches=$(curl -s "http://127.0.0.1:$metrics_port/metrics" | awk '/^crashwatch_drain_pod_watches / {print $2}')
final=$(awk '/VmRSS/ {print $2}' "/proc/$operator_pid/status")
kill -TERM "$operator_pid"
wait "$time_pid" || true
peak=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$log")
cpu_user=$(awk -F': ' '/User time/ {print $2}' "$log")
cpu_sys=$(awk -F': ' '/System time/ {print $2}' "$log")
echo "operator with $nodes Nodes and $reports CrashReports ($(( (reports + hot - 1) / hot )) recent, $pods pods on each of their nodes): peak RSS $((peak / 1024)) MiB, settled RSS $((settled / 1024)) MiB after ${seconds}s, $((final / 1024)) MiB at the end; CPU ${cpu_user}s user + ${cpu_sys}s system; policy reconciled (generation ${reconciled:-none}); nodes by state:${draining}; Pod watches open: ${watches:-?}; threshold → cordon: ${latency}"

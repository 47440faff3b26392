#!/usr/bin/env bash
# A real one-node Kubernetes cluster on this machine, for trying crashwatch and for its
# end-to-end tests: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy,
# containerd, runc, the CNI bridge plugin and a kubelet. Images come from OCI archives
# imported into the node's containerd; no registry is used.
#
#   cluster.sh up DIR             start everything; return once the Node is Ready; write
#                                 DIR/kubeconfig
#   cluster.sh load DIR ARCHIVE.. import OCI image archives (scripts/images.sh) into containerd
#   cluster.sh down DIR           delete every pod, stop everything it started (by PID) and undo
#                                 every host change
#
# Needs root, the binaries of scripts/control-plane-tools.sh, and the Debian packages that
# scripts/install-test-deps.sh installs (containerd, runc, containernetworking-plugins,
# iptables, conntrack, gcc). Only one node can run per machine (the bridge, the node name,
# /sys/fs/cgroup/*/kubepods and the kubelet's fixed paths are machine-wide): `up` takes a lock
# that `down` releases, and a second `up` fails at once.
#
# Host changes, all undone by `down`: bridge cw0 (10.244.0.1/24); / made a shared mount (the
# agent's /host volume needs a shared or slave source for mountPropagation, and a machine
# without systemd has private mounts); net.ipv4.ip_forward (the bridge plugin sets it);
# iptables chains of kube-proxy and the kubelet; the kubepods cgroups; mounts, network
# namespaces and fixed directories (/var/lib/kubelet, /var/log/containers, /run/containerd,
# /var/lib/cni) created by the kubelet, containerd and the CNI plugins.
#
# Pods get no default route: only the pod subnet and the service range, both on this machine.
set -euo pipefail

command=${1:-}
dir=${2:-}
[[ $command =~ ^(up|load|down)$ && -n $dir ]] || {
  echo "usage: cluster.sh up|load|down DIR [ARCHIVE...]" >&2
  exit 2
}
shift 2
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)

BRIDGE=cw0
GATEWAY=10.244.0.1
POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.0.0.0/24 # as in control-plane.sh
PAUSE_IMAGE=registry.k8s.io/pause:3.10.1
FIXED_DIRS=(/var/lib/kubelet /var/log/containers /run/containerd /var/lib/cni)
LOCK=/run/crashwatch-cluster.lock
NODE=$(hostname)

log() { echo "cluster: $(date +%T) $*" >&2; }
die() {
  log "$*"
  exit 1
}
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
ctr_() { ctr -a "$dir/containerd/containerd.sock" -n k8s.io "$@"; }

# start_daemon NAME COMMAND...: in a session of its own, output to DIR/NAME.log, pid in
# DIR/NAME.pid.
start_daemon() {
  local name=$1
  shift
  setsid "$@" >>"$dir/$name.log" 2>&1 </dev/null &
  echo $! >"$dir/$name.pid"
}

# stop_pid_file FILE: SIGTERM to the process group it names, SIGKILL after 10 s.
stop_pid_file() {
  local file=$1 pid
  [[ -f $file ]] || return 0
  pid=$(cat "$file")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$file"
}

# until_ok SECONDS WHAT LOG COMMAND...: retries COMMAND every 0.2 s.
until_ok() {
  local seconds=$1 what=$2 logfile=$3
  shift 3
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || {
      tail -30 "$logfile" >&2
      die "$what not ready after $seconds s"
    }
    sleep 0.2
  done
}

load() {
  local archive
  for archive in "$@"; do
    [[ -f $archive ]] || die "no image archive $archive"
    ctr_ images import "$archive" >&2
  done
}

pause_image() {
  local images=$dir/images
  mkdir -p "$images"
  gcc -static -Os -s -o "$images/pause" "$repo/scripts/node/pause.c"
  python3 "$repo/scripts/node/oci-image.py" "$images/pause.tar" "$PAUSE_IMAGE" \
    --entrypoint /pause --file "$images/pause:/pause" --dir /dev --dir /proc --dir /sys >&2
  echo "$images/pause.tar"
}

take_lock() {
  exec 9>>"$LOCK"
  flock -n 9 || die "another cluster is up on this machine (lock $LOCK held by $(cat "$LOCK.owner" 2>/dev/null))"
  # A sleeping process keeps the lock (it shares the open file) until `down` stops it.
  setsid sleep infinity 9>&9 </dev/null >/dev/null 2>&1 &
  echo $! >"$dir/lock.pid"
  echo "$dir" >"$LOCK.owner"
  exec 9>&-
}

up() {
  local t0=$SECONDS bin
  [[ $(id -u) == 0 ]] || die "needs root"
  take_lock
  trap 'status=$?; if ((status)); then log "up failed: undoing"; down; fi' EXIT
  bin=$("$repo/scripts/control-plane-tools.sh")
  local tool
  for tool in containerd runc ctr iptables conntrack gcc /usr/lib/cni/bridge; do
    command -v "$tool" >/dev/null || die "missing $tool: run scripts/install-test-deps.sh"
  done

  # What down must restore.
  cat /proc/sys/net/ipv4/ip_forward >"$dir/ip_forward.before"
  ls /run/netns >"$dir/netns.before" 2>/dev/null || true
  local fixed
  for fixed in "${FIXED_DIRS[@]}"; do [[ -e $fixed ]] || echo "$fixed"; done >"$dir/created-dirs"
  ! ip link show "$BRIDGE" >/dev/null 2>&1 || die "bridge $BRIDGE exists already"
  ip link add "$BRIDGE" type bridge
  touch "$dir/bridge.created"
  ip addr add "$GATEWAY/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  if [[ $(findmnt -no PROPAGATION /) == private ]]; then
    mount --make-shared /
    touch "$dir/root.was-private"
  fi

  "$repo/scripts/control-plane.sh" start "$dir" "$GATEWAY"
  # shellcheck source=/dev/null
  source "$dir/env"
  log "control plane up at https://$GATEWAY:$APISERVER_PORT ($((SECONDS - t0)) s)"

  # containerd: cgroupfs, our pause image as the sandbox image, CNI config in DIR.
  # restrict_oom_score_adj: where root lacks CAP_SYS_RESOURCE (as on this VM), runc cannot
  # give a sandbox its oom_score_adj of -998 ("can't get final child's PID from pipe: EOF").
  mkdir -p "$dir/containerd" "$dir/cni/net.d"
  cat >"$dir/containerd/config.toml" <<EOF
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
[grpc]
  address = "$dir/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/containerd/opt"
EOF
  cat >"$dir/cni/net.d/10-crashwatch.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "crashwatch",
  "plugins": [{
    "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": {
      "type": "host-local", "dataDir": "$dir/cni/ipam",
      "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$GATEWAY"}]],
      "routes": [{"dst": "$SERVICE_CIDR"}]
    }
  }]
}
EOF
  start_daemon containerd containerd --config "$dir/containerd/config.toml"
  until_ok 30 containerd "$dir/containerd.log" ctr_ version
  load "$(pause_image)"
  log "containerd up ($((SECONDS - t0)) s)"

  local kc=$dir/kubeconfig kcm_port scheduler_port kubelet_port kubelet_healthz proxy_healthz proxy_metrics
  kcm_port=$(free_port) scheduler_port=$(free_port) kubelet_port=$(free_port)
  kubelet_healthz=$(free_port) proxy_healthz=$(free_port) proxy_metrics=$(free_port)
  start_daemon kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$kc" --authentication-kubeconfig "$kc" --authorization-kubeconfig "$kc" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" --leader-elect=false \
    --service-account-private-key-file "$dir/sa.key" --root-ca-file "$dir/pki/apiserver.crt"
  start_daemon kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig "$kc" --authentication-kubeconfig "$kc" --authorization-kubeconfig "$kc" \
    --bind-address 127.0.0.1 --secure-port "$scheduler_port" --leader-elect=false

  mkdir -p "$dir/node"
  cat >"$dir/node/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $kc}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:$proxy_healthz
metricsBindAddress: 127.0.0.1:$proxy_metrics
conntrack: {maxPerCore: 0}
EOF
  start_daemon kube-proxy "$bin/kube-proxy" --config "$dir/node/kube-proxy.yaml"

  # The kubelet listens on loopback only, with anonymous access allowed there. The API server
  # reaches it through the node's Hostname address, which resolves to this machine.
  cat >"$dir/node/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $kubelet_healthz
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$dir/containerd/containerd.sock
failSwapOn: false
failCgroupV1: false
oomScoreAdj: 0
podLogsDir: $dir/node/pod-logs
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOF
  start_daemon kubelet "$bin/kubelet" --config "$dir/node/kubelet.yaml" --kubeconfig "$kc" \
    --root-dir "$dir/node/kubelet" --cert-dir "$dir/node/kubelet-pki" --hostname-override "$NODE"
  "$bin/kubectl" --kubeconfig "$kc" wait --for=create "node/$NODE" --timeout=60s >/dev/null
  "$bin/kubectl" --kubeconfig "$kc" wait --for=condition=Ready "node/$NODE" --timeout=120s >/dev/null
  trap - EXIT
  log "node $NODE Ready ($((SECONDS - t0)) s); export KUBECONFIG=$kc"
}

# Removes the KUBE-* chains of kube-proxy and the kubelet, and the rules that jump to them.
remove_kube_chains() {
  local ipt table rule chain chains
  for ipt in iptables ip6tables; do
    for table in filter nat mangle; do
      "$ipt" -t "$table" -S 2>/dev/null |
        awk '$1 == "-A" && $2 !~ /^KUBE-/ && / -j KUBE-/ {sub(/^-A /, "-D "); print}' |
        while read -r rule; do eval "$ipt -t $table $rule" || true; done
      chains=$("$ipt" -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}')
      for chain in $chains; do "$ipt" -t "$table" -F "$chain" || true; done
      for chain in $chains; do "$ipt" -t "$table" -X "$chain" || true; done
    done
  done
}

down() {
  local bin=/nonexistent kc=$dir/kubeconfig
  if [[ -f $dir/env ]]; then
    # shellcheck source=/dev/null
    source "$dir/env"
    bin=$CONTROL_PLANE_BIN
  fi
  # Nothing may recreate pods while they go; the kubelet stops their containers.
  stop_pid_file "$dir/kube-controller-manager.pid"
  stop_pid_file "$dir/kube-scheduler.pid"
  if [[ -f $dir/kubelet.pid && -f $dir/containerd.pid ]]; then
    "$bin/kubectl" --kubeconfig "$kc" delete pods --all --all-namespaces --grace-period=1 \
      --timeout=60s >/dev/null 2>&1 || log "not every pod was deleted in 60 s"
    local deadline=$((SECONDS + 30))
    while [[ -n $(ctr_ tasks ls -q 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.5; done
  fi
  stop_pid_file "$dir/kubelet.pid"
  if [[ -f $dir/kube-proxy.pid ]]; then
    stop_pid_file "$dir/kube-proxy.pid"
    "$bin/kube-proxy" --cleanup >/dev/null 2>&1 || true
  fi
  if [[ -f $dir/containerd.pid ]]; then
    local id
    for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s KILL "$id" >/dev/null 2>&1 || true; done
    sleep 1
    for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$id" >/dev/null 2>&1 || true; done
    stop_pid_file "$dir/containerd.pid"
  fi
  # Shims of this containerd outlive it in sessions of their own: their arguments name its
  # socket, which is in DIR, so these PIDs are ours.
  local pid
  for pid in $(ps -eo pid=,comm=,args= | awk -v sock="$dir/containerd/containerd.sock" '$2 ~ /^containerd-shim/ && index($0, sock) {print $1}'); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  "$repo/scripts/control-plane.sh" stop "$dir"
  # Mounts under DIR (kubelet root, pod volumes, sandbox shm, overlay rootfs), deepest first.
  local mnt
  awk -v d="$dir/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r mnt; do
    umount "$mnt" 2>/dev/null || umount -l "$mnt" || true
  done
  for mnt in /run/netns/cni-*; do
    [[ -e $mnt ]] || continue
    grep -qxF "${mnt##*/}" "$dir/netns.before" 2>/dev/null && continue
    umount "$mnt" 2>/dev/null || true
    rm -f "$mnt"
  done
  local cgroup
  for cgroup in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/unified/kubepods; do
    if [[ -d $cgroup ]]; then find "$cgroup" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
  done
  remove_kube_chains
  local link
  for link in /var/log/containers/*.log; do
    if [[ -L $link && $(readlink "$link") == "$dir/"* ]]; then rm -f "$link"; fi
  done
  rm -f /var/lib/kubelet/device-plugins/kubelet.sock
  if [[ -f $dir/created-dirs ]]; then
    while read -r fixed; do
      if [[ -d $fixed ]]; then find "$fixed" -depth -type d -empty -delete; fi
    done <"$dir/created-dirs"
    rm -f "$dir/created-dirs"
  fi
  if [[ -f $dir/bridge.created ]]; then
    ip link del "$BRIDGE" 2>/dev/null || true
    rm -f "$dir/bridge.created"
  fi
  if [[ -f $dir/ip_forward.before ]]; then
    cat "$dir/ip_forward.before" >/proc/sys/net/ipv4/ip_forward
    rm -f "$dir/ip_forward.before"
  fi
  if [[ -f $dir/root.was-private ]]; then
    mount --make-private /
    rm -f "$dir/root.was-private"
  fi
  if [[ -f $dir/lock.pid ]]; then
    rm -f "$LOCK.owner"
    stop_pid_file "$dir/lock.pid"
  fi
  log "down"
}

case $command in
  up) up ;;
  load) load "$@" ;;
  down) down ;;
esac

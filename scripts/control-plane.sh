#!/usr/bin/env bash
# A real, local Kubernetes control plane for the tests: etcd and kube-apiserver on loopback.
#
#   control-plane.sh start DIR [ADDRESS] start both; write DIR/kubeconfig and DIR/env
#   control-plane.sh stop DIR           stop both (SIGTERM, then SIGKILL)
#   control-plane.sh stop-apiserver DIR stop kube-apiserver only (for outage tests)
#   control-plane.sh start-apiserver DIR start it again on the same port and data
#
# kube-apiserver runs with RBAC, service-account token signing (so TokenRequest works and
# tokens carry the node-name claim) and the default admission plugins, including
# ValidatingAdmissionPolicy, minus ServiceAccount (no controller creates default
# service accounts). The admin authenticates with a static token in system:masters.
# There is no kubelet: Nodes and Pods are plain API objects.
set -euo pipefail

command=${1:?usage: control-plane.sh start|stop|stop-apiserver|start-apiserver DIR}
dir=${2:?usage: control-plane.sh $command DIR}
bin=$("$(dirname "$0")/control-plane-tools.sh")

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for URL SECONDS [CURL ARGS...]: until URL answers with a success status.
wait_for() {
  local url=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  while ((SECONDS < deadline)); do
    if curl -skf --max-time 2 -o /dev/null "$@" "$url" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "control-plane: $url not ok after $seconds s" >&2
  return 1
}

start_apiserver() {
  # shellcheck source=/dev/null
  source "$dir/env"
  local admission=(--disable-admission-plugins ServiceAccount)
  [[ $APISERVER_ADDRESS == 127.0.0.1 ]] || admission=()
  setsid "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --cert-dir "$dir/pki" \
    --secure-port "$APISERVER_PORT" \
    --bind-address "$APISERVER_ADDRESS" \
    --advertise-address "$APISERVER_ADDRESS" \
    --service-cluster-ip-range 10.0.0.0/24 \
    --allow-privileged=true \
    --authorization-mode RBAC \
    "${admission[@]}" \
    --token-auth-file "$dir/tokens.csv" \
    --service-account-issuer "https://127.0.0.1:$APISERVER_PORT/" \
    --service-account-key-file "$dir/sa.key" \
    --service-account-signing-key-file "$dir/sa.key" \
    --api-audiences "https://127.0.0.1:$APISERVER_PORT/" \
    >>"$dir/kube-apiserver.log" 2>&1 &
  echo $! >"$dir/kube-apiserver.pid"
  wait_for "https://$APISERVER_ADDRESS:$APISERVER_PORT/readyz" 120 -H "Authorization: Bearer $ADMIN_TOKEN"
}

stop_pid_file() {
  local file=$1
  [[ -f $file ]] || return 0
  local pid
  pid=$(cat "$file")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$file"
}

case $command in
  start)
    address=${3:-127.0.0.1}
    mkdir -p "$dir/pki" "$dir/etcd"
    etcd_port=$(free_port)
    apiserver_port=$(free_port)
    admin_token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    cat >"$dir/env" <<EOF
ETCD_PORT=$etcd_port
APISERVER_PORT=$apiserver_port
APISERVER_ADDRESS=$address
ADMIN_TOKEN=$admin_token
KUBECONFIG=$dir/kubeconfig
CONTROL_PLANE_BIN=$bin
EOF
    echo "$admin_token,admin,admin-uid,\"system:masters\"" >"$dir/tokens.csv"
    openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
    setsid "$bin/etcd" \
      --data-dir "$dir/etcd" \
      --listen-client-urls "http://127.0.0.1:$etcd_port" \
      --advertise-client-urls "http://127.0.0.1:$etcd_port" \
      --listen-peer-urls http://127.0.0.1:0 \
      --unsafe-no-fsync \
      >"$dir/etcd.log" 2>&1 &
    echo $! >"$dir/etcd.pid"
    wait_for "http://127.0.0.1:$etcd_port/health" 60 ||
      { tail -20 "$dir/etcd.log" >&2; exit 1; }
    start_apiserver || { tail -30 "$dir/kube-apiserver.log" >&2; exit 1; }
    cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://$address:$apiserver_port
    certificate-authority: $dir/pki/apiserver.crt
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
users:
- name: admin
  user: {token: $admin_token}
EOF
    echo "control-plane: up at https://$address:$apiserver_port; KUBECONFIG=$dir/kubeconfig" >&2
    ;;
  stop)
    stop_pid_file "$dir/kube-apiserver.pid"
    stop_pid_file "$dir/etcd.pid"
    ;;
  stop-apiserver)
    stop_pid_file "$dir/kube-apiserver.pid"
    ;;
  start-apiserver)
    start_apiserver || { tail -30 "$dir/kube-apiserver.log" >&2; exit 1; }
    ;;
  *)
    echo "unknown command $command" >&2
    exit 2
    ;;
esac

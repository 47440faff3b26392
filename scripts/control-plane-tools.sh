#!/usr/bin/env bash
# Builds pinned Kubernetes (kube-apiserver, kubectl, and the node's kube-controller-manager,
# kube-scheduler, kubelet and kube-proxy), etcd, helm and promtool from the Go module proxy.
#
# Binaries, GOMODCACHE and GOCACHE live under $CRASHWATCH_TOOLS (default
# /var/cache/crashwatch-tools), outside the repository, so a second run only
# checks that every pinned binary is there. Each tool is built in a helper module
# of its own so that minimal version selection picks what that tool's upstream
# picks. Prints the directory holding the binaries on its last line.
set -euo pipefail

K8S_VERSION=v1.34.4
ETCD_VERSION=v3.6.16
HELM_VERSION=v4.3.1
PROMETHEUS_MODULE_VERSION=v0.316.0 # Prometheus 3.16.0
# Built from one helper module; the last four run the one-node cluster of scripts/cluster.sh.
# CGO_ENABLED=0 gives a static kubelet that runs (no cgo-only features are used).
KUBERNETES_COMMANDS=(kube-apiserver kubectl kube-controller-manager kube-scheduler kubelet kube-proxy)

TOOLS=${CRASHWATCH_TOOLS:-/var/cache/crashwatch-tools}
BIN=$TOOLS/bin
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false
export GOMODCACHE=$TOOLS/gomod GOCACHE=$TOOLS/gocache
mkdir -p "$BIN" "$TOOLS/modules"
# One build at a time: a second caller waits, then finds the binaries there.
exec 9>>"$TOOLS/.lock"
flock 9

log() { echo "control-plane-tools: $*" >&2; }

# A fresh helper module at $TOOLS/modules/$1.
helper_module() {
  local dir=$TOOLS/modules/$1
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  go mod init "crashwatch.tools/$1" >/dev/null 2>&1
}

# The path of the go.mod file the proxy serves for module $1 at version $2.
upstream_go_mod() {
  go mod download -json "$1@$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])'
}

# Copies the replace and exclude directives of go.mod file $1 into the current module.
copy_replaces_and_excludes() {
  go mod edit -json "$1" | python3 -c '
import json, sys
mod = json.load(sys.stdin)
for r in mod.get("Replace") or []:
    old, new = r["Old"], r["New"]
    if new["Path"].startswith("."):
        continue  # a path inside the upstream repository, meaningless here
    lhs = old["Path"] + ("@" + old["Version"] if old.get("Version") else "")
    rhs = new["Path"] + ("@" + new["Version"] if new.get("Version") else "")
    print("-replace=" + lhs + "=" + rhs)
for e in mod.get("Exclude") or []:
    print("-exclude=" + e["Path"] + "@" + e["Version"])
' | xargs -r go mod edit
}

build_kubernetes() {
  local minor=${K8S_VERSION#v1.}
  minor=${minor%%.*}
  helper_module "kubernetes-$K8S_VERSION"
  go mod edit -require "k8s.io/kubernetes@$K8S_VERSION"
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them
  # with ./staging/...; point each one at its published v0.X.Y instead.
  local staging_version=v0.${K8S_VERSION#v1.}
  grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$(upstream_go_mod k8s.io/kubernetes "$K8S_VERSION")" |
    awk '{print $1}' | while read -r module; do
    go mod edit -replace "$module=$module@$staging_version"
  done
  local pkgs=()
  for cmd in "${KUBERNETES_COMMANDS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$cmd@$K8S_VERSION"); done
  go get "${pkgs[@]}"
  local date
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  for cmd in "${KUBERNETES_COMMANDS[@]}"; do
    [[ -x $BIN/$cmd-$K8S_VERSION ]] && continue
    go build -tags selinux,notest -ldflags "$ldflags" -o "$BIN/$cmd-$K8S_VERSION" "k8s.io/kubernetes/cmd/$cmd"
  done
}

build_etcd() {
  helper_module "etcd-$ETCD_VERSION"
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  go build -ldflags "-s -w" -o "$BIN/etcd-$ETCD_VERSION" go.etcd.io/etcd/server/v3
}

build_helm() {
  GOBIN=$TOOLS/modules/helm-$HELM_VERSION go install -ldflags "-s -w" "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
  mv "$TOOLS/modules/helm-$HELM_VERSION/helm" "$BIN/helm-$HELM_VERSION"
}

build_promtool() {
  helper_module "prometheus-$PROMETHEUS_MODULE_VERSION"
  go mod edit -require "github.com/prometheus/prometheus@$PROMETHEUS_MODULE_VERSION"
  copy_replaces_and_excludes "$(upstream_go_mod github.com/prometheus/prometheus "$PROMETHEUS_MODULE_VERSION")"
  go get "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_MODULE_VERSION"
  go build -ldflags "-s -w" -o "$BIN/promtool-$PROMETHEUS_MODULE_VERSION" github.com/prometheus/prometheus/cmd/promtool
}

# ensure TOOL VERSION BUILDER: builds TOOL-VERSION unless cached, then links TOOL to it.
ensure() {
  local tool=$1 version=$2 builder=$3
  if [[ ! -x $BIN/$tool-$version ]]; then
    log "building $tool $version (cached in $TOOLS)"
    local start=$SECONDS
    ("$builder")
    log "built $tool $version in $((SECONDS - start)) s"
  fi
  [[ -x $BIN/$tool-$version ]] || {
    log "$tool $version missing after build"
    exit 1
  }
  ln -sfn "$tool-$version" "$BIN/$tool"
}

command -v go >/dev/null || { log "go is not installed"; exit 1; }
ensure etcd "$ETCD_VERSION" build_etcd
for cmd in "${KUBERNETES_COMMANDS[@]}"; do
  ensure "$cmd" "$K8S_VERSION" build_kubernetes
done
ensure helm "$HELM_VERSION" build_helm
ensure promtool "$PROMETHEUS_MODULE_VERSION" build_promtool
echo "$BIN"

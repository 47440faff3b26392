#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs, checks formatting and lints,
# starts a real Kubernetes control plane (etcd + kube-apiserver, built once and cached by
# scripts/control-plane-tools.sh), then runs every test. Kernel tests need root; with
# CI=true, tests whose requirements are missing fail instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
control_plane=$(mktemp -d /tmp/crashwatch-control-plane.XXXXXX)
trap 'scripts/control-plane.sh stop "$control_plane"; rm -rf "$control_plane"' EXIT
scripts/control-plane.sh start "$control_plane"
CRASHWATCH_CONTROL_PLANE=$control_plane cargo test --workspace

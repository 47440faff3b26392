#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs, checks formatting and lints,
# builds the images (scripts/images.sh), starts a real Kubernetes control plane (etcd +
# kube-apiserver, built once and cached by scripts/control-plane-tools.sh), then runs every
# test, including the real-node tests, which bring up their own one-node cluster with
# scripts/cluster.sh. Kernel and node tests need root; with CI=true, tests whose requirements
# are missing fail instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
scripts/control-plane-tools.sh >/dev/null
scratch=$(mktemp -d /tmp/crashwatch-test.XXXXXX)
trap 'scripts/control-plane.sh stop "$scratch/control-plane"; rm -rf "$scratch"' EXIT
scripts/images.sh "$scratch/images"
scripts/control-plane.sh start "$scratch/control-plane"
CRASHWATCH_IMAGES=$scratch/images CRASHWATCH_CONTROL_PLANE=$scratch/control-plane \
  cargo test --workspace

#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine (run as root).
# Idempotent: it only calls apt when a package is missing.
set -euo pipefail

packages=(
  gcc binutils            # test programs are compiled and inspected (nm) at test time
  gdb                     # the core handler's stacks are checked against gdb's bt
  qemu-utils              # qemu-nbd, for real hung-task tests
  libnbd-bin fuse3        # nbdfuse and fusermount3
  elfutils llvm           # eu-addr2line, llvm-symbolizer: symbolization oracles
  gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu libc6-dev-arm64-cross  # aarch64 test binaries
  qemu-user               # runs them (qemu-aarch64) for the aarch64 NULL-member test
  libc6-dbg               # libc debug info by build-id
  debuginfod              # a real debuginfod server on loopback
  dwz                     # dwz-compressed debug files with a supplementary file
  hyperfine               # the symbolization benchmark
  curl openssl            # the control plane script: readiness probes, the service-account key
  containerd runc containernetworking-plugins iptables conntrack  # the real node (scripts/cluster.sh)
  busybox-static          # the real node's test images, and the fault VM's initramfs
  qemu-system-x86 python3 xz-utils file  # the fault VM (scripts/fault-vm.sh): TCG guest, vmlinux extraction
)

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for tool in cargo rustfmt cargo-clippy; do
  command -v "$tool" >/dev/null || { echo "missing $tool: install Rust with rustup (components rustfmt, clippy)" >&2; exit 1; }
done

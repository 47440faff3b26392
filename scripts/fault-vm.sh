#!/usr/bin/env bash
# The fault VM: Debian's own 6.1 kernel (with the real nbd driver) and a busybox initramfs,
# booted under QEMU's TCG emulation (KVM on the development VM is paravirtual and cannot run
# stock kernels; see /work/shared/docs/fault-vm.md for the measured facts).
#
#   scripts/fault-vm.sh build
#       Builds vmlinux and initramfs.cpio.gz into $CRASHWATCH_FAULT_VM (default
#       /var/cache/crashwatch-fault-vm), outside the repository. The kernel package is
#       downloaded and unpacked, never installed. A second call only checks the files.
#   scripts/fault-vm.sh run OUT SHARE SCRIPT
#       Boots the VM with SHARE as 9p tag "host" (mounted at /mnt/host) and runs
#       /mnt/host/SCRIPT after every boot; the guest powers off when it returns. Writes
#       OUT/console.log (ttyS0), OUT/kmsg.log (the guest's raw /dev/kmsg on ttyS1), OUT/qmp.sock
#       (QMP: a guest reboot shows as a RESET event with reason "guest-reset"), OUT/qemu.pid
#       and OUT/qemu.rc. The guest reaches the host's loopback at 10.0.2.2 (QEMU user
#       networking). Environment: TIMEOUT (s, default 300: qemu is killed by its own PID
#       after it), MEM (MiB, default 512), APPEND (more kernel arguments), NO_REBOOT=1 (a
#       guest reboot ends qemu instead of rebooting).
#
# One VM per machine: `run` holds /run/crashwatch-fault-vm.lock (waits up to LOCK_WAIT s,
# default 900), and so does `build`.
set -euo pipefail

CACHE=${CRASHWATCH_FAULT_VM:-/var/cache/crashwatch-fault-vm}
LOCK=/run/crashwatch-fault-vm.lock
HERE=$(cd "$(dirname "$0")" && pwd)
# Modules the guest loads (their dependencies are added from modules.dep).
MODULES="nbd virtio_pci virtio_net 9p 9pnet_virtio crc32c_generic"

die() { echo "fault-vm: $*" >&2; exit 1; }

lock() {
  exec 9>"$LOCK"
  flock -w "${LOCK_WAIT:-900}" 9 || die "another fault VM holds $LOCK"
}

build() {
  local stamp="$CACHE/built-by" want
  want=$(cat "$HERE/fault-vm.sh" "$HERE/fault-vm-init.sh" | sha256sum | cut -c1-16)
  if [[ -e "$CACHE/vmlinux" && -e "$CACHE/initramfs.cpio.gz" && "$(cat "$stamp" 2>/dev/null)" == "$want" ]]; then
    return 0
  fi
  for tool in busybox qemu-nbd qemu-system-x86_64 python3 dpkg-deb apt-get; do
    command -v "$tool" >/dev/null || die "missing $tool: run scripts/install-test-deps.sh"
  done
  local bb; bb=$(command -v busybox)
  file -L "$bb" | grep -q 'statically linked' || die "busybox must be busybox-static"
  mkdir -p "$CACHE/debs"
  local work; work=$(mktemp -d "$CACHE/build.XXXXXX")
  trap 'rm -rf "$work"' RETURN

  # The kernel: resolved at run time, as the ABI number changes with security updates.
  local kpkg
  kpkg=${KPKG:-$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')}
  [[ -n "$kpkg" ]] || die "no linux-image package found (apt-get update?)"
  ls "$CACHE/debs/${kpkg}"_*.deb >/dev/null 2>&1 || (cd "$CACHE/debs" && apt-get download -q "$kpkg")
  ls "$CACHE"/debs/nbd-client_*.deb >/dev/null 2>&1 || (cd "$CACHE/debs" && apt-get download -q nbd-client libnl-genl-3-200)
  dpkg-deb -x "$CACHE/debs/${kpkg}"_*.deb "$work/kroot"
  for deb in "$CACHE"/debs/nbd-client_*.deb "$CACHE"/debs/libnl-genl-3-200_*.deb; do
    dpkg-deb -x "$deb" "$work/xroot"
  done
  local kver; kver=$(ls "$work/kroot/lib/modules" | head -1)
  local mods="$work/kroot/lib/modules/$kver"
  [[ -e "$mods/modules.dep" ]] || "$bb" depmod -b "$work/kroot" "$kver"

  # vmlinux: qemu boots the ELF through its PVH entry, skipping the real-mode setup and the
  # decompression, which are slow under TCG (2.5 s to a shell instead of 5 s).
  python3 - "$work/kroot/boot/vmlinuz-$kver" "$work/vmlinux" <<'PY'
import subprocess, sys
data = open(sys.argv[1], 'rb').read()
for magic, cmd in ((b'\xfd7zXZ\x00', ['xz', '-dc']), (b'\x28\xb5\x2f\xfd', ['zstd', '-dc']), (b'\x1f\x8b\x08', ['gzip', '-dc'])):
    at = data.find(magic)
    if at < 0:
        continue
    out = subprocess.run(cmd, input=data[at:], capture_output=True).stdout
    if out[:4] == b'\x7fELF':
        open(sys.argv[2], 'wb').write(out)
        break
else:
    sys.exit('cannot extract vmlinux from ' + sys.argv[1])
PY

  local root="$work/initramfs"
  mkdir -p "$root"/{bin,etc,proc,sys,dev,tmp,run,mnt/host,root,lib64,usr/bin,var,lib/x86_64-linux-gnu}
  ln -s bin "$root/sbin"              # the kernel's request_module runs /sbin/modprobe
  ln -s ../bin "$root/usr/sbin"
  ln -s ../run "$root/var/run"
  ln -s ../run/lock "$root/var/lock"  # qemu-nbd binds /var/lock/qemu-nbd-*
  cp "$bb" "$root/bin/busybox"
  for applet in $("$bb" --list); do [[ -e "$root/bin/$applet" ]] || ln -s busybox "$root/bin/$applet"; done

  declare -A seen=()
  add_module() {
    local rel=$1 dep
    [[ -n "${seen[$rel]:-}" ]] && return 0
    seen[$rel]=1
    mkdir -p "$root/lib/modules/$kver/$(dirname "$rel")"
    cp "$mods/$rel" "$root/lib/modules/$kver/$rel"
    for dep in $(awk -v m="$rel:" '$1==m{for(i=2;i<=NF;i++)print $i}' "$mods/modules.dep"); do
      add_module "$dep"
    done
  }
  local module rel
  for module in $MODULES; do
    rel=$(awk -v n="/$module.ko:" 'index($1,n){sub(":","",$1);print $1;exit}' "$mods/modules.dep")
    if [[ -z "$rel" ]]; then
      grep -q "/$module.ko\$" "$mods/modules.builtin" && continue
      die "no module $module in $kver"
    fi
    add_module "$rel"
  done
  cp "$mods"/modules.{order,builtin,builtin.modinfo} "$root/lib/modules/$kver/"
  "$bb" depmod -b "$root" "$kver"

  # Host binaries with the libraries ldd lists.
  copy_binary() {
    local lib
    mkdir -p "$root$(dirname "$2")"
    cp -L "$1" "$root$2"
    for lib in $(LD_LIBRARY_PATH="$work/xroot/lib/x86_64-linux-gnu" ldd "$1" | awk '/=> \//{print $3}'); do
      cp -nL "$lib" "$root/lib/x86_64-linux-gnu/"
    done
    cp -nL /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
  }
  copy_binary "$(command -v qemu-nbd)" /usr/bin/qemu-nbd
  copy_binary "$work/xroot/sbin/nbd-client" /bin/nbd-client

  cp "$HERE/fault-vm-init.sh" "$root/init"
  chmod 755 "$root/init"
  (cd "$root" && find . | "$bb" cpio -o -H newc 2>/dev/null | gzip -1 > "$work/initramfs.cpio.gz")
  mv "$work/vmlinux" "$work/initramfs.cpio.gz" "$CACHE/"
  echo "$kver" > "$CACHE/kernel-version"
  echo "$want" > "$stamp"
  echo "fault-vm: kernel $kver, initramfs $(du -h "$CACHE/initramfs.cpio.gz" | cut -f1) in $CACHE"
}

run() {
  local out=${1:?usage: fault-vm.sh run OUT SHARE SCRIPT} share=${2:?} script=${3:?}
  [[ -e "$CACHE/vmlinux" ]] || die "not built: run scripts/fault-vm.sh build"
  mkdir -p "$out"
  out=$(cd "$out" && pwd)
  share=$(cd "$share" && pwd)
  rm -f "$out"/{console.log,kmsg.log,qemu.pid,qemu.rc,qmp.sock}
  local reboot=()
  [[ "${NO_REBOOT:-}" == 1 ]] && reboot=(-no-reboot)
  setsid qemu-system-x86_64 -accel tcg -cpu max -M pc -smp 1 -m "${MEM:-512}" \
    -kernel "$CACHE/vmlinux" -initrd "$CACHE/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 cw.run=/mnt/host/$script ${APPEND:-}" \
    -nographic -monitor none -nodefaults "${reboot[@]}" \
    -serial "file:$out/console.log" -serial "file:$out/kmsg.log" \
    -virtfs "local,path=$share,mount_tag=host,security_model=none,id=host" \
    -netdev user,id=net0 -device virtio-net-pci,netdev=net0,romfile= \
    -qmp "unix:$out/qmp.sock,server=on,wait=off" \
    </dev/null >"$out/qemu.stderr" 2>&1 &
  QEMU_PID=$!
  local qemu=$QEMU_PID
  echo "$qemu" > "$out/qemu.pid"
  # Whatever ends this script ends qemu, by its own PID.
  trap 'kill -9 "$QEMU_PID" 2>/dev/null || true' EXIT
  trap 'exit 143' TERM INT
  local deadline=$((SECONDS + ${TIMEOUT:-300}))
  while kill -0 "$qemu" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      echo "fault-vm: timeout after ${TIMEOUT:-300}s: killing qemu (pid $qemu)" >&2
      kill -9 "$qemu"
      break
    fi
    sleep 0.2
  done
  local rc=0
  wait "$qemu" || rc=$?
  echo "$rc" > "$out/qemu.rc"
  return "$rc"
}

case "${1:-}" in
  build) lock; build ;;
  run) shift; lock; build; run "$@" ;;
  *) die "usage: $0 build | run OUT SHARE SCRIPT" ;;
esac

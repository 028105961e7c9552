# Shared helpers for the benchmark scripts. Source it.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
LODGE=$ROOT/bin/lodge
GUEST=$ROOT/build/guest/tiny.qcow2
WORK=${BENCH_WORK:-/tmp/lodge-bench}
export LODGE_HOME=$WORK/home
RESULTS=$BENCH_DIR/results
mkdir -p "$WORK" "$RESULTS"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}'; }

# median of the numbers on stdin
median() { sort -g | awk '{a[NR]=$1} END{ if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2 }'; }

start_libvirtd() {
  "$ROOT/scripts/deps.sh" bench
  # Debian's udev rule makes /dev/kvm root:kvm 0660. Without udev (in a
  # container) it stays root:root 0600: libvirt then finds KVM "not
  # available now" for its QEMU user at every call, throws its capability
  # cache away and probes QEMU again, which costs 30-40 s per define and
  # about 4 s per start. Lodge runs its QEMUs as root and is unaffected.
  if [ -c /dev/kvm ] && [ "$(stat -c %G /dev/kvm)" = root ] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
  fi
  if ! virsh -c qemu:///system version >/dev/null 2>&1; then
    pgrep -x virtlogd >/dev/null || /usr/sbin/virtlogd -d
    pgrep -x libvirtd >/dev/null || /usr/sbin/libvirtd -d
    for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
  fi
}

start_lodged() {
  mkdir -p "$LODGE_HOME"
  if ! "$LODGE" host info >/dev/null 2>&1; then
    "$LODGE" daemon >"$WORK/daemon.log" 2>&1 &
    echo $! >"$WORK/daemon.pid"
    for _ in $(seq 100); do "$LODGE" host info >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  "$LODGE" image show tiny >/dev/null 2>&1 || "$LODGE" image import "$GUEST" --name tiny >/dev/null
  # libvirt runs QEMU as libvirt-qemu, which must reach the same image
  # through Lodge's (0750) home to use it as a backing file.
  chmod o+x "$WORK" "$LODGE_HOME" "$LODGE_HOME/images" "$LODGE_HOME/images/tiny"
}

restart_libvirtd() {
  pkill -x libvirtd || true
  for _ in $(seq 100); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
  start_libvirtd
}

stop_lodged() {
  if [ -f "$WORK/daemon.pid" ]; then
    kill "$(cat "$WORK/daemon.pid")" 2>/dev/null || true
    rm -f "$WORK/daemon.pid"
  fi
}

# libvirt_define NAME DISK SEED MEMMB: a domain shaped like a Lodge VM:
# same machine type, accelerator, disk, seed CD, NIC, agent channel.
libvirt_define() {
  local name=$1 disk=$2 seed=$3 mem=$4 accel
  accel=$("$LODGE" host info -o json | sed -n 's/.*"accel": "\([a-z]*\)".*/\1/p')
  local type=qemu; [ "$accel" = kvm ] && type=kvm
  cat >"$WORK/$name.xml" <<XML
<domain type='$type'>
  <name>$name</name>
  <memory unit='MiB'>$mem</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <cpu mode='maximum' migratable='off'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='$disk'/><target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/><source file='$seed'/>
      <target dev='hdc' bus='ide'/><readonly/>
    </disk>
    <interface type='user'><model type='virtio'/></interface>
    <serial type='pty'/>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='virtio'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <video><model type='none'/></video>
  </devices>
</domain>
XML
  virsh -c qemu:///system define "$WORK/$name.xml" >/dev/null
}

libvirt_undefine() {
  virsh -c qemu:///system destroy "$1" >/dev/null 2>&1 || true
  virsh -c qemu:///system undefine "$1" --snapshots-metadata >/dev/null 2>&1 || true
}

# wait until the libvirt domain's agent answers guest-ping
libvirt_wait_agent() {
  local name=$1 deadline=$(( $(date +%s) + 180 ))
  until virsh -c qemu:///system qemu-agent-command "$name" '{"execute":"guest-ping"}' >/dev/null 2>&1; do
    [ "$(date +%s)" -gt "$deadline" ] && { echo "libvirt agent of $name never answered" >&2; return 1; }
    sleep 0.1
  done
}

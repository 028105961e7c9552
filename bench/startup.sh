#!/usr/bin/env bash
# Start to agent-ready: `lodge start` + `lodge exec -- true` against
# `virsh start` + guest-ping, same guest, disk, memory and agent channel,
# alternating A B A B. Prints one TSV row per run.
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-5}
start_libvirtd
start_lodged
"$LODGE" host info -o json | sed -n 's/.*"accel": "\([a-z]*\)".*/\1/p' >"$RESULTS/accel.txt"

"$LODGE" delete --force bench-start >/dev/null 2>&1 || true
"$LODGE" create bench-start --image tiny --memory 256M >/dev/null
# libvirt gets the same kind of disk (a thin overlay on the same image)
# and the same seed ISO, so both guests do the same work at boot.
img=$("$LODGE" image show tiny -o json | sed -n 's/.*"path": "\(.*\)".*/\1/p' | head -1)
qemu-img create -q -f qcow2 -F qcow2 -b "$img" "$WORK/lv-start.qcow2" 8G
cp "$LODGE_HOME/vms/bench-start/seed.iso" "$WORK/lv-seed.iso"
libvirt_undefine lv-start
libvirt_define lv-start "$WORK/lv-start.qcow2" "$WORK/lv-seed.iso" 256

out=$RESULTS/startup.tsv
echo -e "run\tlodge_s\tlibvirt_s\tlodge_start_cmd_s\tlibvirt_start_cmd_s" >"$out"
for i in $(seq "$RUNS"); do
  t=$(now); "$LODGE" start bench-start >/dev/null; sa=$(elapsed "$t")
  "$LODGE" exec bench-start --wait 180s -- true; a=$(elapsed "$t")
  "$LODGE" stop --force bench-start >/dev/null
  t=$(now); virsh -c qemu:///system start lv-start >/dev/null; sb=$(elapsed "$t")
  libvirt_wait_agent lv-start; b=$(elapsed "$t")
  virsh -c qemu:///system destroy lv-start >/dev/null
  echo -e "$i\t$a\t$b\t$sa\t$sb" | tee -a "$out"
done
"$LODGE" delete --force bench-start >/dev/null
libvirt_undefine lv-start
rm -f "$WORK/lv-start.qcow2" "$WORK/lv-seed.iso"

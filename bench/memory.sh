#!/usr/bin/env bash
# Balloon: time for a running 1 GiB guest to give back half its memory
# and take it again, `lodge set VM memory=` (which returns when the guest
# is there) against `virsh setmem --live` followed by polling `virsh
# dommemstat` until the balloon's actual is within 4 MiB of the target.
# Same tiny guest, same seed, alternating. Writes results/memory.tsv.
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-5}
V="virsh -c qemu:///system"
start_libvirtd
start_lodged

"$LODGE" delete --force mem-l >/dev/null 2>&1 || true
libvirt_undefine lv-mem
"$LODGE" create mem-l --image tiny --memory 1G >/dev/null
disk=$("$LODGE" show mem-l -o json | sed -n 's/.*"path": "\(.*\)".*/\1/p' | head -1)
qemu-img create -q -f qcow2 -b "$LODGE_HOME/images/tiny/disk.qcow2" -F qcow2 "$WORK/lv-mem.qcow2"
cp "$LODGE_HOME/vms/mem-l/seed.iso" "$WORK/lv-mem-seed.iso"
libvirt_define lv-mem "$WORK/lv-mem.qcow2" "$WORK/lv-mem-seed.iso" 1024
"$LODGE" start mem-l >/dev/null
"$LODGE" exec mem-l --wait 180s -- true
$V start lv-mem >/dev/null
libvirt_wait_agent lv-mem
: "$disk"

# lv_setmem KIB: set the balloon and wait for the guest to get there.
lv_setmem() {
  local a
  $V setmem lv-mem "$1" --live >/dev/null
  for _ in $(seq 600); do
    a=$($V dommemstat lv-mem | awk '$1=="actual"{print $2}')
    [ $(( a > $1 ? a - $1 : $1 - a )) -le 4096 ] && return 0
    sleep 0.05
  done
  echo "libvirt balloon never reached $1 KiB" >&2; return 1
}

out=$RESULTS/memory.tsv
echo -e "run\tlodge_shrink_s\tvirsh_shrink_s\tlodge_grow_s\tvirsh_grow_s" >"$out"
for i in $(seq "$RUNS"); do
  t=$(now); "$LODGE" set mem-l memory=512M >/dev/null; a=$(elapsed "$t")
  t=$(now); lv_setmem 524288; b=$(elapsed "$t")
  t=$(now); "$LODGE" set mem-l memory=1G >/dev/null; c=$(elapsed "$t")
  t=$(now); lv_setmem 1048576; d=$(elapsed "$t")
  echo -e "$i\t$a\t$b\t$c\t$d" | tee -a "$out"
done
$V destroy lv-mem >/dev/null
libvirt_undefine lv-mem
"$LODGE" delete --force mem-l >/dev/null
rm -f "$WORK"/lv-mem*

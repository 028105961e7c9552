#!/usr/bin/env bash
# Lodge's own overhead per CLI call (create, show, list) with 100 VMs
# defined, against virsh's (define, dominfo, list --all) with 100 domains,
# and the daemon's RSS with 100 VMs defined.
source "$(dirname "$0")/lib.sh"
N=${N:-100}
start_libvirtd
start_lodged
img=$("$LODGE" image show tiny -o json | sed -n 's/.*"path": "\(.*\)".*/\1/p' | head -1)
qemu-img create -q -f qcow2 -F qcow2 -b "$img" "$WORK/lv-ovh.qcow2" 8G
: >"$WORK/lv-seed-empty.iso"

out=$RESULTS/overhead.tsv
echo -e "op\ti\tlodge_s\tlibvirt_s" >"$out"
for i in $(seq "$N"); do
  t=$(now); "$LODGE" create "ovh-$i" --image tiny >/dev/null; a=$(elapsed "$t")
  t=$(now); libvirt_define "lv-ovh-$i" "$WORK/lv-ovh.qcow2" "$WORK/lv-seed-empty.iso" 256; b=$(elapsed "$t")
  echo -e "create\t$i\t$a\t$b" >>"$out"
done
for i in $(seq 20); do
  t=$(now); "$LODGE" show "ovh-$i" >/dev/null; a=$(elapsed "$t")
  t=$(now); virsh -c qemu:///system dominfo "lv-ovh-$i" >/dev/null; b=$(elapsed "$t")
  echo -e "show\t$i\t$a\t$b" >>"$out"
  t=$(now); "$LODGE" list >/dev/null; a=$(elapsed "$t")
  t=$(now); virsh -c qemu:///system list --all >/dev/null; b=$(elapsed "$t")
  echo -e "list\t$i\t$a\t$b" >>"$out"
done
rss=$(awk '/VmRSS/{print $2}' "/proc/$(pgrep -f "$LODGE daemon" | head -1)/status")
echo -e "rss_kib\t$N\t$rss\t-" >>"$out"
for i in $(seq "$N"); do
  "$LODGE" delete "ovh-$i" >/dev/null
  libvirt_undefine "lv-ovh-$i"
done
rm -f "$WORK/lv-ovh.qcow2" "$WORK/lv-seed-empty.iso"

#!/usr/bin/env bash
# Lodge's own overhead per CLI call (create, show, list) with N VMs
# defined, against virsh (define, dominfo, list --all) with N domains, and
# the daemon's RSS with N VMs defined.
#
# virsh define stalls for 30-80 s per domain on these machines with libvirtd
# idle (a D-Bus/machined timeout: no systemd here), so only DEFINES domains
# go through virsh define; the rest are written where libvirtd loads its
# persistent domains at start, and libvirtd is restarted once.
source "$(dirname "$0")/lib.sh"
N=${N:-100}
DEFINES=${DEFINES:-3}
start_libvirtd
start_lodged
qemu-img create -q -f qcow2 "$WORK/lv-ovh.qcow2" 1G
: >"$WORK/lv-seed-empty.iso"

# Leftovers of an interrupted run would make the first create fail.
for i in $(seq "$N"); do
  "$LODGE" delete "ovh-$i" >/dev/null 2>&1 || true
  rm -f "/etc/libvirt/qemu/lv-ovh-$i.xml"
done
restart_libvirtd

out=$RESULTS/overhead.tsv
echo -e "op\ti\tlodge_s\tlibvirt_s" >"$out"
for i in $(seq "$N"); do
  t=$(now); "$LODGE" create "ovh-$i" --image tiny >/dev/null; a=$(elapsed "$t")
  b=-
  if [ "$i" -le "$DEFINES" ]; then
    t=$(now); libvirt_define "lv-ovh-$i" "$WORK/lv-ovh.qcow2" "$WORK/lv-seed-empty.iso" 256; b=$(elapsed "$t")
  else
    sed -e "s|<name>lv-ovh-1</name>|<name>lv-ovh-$i</name><uuid>$(cat /proc/sys/kernel/random/uuid)</uuid>|" \
      "$WORK/lv-ovh-1.xml" >"/etc/libvirt/qemu/lv-ovh-$i.xml"
  fi
  echo -e "create\t$i\t$a\t$b" >>"$out"
done
restart_libvirtd
n=$(virsh -c qemu:///system list --all --name | grep -c '^lv-ovh-')
[ "$n" -eq "$N" ] || { echo "libvirt has $n of $N domains" >&2; exit 1; }
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
for i in $(seq "$N"); do "$LODGE" delete "ovh-$i" >/dev/null; done
# undefine is as slow as define here; remove the files and restart instead.
for i in $(seq "$N"); do rm -f "/etc/libvirt/qemu/lv-ovh-$i.xml"; done
restart_libvirtd
rm -f "$WORK/lv-ovh.qcow2" "$WORK/lv-seed-empty.iso"

#!/usr/bin/env bash
# Density: as many tiny guests at 128 MiB as the host's memory limit
# admits (COUNT to run fewer), Lodge then libvirt, started BATCH at a time
# and each waited on until its agent answers; then one more start, which
# must be refused. Reports what the daemon (lodge daemon, libvirtd) gains
# in RSS per running VM, what each QEMU takes, and how far the host's
# available memory fell. Writes results/density.tsv.
#
# libvirt runs LV_COUNT guests only: on these machines libvirtd re-probes
# QEMU's capabilities at every define (about 30 s each; see
# bench/README.md), which would make a large count take most of an hour.
# The figures compared are per VM.
source "$(dirname "$0")/lib.sh"
LV_COUNT=${LV_COUNT:-8}
BATCH=${BATCH:-4}
MEM=128
V="virsh -c qemu:///system"
start_libvirtd
start_lodged

rss() { awk '/^VmRSS/{print $2}' "/proc/$1/status"; }
qemu_rss() { # sum and count of the RSS (KiB) of QEMUs whose command line matches $1
  pgrep -f "qemu-system.*$1" | while read -r p; do rss "$p"; done | awk '{s+=$1; n++} END{printf "%d\t%d\n", s, n}'
}
avail() { awk '/^MemAvailable/{print $2}' /proc/meminfo; }
hostinfo() { "$LODGE" host info -o json | sed -n "s/.*\"$1\": \([0-9.]*\).*/\1/p"; }
lodged=$(hostinfo daemon_pid)
limit=$(hostinfo memory_limit) overhead=$(hostinfo vm_overhead)
admitted=$((limit / ((MEM << 20) + overhead)))
COUNT=${COUNT:-$admitted}
echo "limit $limit, overhead $overhead per VM: $admitted VMs of ${MEM}M admitted; running $COUNT" >&2
names=$(seq -f "dens-%g" "$COUNT")
extra=dens-extra
lv_names=$(seq -f "dens-%g" "$LV_COUNT")

cleanup() {
  for n in $names $extra; do "$LODGE" delete --force "$n" >/dev/null 2>&1 || true; libvirt_undefine "lv-$n"; done
  rm -f "$WORK"/lv-dens-*
}
cleanup
trap cleanup EXIT

# --- Lodge -----------------------------------------------------------------
for n in $names; do "$LODGE" create "$n" --image tiny --memory ${MEM}M >/dev/null; done
sleep 2
base=$(rss "$lodged") avail0=$(avail)
t=$(now)
set -- $names
while [ $# -gt 0 ]; do
  batch=()
  for _ in $(seq "$BATCH"); do [ $# -gt 0 ] && { batch+=("$1"); shift; }; done
  pids=()
  for n in "${batch[@]}"; do "$LODGE" start "$n" >/dev/null & pids+=($!); done
  wait "${pids[@]}"
  for n in "${batch[@]}"; do "$LODGE" exec "$n" --wait 600s -- true; done
done
boot_l=$(elapsed "$t")
sleep 10
full=$(rss "$lodged") avail1=$(avail)
read -r qsum qn < <(qemu_rss "guest=dens-")
refused=-
if [ "$COUNT" -ge "$admitted" ]; then
  "$LODGE" create "$extra" --image tiny --memory ${MEM}M >/dev/null
  if msg=$("$LODGE" start "$extra" 2>&1); then refused=no; else refused=yes; echo "one more: $msg" >&2; fi
fi
echo "lodge: $qn VMs up in ${boot_l}s; daemon RSS $base -> $full KiB; QEMU RSS $qsum KiB in all; host available fell $((avail0 - avail1)) KiB" >&2
lodge_row="lodge\t$COUNT\t$qn\t$boot_l\t$base\t$full\t$qsum\t$((avail0 - avail1))\t$admitted\t$refused"
seed=$LODGE_HOME/vms/dens-1/seed.iso
cp "$seed" "$WORK/lv-dens-seed.iso"
for n in $names; do "$LODGE" stop --force "$n" >/dev/null; done

# --- libvirt -----------------------------------------------------------------
for n in $lv_names; do
  qemu-img create -q -f qcow2 -b "$LODGE_HOME/images/tiny/disk.qcow2" -F qcow2 "$WORK/lv-$n.qcow2"
  libvirt_define "lv-$n" "$WORK/lv-$n.qcow2" "$WORK/lv-dens-seed.iso" $MEM
done
lvd=$(pgrep -x libvirtd | head -1)
sleep 2
base=$(rss "$lvd") avail0=$(avail)
t=$(now)
set -- $lv_names
while [ $# -gt 0 ]; do
  batch=()
  for _ in $(seq "$BATCH"); do [ $# -gt 0 ] && { batch+=("$1"); shift; }; done
  pids=()
  for n in "${batch[@]}"; do $V start "lv-$n" >/dev/null & pids+=($!); done
  wait "${pids[@]}"
  for n in "${batch[@]}"; do libvirt_wait_agent "lv-$n"; done
done
boot_v=$(elapsed "$t")
sleep 10
full=$(rss "$lvd") avail1=$(avail)
read -r qsum qn < <(qemu_rss "guest=lv-dens-")
echo "libvirt: $qn VMs up in ${boot_v}s; libvirtd RSS $base -> $full KiB; QEMU RSS $qsum KiB in all; host available fell $((avail0 - avail1)) KiB" >&2
virt_row="libvirt\t$LV_COUNT\t$qn\t$boot_v\t$base\t$full\t$qsum\t$((avail0 - avail1))\t-\t-"

out=$RESULTS/density.tsv
{
  echo -e "system\tcount\trunning\tboot_all_s\tdaemon_rss_idle_kib\tdaemon_rss_kib\tqemu_rss_kib\thost_used_kib\tadmitted\tnext_refused"
  echo -e "$lodge_row"
  echo -e "$virt_row"
} | tee "$out"

#!/usr/bin/env bash
# Snapshots with memory: `lodge snapshot create/revert` against `virsh
# snapshot-create-as/snapshot-revert` on a guest with 1 GiB of RAM (about
# 600 MiB in use) and a 4 GiB disk holding 1 GiB of data, alternating
# within each run. The guest's pause is seen from the guest: it writes to
# its serial port in a loop and bench/gapwatch times the arrivals on the
# host (the guest's own clock stops with its CPUs). Also: a disk-only
# snapshot of the running VM and of a stopped VM with a 16 GiB disk. The
# guest fills 300 MiB in each of its two tmpfs (each may hold half its RAM).
# Writes results/snapshot.tsv and results/snapshot-disk.tsv.
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-5}
V="virsh -c qemu:///system"
start_libvirtd
start_lodged
GAP=$WORK/gapwatch
(cd "$ROOT" && go build -o "$GAP" ./bench/gapwatch)

disk_of() { "$LODGE" show "$1" -o json | sed -n 's/.*"path": "\(.*\)".*/\1/p' | head -1; }
fill_cmd='dd if=/dev/urandom of=/tmp/r bs=1M count=4 2>/dev/null; for d in /tmp /dev/shm; do i=0; while [ $i -lt 75 ]; do cat /tmp/r; i=$((i+1)); done >$d/fill; done; rm /tmp/r'
tick_cmd='while :; do echo .; usleep 2000; done >/dev/ttyS0 2>&1 </dev/null &'

# libvirt guest exec: run sh -c "$2" in domain $1 and wait for it.
lv_exec() {
  local pid out
  pid=$($V qemu-agent-command "$1" "{\"execute\":\"guest-exec\",\"arguments\":{\"path\":\"/bin/sh\",\"arg\":[\"-c\",\"$2\"]}}" | sed -n 's/.*"pid":\([0-9]*\).*/\1/p')
  for _ in $(seq 600); do
    out=$($V qemu-agent-command "$1" "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$pid}}")
    case "$out" in *'"exited":true'*) return 0 ;; esac
    sleep 0.2
  done
  echo "lv_exec $1: timed out" >&2; return 1
}

# gap SRC CMD...: runs CMD while gapwatch watches SRC; prints "secs gap_ms".
gap() {
  local src=$1; shift
  rm -f "$WORK/gap-start" "$WORK/gap-stop"
  "$GAP" -src "$src" -start "$WORK/gap-start" -stop "$WORK/gap-stop" >"$WORK/gap.out" &
  local gp=$! t s
  sleep 1; touch "$WORK/gap-start"; sleep 0.5
  t=$(now); "$@" >/dev/null; s=$(elapsed "$t")
  sleep 0.5; touch "$WORK/gap-stop"; wait "$gp"
  echo "$s $(cat "$WORK/gap.out")"
}

"$LODGE" delete --force snap-l >/dev/null 2>&1 || true
"$LODGE" delete --force snap-big >/dev/null 2>&1 || true
libvirt_undefine lv-snap
rm -f "$WORK"/lv-snap*.qcow2

# Both guests: 1 GiB of data written past the filesystem (the guest never
# reads there), then booted with 1 GiB of RAM and 600 MiB of it filled.
"$LODGE" create snap-l --image tiny --disk 4G --memory 1G >/dev/null
qemu-io -f qcow2 -c "write -P 0x5a 2G 1G" "$(disk_of snap-l)" >/dev/null
qemu-img convert -f qcow2 -O qcow2 "$(disk_of snap-l)" "$WORK/lv-snap.qcow2"
cp "$LODGE_HOME/vms/snap-l/seed.iso" "$WORK/lv-snap-seed.iso"
libvirt_define lv-snap "$WORK/lv-snap.qcow2" "$WORK/lv-snap-seed.iso" 1024
"$LODGE" start snap-l >/dev/null
"$LODGE" exec snap-l --wait 180s -- sh -c "$fill_cmd; $tick_cmd"
$V start lv-snap >/dev/null
libvirt_wait_agent lv-snap
lv_exec lv-snap "$fill_cmd; $tick_cmd"
pty=$($V ttyconsole lv-snap)
sock=unix:$LODGE_HOME/run/snap-l/console.sock
# The guest's usual longest gap between ticks, with nothing going on.
base_l=$(gap "$sock" sleep 2 | cut -d' ' -f2)
base_v=$(gap "$pty" sleep 2 | cut -d' ' -f2)

out=$RESULTS/snapshot.tsv
echo -e "run\tlodge_create_s\tvirsh_create_s\tlodge_gap_ms\tvirsh_gap_ms\tlodge_pause_ms\tlodge_revert_s\tvirsh_revert_s\tlodge_base_gap_ms\tvirsh_base_gap_ms" >"$out"
for i in $(seq "$RUNS"); do
  sync; read -r a ga < <(gap "$sock" "$LODGE" snapshot create snap-l "s$i")
  p=$("$LODGE" snapshot list snap-l -o json | tr -d ' \n' | sed -n "s/.*\"name\":\"s$i\"[^}]*\"pause_ms\":\([0-9]*\).*/\1/p")
  sync; read -r b gb < <(gap "$pty" $V snapshot-create-as lv-snap "s$i")
  sync; t=$(now); "$LODGE" snapshot revert snap-l "s$i" >/dev/null; ra=$(elapsed "$t")
  sync; t=$(now); $V snapshot-revert lv-snap "s$i" >/dev/null; rb=$(elapsed "$t")
  # The reverted guests run their tick loops again (they are in memory).
  "$LODGE" snapshot delete snap-l "s$i" >/dev/null
  $V snapshot-delete lv-snap "s$i" >/dev/null
  echo -e "$i\t$a\t$b\t$ga\t$gb\t${p:-0}\t$ra\t$rb\t$base_l\t$base_v" | tee -a "$out"
done
$V destroy lv-snap >/dev/null
libvirt_undefine lv-snap

# Disk-only snapshots: of the running 4 GiB VM, and of a stopped 16 GiB VM.
"$LODGE" create snap-big --image tiny --disk 16G --memory 256M >/dev/null
qemu-io -f qcow2 -c "write -P 0x5a 2G 1G" "$(disk_of snap-big)" >/dev/null
out=$RESULTS/snapshot-disk.tsv
echo -e "run\trunning_4g_s\tstopped_16g_s" >"$out"
for i in $(seq "$RUNS"); do
  sync; t=$(now); "$LODGE" snapshot create snap-l "d$i" --no-memory >/dev/null; a=$(elapsed "$t")
  sync; t=$(now); "$LODGE" snapshot create snap-big "d$i" >/dev/null; b=$(elapsed "$t")
  echo -e "$i\t$a\t$b" | tee -a "$out"
done
"$LODGE" delete --force snap-l >/dev/null
"$LODGE" delete snap-big >/dev/null
rm -f "$WORK"/lv-snap*

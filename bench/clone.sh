#!/usr/bin/env bash
# Clones: `lodge clone` (linked) against virt-clone and against libvirt's
# copy alone (virsh vol-clone), linked clone time at 1, 4 and 16 GiB disks,
# `lodge clone --full` against `cp --sparse=always`, and clone + boot to
# agent-ready against a fresh boot of the image. Lodge and the comparison
# alternate within each run. Writes results/clone-*.tsv.
#
# Nothing here can drop the page cache, so every timed step starts with a
# `sync` (so it does not pay for the previous step's writeback) and the
# full-copy comparison warms both sources with one untimed copy each.
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-5}
# SECTIONS picks parts to run again on their own: linked size full boot.
SECTIONS=${SECTIONS:-linked size full boot}
want() { case " $SECTIONS " in *" $1 "*) return 0 ;; esac; return 1; }
V="virsh -c qemu:///system"
POOL=lv-bench-clone
start_libvirtd
start_lodged
"$LODGE" host info -o json | sed -n 's/.*"accel": "\([a-z]*\)".*/\1/p' >"$RESULTS/accel.txt"

disk_of() { "$LODGE" show "$1" -o json | sed -n 's/.*"path": "\(.*\)".*/\1/p' | head -1; }
# src_with_data NAME SIZE DATA: a stopped, never booted VM whose own top
# layer holds DATA of pattern bytes from 512 MiB on (clobbering its
# filesystem is harmless: it never boots).
src_with_data() {
  "$LODGE" create "$1" --image tiny --disk "$2" --memory 256M >/dev/null
  qemu-io -f qcow2 -c "write -P 0x5a 512M $3" "$(disk_of "$1")" >/dev/null
}
# After a linked clone the source's top is a fresh, empty overlay, and a
# clone of an empty top skips the freeze. Write 1 MiB so every run freezes
# a new layer, as the first one does.
dirty() { qemu-io -f qcow2 -c 'write -P 0x33 0 1M' "$(disk_of "$1")" >/dev/null; }
# time of the first virt-clone --debug line matching $2, in seconds
vc_stamp() { date -d "$(sed -n "s/^\[[A-Za-z]*, \(.*\) virt-clone [0-9]*\] DEBUG.*$2.*/\1/p" "$1" | head -1)" +%s; }
bytes() { du -B1 "$1" | cut -f1; }

vms="clone-src clone-dst clone-s1 clone-s4 clone-s16 clone-sdst clone-fsrc clone-fdst clone-bsrc clone-bdst clone-fresh"
for vm in $vms; do "$LODGE" delete --force "$vm" >/dev/null 2>&1 || true; done
for i in $(seq "$RUNS"); do libvirt_undefine "lv-clone-$i"; done
libvirt_undefine lv-clone-src
$V pool-destroy "$POOL" >/dev/null 2>&1 || true
rm -f "$WORK"/lv-clone-*.qcow2 "$WORK"/lv-volclone-*.qcow2 "$WORK"/full-*.qcow2

# 1. Linked clone of a 4 GiB disk holding 1 GiB, against virt-clone (a
# full copy: Debian 12's virt-clone 4.1 has no --linked) of a standalone
# qcow2 holding the same data, and against that copy alone.
if want linked; then
src_with_data clone-src 4G 1G
qemu-img convert -f qcow2 -O qcow2 -o cluster_size=64k "$(disk_of clone-src)" "$WORK/lv-clone-src.qcow2"
cp "$LODGE_HOME/vms/clone-src/seed.iso" "$WORK/lv-clone-seed.iso"
# virt-clone puts new disks in the pool that holds their directory, and
# makes a persistent one if there is none: give it a transient one.
$V pool-create-as "$POOL" dir --target "$WORK" >/dev/null
# virsh define takes 30-80 s here; done once, untimed.
libvirt_define lv-clone-src "$WORK/lv-clone-src.qcow2" "$WORK/lv-clone-seed.iso" 256

out=$RESULTS/clone-linked.tsv
echo -e "run\tlodge_s\tvirtclone_s\tvolclone_s\tvirtclone_define_s\tvirtclone_copy_s" >"$out"
for i in $(seq "$RUNS"); do
  [ "$i" -gt 1 ] && dirty clone-src
  sync; t=$(now); "$LODGE" clone clone-src clone-dst >/dev/null; a=$(elapsed "$t")
  "$LODGE" delete clone-dst >/dev/null
  log=$WORK/virt-clone-$i.log
  sync; t=$(now)
  virt-clone --connect qemu:///system --original lv-clone-src --name "lv-clone-$i" \
    --file "$WORK/lv-clone-$i.qcow2" --debug >/dev/null 2>"$log"
  b=$(elapsed "$t")
  # virt-clone defines the domain first, then copies the disk
  d=$(( $(vc_stamp "$log" 'Creating storage volume') - $(vc_stamp "$log" 'Starting duplicate') ))
  c=$(( $(vc_stamp "$log" 'install complete') - $(vc_stamp "$log" 'Creating storage volume') ))
  # not --remove-all-storage: that would delete the shared seed ISO too
  $V undefine "lv-clone-$i" >/dev/null
  rm -f "$WORK/lv-clone-$i.qcow2"
  sync; t=$(now); $V vol-clone --pool "$POOL" lv-clone-src.qcow2 "lv-volclone-$i.qcow2" >/dev/null; v=$(elapsed "$t")
  $V vol-delete --pool "$POOL" "lv-volclone-$i.qcow2" >/dev/null
  echo -e "$i\t$a\t$b\t$v\t$d\t$c" | tee -a "$out"
done
libvirt_undefine lv-clone-src
$V pool-destroy "$POOL" >/dev/null
rm -f "$WORK/lv-clone-src.qcow2" "$WORK/lv-clone-seed.iso" "$WORK"/virt-clone-*.log
fi

# 2. Linked clone time against disk size, Lodge only.
if want size; then
src_with_data clone-s1 1G 512M
src_with_data clone-s4 4G 1G
src_with_data clone-s16 16G 1G
out=$RESULTS/clone-size.tsv
echo -e "run\tgib1_s\tgib4_s\tgib16_s" >"$out"
for i in $(seq "$RUNS"); do
  row=$i
  for s in 1 4 16; do
    [ "$i" -gt 1 ] && dirty "clone-s$s"
    sync; t=$(now); "$LODGE" clone "clone-s$s" clone-sdst >/dev/null; row+="\t$(elapsed "$t")"
    "$LODGE" delete clone-sdst >/dev/null
  done
  echo -e "$row" | tee -a "$out"
done
fi

# 3. Full clone of image + 1 GiB top against cp --sparse=always of the
# same chain flattened into one qcow2. Neither makes its copy durable
# (qemu-img convert, which lodge clone --full runs, writes with
# cache=unsafe and does not flush at the end), so neither is timed with a
# sync after it.
if want full; then
src_with_data clone-fsrc 4G 1G
flat=$WORK/full-flat.qcow2
qemu-img convert -f qcow2 -O qcow2 -o cluster_size=64k "$(disk_of clone-fsrc)" "$flat"
"$LODGE" clone clone-fsrc clone-fdst --full >/dev/null; "$LODGE" delete clone-fdst >/dev/null
cp --sparse=always "$flat" "$WORK/full-cp.qcow2"; rm -f "$WORK/full-cp.qcow2"
out=$RESULTS/clone-full.tsv
echo -e "run\tlodge_s\tcp_s\tlodge_bytes\tcp_bytes" >"$out"
for i in $(seq "$RUNS"); do
  sync; t=$(now); "$LODGE" clone clone-fsrc clone-fdst --full >/dev/null; a=$(elapsed "$t")
  ab=$(bytes "$(disk_of clone-fdst)")
  "$LODGE" delete clone-fdst >/dev/null
  sync; t=$(now); cp --sparse=always "$flat" "$WORK/full-cp.qcow2"; b=$(elapsed "$t")
  bb=$(bytes "$WORK/full-cp.qcow2")
  rm -f "$WORK/full-cp.qcow2"
  echo -e "$i\t$a\t$b\t$ab\t$bb" | tee -a "$out"
done
rm -f "$flat"
fi

# 4. Clone, start and agent-ready against a fresh boot of the image. The
# source has booted once and been shut down, as a VM one clones would be;
# its clones get a new identity, so they run first boot again too.
if want boot; then
"$LODGE" create clone-bsrc --image tiny --memory 256M --start >/dev/null
"$LODGE" exec clone-bsrc --wait 180s -- true
"$LODGE" stop clone-bsrc >/dev/null
out=$RESULTS/clone-boot.tsv
echo -e "run\tlodge_s\tfresh_s\tlodge_clone_cmd_s" >"$out"
for i in $(seq "$RUNS"); do
  sync; t=$(now); "$LODGE" clone clone-bsrc clone-bdst >/dev/null; sa=$(elapsed "$t")
  "$LODGE" start clone-bdst >/dev/null
  "$LODGE" exec clone-bdst --wait 180s -- true; a=$(elapsed "$t")
  "$LODGE" delete --force clone-bdst >/dev/null
  sync; t=$(now); "$LODGE" create clone-fresh --image tiny --memory 256M --start >/dev/null
  "$LODGE" exec clone-fresh --wait 180s -- true; b=$(elapsed "$t")
  "$LODGE" delete --force clone-fresh >/dev/null
  echo -e "$i\t$a\t$b\t$sa" | tee -a "$out"
done
fi

for vm in clone-src clone-s1 clone-s4 clone-s16 clone-fsrc clone-bsrc; do "$LODGE" delete "$vm" >/dev/null 2>&1 || true; done

#!/usr/bin/env bash
# Lodge's own overhead with many VMs defined: per-call latency of the CLI
# (create, show, list) against virsh (define, dominfo, list --all), and of
# the API (get one VM, list all) against libvirt's API through its Python
# binding, at each size in SIZES; and the daemon's RSS against libvirtd's.
# Writes results/overhead.tsv: op, n, i, lodge_s, libvirt_s.
source "$(dirname "$0")/lib.sh"
SIZES=${SIZES:-100 1000}
REPS=${REPS:-20}
V="virsh -c qemu:///system"
start_libvirtd
start_lodged
qemu-img create -q -f qcow2 "$WORK/lv-ovh.qcow2" 1G
: >"$WORK/lv-seed-empty.iso"

cleanup_ovh() {
  for d in $($V list --all --name | grep '^lv-ovh-' || true); do $V undefine "$d" >/dev/null; done
  "$LODGE" list -o json | { grep -o '"name": "ovh-[0-9]*"' || true; } | cut -d'"' -f4 |
    xargs -r -P 4 -I{} "$LODGE" delete {} >/dev/null
}
# Leftovers of an interrupted run would make the first create fail.
cleanup_ovh

rss_kib() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
out=$RESULTS/overhead.tsv
echo -e "op\tn\ti\tlodge_s\tlibvirt_s" >"$out"
have=0
for n in $SIZES; do
  # Grow both sides to n: untimed and in parallel up to the last 100,
  # then alternating, every create and define timed.
  if [ "$have" -gt 0 ] && [ $((n - have)) -gt 100 ]; then
    seq $((have + 1)) $((n - 100)) | xargs -P 4 -I{} "$LODGE" create "ovh-{}" --image tiny >/dev/null
    for i in $(seq $((have + 1)) $((n - 100))); do
      sed -e "s|<name>.*</name>|<name>lv-ovh-$i</name>|" "$WORK/lv-ovh-1.xml" >"$WORK/lv-ovh-$i.xml"
    done
    seq $((have + 1)) $((n - 100)) | xargs -P 4 -I{} $V define "$WORK/lv-ovh-{}.xml" >/dev/null
    have=$((n - 100))
  fi
  for i in $(seq $((have + 1)) "$n"); do
    t=$(now); "$LODGE" create "ovh-$i" --image tiny >/dev/null; a=$(elapsed "$t")
    if [ "$i" -eq 1 ]; then
      t=$(now); libvirt_define lv-ovh-1 "$WORK/lv-ovh.qcow2" "$WORK/lv-seed-empty.iso" 256; b=$(elapsed "$t")
    else
      # The same domain under a new name (libvirt_define also asks Lodge
      # for the accelerator, which is not libvirt's time).
      sed -e "s|<name>.*</name>|<name>lv-ovh-$i</name>|" "$WORK/lv-ovh-1.xml" >"$WORK/lv-ovh-i.xml"
      t=$(now); $V define "$WORK/lv-ovh-i.xml" >/dev/null; b=$(elapsed "$t")
    fi
    echo -e "create\t$n\t$i\t$a\t$b" >>"$out"
  done
  have=$n
  for i in $(seq "$REPS"); do
    vm=$(( (i * 7919) % n + 1 ))
    t=$(now); "$LODGE" show "ovh-$vm" >/dev/null; a=$(elapsed "$t")
    t=$(now); $V dominfo "lv-ovh-$vm" >/dev/null; b=$(elapsed "$t")
    echo -e "show\t$n\t$i\t$a\t$b" >>"$out"
    t=$(now); "$LODGE" list >/dev/null; a=$(elapsed "$t")
    t=$(now); $V list --all >/dev/null; b=$(elapsed "$t")
    echo -e "list\t$n\t$i\t$a\t$b" >>"$out"
  done
  /usr/bin/python3 "$BENCH_DIR/apilat.py" "$LODGE_HOME/lodge.sock" "$n" "$REPS" ovh- lv-ovh- >>"$out"
  echo -e "rss_mib\t$n\t1\t$(rss_kib "$(pgrep -f "$LODGE daemon" | head -1)" | awk '{printf "%.1f", $1/1024}')\t$(rss_kib "$(pgrep -x libvirtd | head -1)" | awk '{printf "%.1f", $1/1024}')" >>"$out"
done
cleanup_ovh
rm -f "$WORK/lv-ovh.qcow2" "$WORK/lv-seed-empty.iso" "$WORK"/lv-ovh-*.xml

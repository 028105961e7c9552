#!/usr/bin/env bash
# Turns the scenarios' TSV files into results/summary.tsv: one row per
# measure with every run's value for Lodge and for its peer, the peer's
# name, the target, and which way is better. bench/report reads it.
source "$(dirname "$0")/lib.sh"
c=$RESULTS

# vals FILE EXPR [COND]: the awk expression EXPR for each run (header
# skipped) where COND holds, comma-separated; - if there is none.
vals() {
  local v
  v=$(awk -F'\t' "NR>1 && (${3:-1}) {printf \"%s%.6g\", (n++ ? \",\" : \"\"), $2}" "$1")
  echo "${v:--}"
}
# row SCENARIO MEASURE UNIT lower|higher PEER TARGET LODGE PEER-VALUES;
# a measure with no Lodge value (its part did not run) is left out.
row() { [ "$7" = - ] || printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@"; }
have() { [ -s "$c/$1" ]; }

{
if have startup.tsv; then
  f=$c/startup.tsv
  row startup "start to agent ready" s lower libvirt "ratio<=1.10" "$(vals "$f" '$2')" "$(vals "$f" '$3')"
  row startup "the start command alone" s lower libvirt - "$(vals "$f" '$4')" "$(vals "$f" '$5')"
fi
if have overhead.tsv; then
  f=$c/overhead.tsv
  for n in $(awk -F'\t' 'NR>1{print $2}' "$f" | sort -nu); do
    row "$n VMs defined" "CLI create" ms lower "virsh define" "lodge<50" "$(vals "$f" '$4*1000' "\$1==\"create\" && \$2==$n && \$3>$((n / 10 * 9))")" "$(vals "$f" '$5*1000' "\$1==\"create\" && \$2==$n && \$3>$((n / 10 * 9))")"
    row "$n VMs defined" "CLI show" ms lower "virsh dominfo" "lodge<50" "$(vals "$f" '$4*1000' "\$1==\"show\" && \$2==$n")" "$(vals "$f" '$5*1000' "\$1==\"show\" && \$2==$n")"
    row "$n VMs defined" "CLI list" ms lower "virsh list --all" "lodge<50" "$(vals "$f" '$4*1000' "\$1==\"list\" && \$2==$n")" "$(vals "$f" '$5*1000' "\$1==\"list\" && \$2==$n")"
    row "$n VMs defined" "API get one" ms lower "libvirt API" - "$(vals "$f" '$4*1000' "\$1==\"api_get\" && \$2==$n")" "$(vals "$f" '$5*1000' "\$1==\"api_get\" && \$2==$n")"
    row "$n VMs defined" "API list all" ms lower "libvirt API" - "$(vals "$f" '$4*1000' "\$1==\"api_list\" && \$2==$n")" "$(vals "$f" '$5*1000' "\$1==\"api_list\" && \$2==$n")"
    row "$n VMs defined" "daemon RSS" MiB lower libvirtd "lodge<50" "$(vals "$f" '$4' "\$1==\"rss_mib\" && \$2==$n")" "$(vals "$f" '$5' "\$1==\"rss_mib\" && \$2==$n")"
  done
fi
if have clone-linked.tsv; then
  f=$c/clone-linked.tsv
  row clone "linked clone, 4 GiB disk with 1 GiB" s lower virt-clone "lodge<0.1 && ratio<=0.05" "$(vals "$f" '$2')" "$(vals "$f" '$3')"
  row clone "linked clone against the disk copy alone" s lower "virsh vol-clone" "ratio<=0.05" "$(vals "$f" '$2')" "$(vals "$f" '$4')"
fi
if have clone-size.tsv; then
  f=$c/clone-size.tsv
  row "clone size" "1 GiB disk" s lower - "lodge<0.1" "$(vals "$f" '$2')" -
  row "clone size" "4 GiB disk" s lower - "lodge<0.1" "$(vals "$f" '$3')" -
  row "clone size" "16 GiB disk" s lower - "lodge<0.1" "$(vals "$f" '$4')" -
fi
if have clone-full.tsv; then
  f=$c/clone-full.tsv
  row clone "full clone" MB/s higher "cp --sparse=always" "ratio>=0.90" "$(vals "$f" '$4/$2/1e6')" "$(vals "$f" '$5/$3/1e6')"
fi
if have clone-boot.tsv; then
  f=$c/clone-boot.tsv
  row clone "clone + start to agent ready" s lower "fresh create --start" "ratio<=1.00" "$(vals "$f" '$2')" "$(vals "$f" '$3')"
fi
if have snapshot.tsv; then
  f=$c/snapshot.tsv
  row snapshot "guest pause during create with memory" ms lower libvirt "lodge<100" "$(vals "$f" '$4')" "$(vals "$f" '$5')"
  row snapshot "create with memory, 1 GiB guest" s lower libvirt "ratio<=1.00" "$(vals "$f" '$2')" "$(vals "$f" '$3')"
  row snapshot "revert with memory" s lower libvirt "ratio<=0.50" "$(vals "$f" '$7')" "$(vals "$f" '$8')"
fi
if have snapshot-disk.tsv; then
  f=$c/snapshot-disk.tsv
  row snapshot "disk-only, running VM, 4 GiB" s lower - "lodge<0.2" "$(vals "$f" '$2')" -
  row snapshot "disk-only, stopped VM, 16 GiB" s lower - "lodge<0.2" "$(vals "$f" '$3')" -
fi
if have memory.tsv; then
  f=$c/memory.tsv
  row "balloon" "shrink 1 GiB to 512 MiB" s lower "virsh setmem" "lodge<5" "$(vals "$f" '$2')" "$(vals "$f" '$3')"
  row "balloon" "grow back to 1 GiB" s lower "virsh setmem" - "$(vals "$f" '$4')" "$(vals "$f" '$5')"
fi
if have bundle-export.tsv; then
  f=$c/bundle-export.tsv
  row export "export, 4 GiB disk" s lower "qemu-img convert -c" "ratio<=1.2" "$(vals "$f" '$2')" "$(vals "$f" '$3')"
  row export "export" s lower "tar -S | zstd -1" "ratio<1" "$(vals "$f" '$2')" "$(vals "$f" '$4')"
  row export "bundle size" MiB lower "ideal (random + zstd -1 of text)" "ratio<=1.05" "$(vals "$f" '$5/1048576')" "$(vals "$f" '$8/1048576')"
fi
if have bundle-import.tsv; then
  f=$c/bundle-import.tsv
  row import "import" s lower "cp of the bundle" "ratio<=1.2" "$(vals "$f" '$2')" "$(vals "$f" '$3')"
fi
if have bundle-send.tsv; then
  f=$c/bundle-send.tsv
  row send "send over loopback" MB/s higher "cat bundle | nc" "ratio>=0.80" "$(vals "$f" '$5/$2/1e6')" "$(vals "$f" '$5/$3/1e6')"
  row send "send over loopback" MB/s higher "export - | nc | import -" - "$(vals "$f" '$5/$2/1e6')" "$(vals "$f" '$5/$4/1e6')"
fi
if have backup-convert.tsv; then
  f=$c/backup-convert.tsv
  row backup "full, stopped VM" MB/s higher "qemu-img convert + sync" "ratio>=0.70" "$(vals "$f" '$5/$3/1e6')" "$(vals "$f" '$5/$4/1e6')"
fi
if have backup-days.tsv; then
  f=$c/backup-days.tsv
  row backup "incremental after a 5% change, time" s lower "Lodge full backup" "ratio<=0.20" \
    "$(vals "$f" '$5' "\$2==\"unaligned\" && \$4==\"incremental\"")" "$(vals "$f" '$5' "\$2==\"unaligned\" && \$4==\"full\"")"
  row backup "incremental after a 5% change, data read" MiB lower "Lodge full backup" "ratio<=0.10" \
    "$(vals "$f" '$7/1048576' "\$2==\"unaligned\" && \$4==\"incremental\"")" "$(vals "$f" '$7/1048576' "\$2==\"unaligned\" && \$4==\"full\"")"
fi
if have backup-live.tsv; then
  f=$c/backup-live.tsv
  row backup "live full" s lower "virsh backup-begin" - "$(vals "$f" '$2')" "$(vals "$f" '$5')"
  row backup "live incremental" s lower "virsh backup-begin" - "$(vals "$f" '$9')" "$(vals "$f" '$12')"
fi
if have backup-guestio.tsv; then
  f=$c/backup-guestio.tsv
  row backup "guest dd during a live backup" MiB/s higher "no backup" "ratio>=0.80" "$(vals "$f" '$14/$2')" "$(vals "$f" '$14/$3')"
fi
if have stack.tsv; then
  f=$c/stack.tsv
  row stack "chain of 3 in dependency order" s lower "same boots by hand" "ratio<=1.05" "$(vals "$f" '$2')" "$(vals "$f" '$3')"
  row stack "3 independent members" s lower "one VM alone" - "$(vals "$f" '$4')" "$(vals "$f" '$5')"
  if [ "$(awk -F'\t' 'NR==1{print NF}' "$f")" -ge 6 ]; then
    row stack "3 independent members" s lower "the 3 booted by hand at once" "ratio<=1.05" "$(vals "$f" '$4')" "$(vals "$f" '$6')"
  fi
fi
if have guest.tsv; then
  f=$c/guest.tsv
  for g in cpu memory disk; do
    row "lodge bench" "guest $g as % of host" "%" higher - - "$(vals "$f" '$3' "\$2==\"$g\"")" -
  done
fi
} >"$c/summary.tsv"

# Scenarios the issue lists that cannot run yet, or have no peer.
{
  printf 'live migration\tit needs the cluster of hosts, a later capability\n'
} >"$c/notyet.tsv"

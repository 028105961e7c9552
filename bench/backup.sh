#!/usr/bin/env bash
# Backups: `lodge backup create` of a VM made from the tiny guest with a
# 4 GiB disk holding 1 GiB of random data (written from the host at 1 GiB,
# past the guest's partitions; the guest's own files add about 45 MiB).
#
# The 5% change is 13 runs of 4 MiB of fresh random data (52 MiB, 5.1% of
# the 1 GiB), spread through the data, in two patterns:
#   aligned:   run k at 1024 + 80k + 4d MiB, on 4 MiB boundaries, so each
#              run is one whole repository chunk (13 chunks);
#   unaligned: run k at 1024 + 78k + 1 + 4d MiB, always 1 or 3 MiB past a
#              4 MiB boundary, so each run straddles two chunks (26).
# d is the day (or the run, for the running VMs), so each change lands on
# other chunks than the last.
#
# Stopped VM (bk-s; changes written with qemu-io, which keeps the disk's
# persistent dirty bitmap up to date as QEMU does): per run and pattern, a
# fresh repository, `qemu-img convert -O qcow2` of the disk's chain + sync,
# then 10 daily backups (one full, then change + incremental nine times).
# Gives the incremental's bytes read, bytes stored and time against the
# full's, the repository's size after 10 backups against the full's, and
# the full's throughput against qemu-img's.
#
# Running VMs (bk-l in Lodge, lv-bk in libvirt, its disk a standalone qcow2
# copy of bk-l's): per run, a live full backup of each, alternated, then
# the same unaligned change written by the guests themselves (dd from
# /dev/urandom, O_DIRECT), then an incremental of each. libvirt's are
# `virsh backup-begin` in push mode to a qcow2 file with a checkpoint,
# timed from the call to the job-completed event, and again with a `sync`
# of the file (Lodge's backup is durable when it returns).
#
# Guest writes during a backup (bk-l): `dd` of 200 MiB (O_DIRECT) to the
# disk at 3000 MiB, timed in the guest (/proc/uptime), started as soon as
# a full backup's point is taken (its fleecing file appears) and alone,
# alternated. The same for a shell loop in the guest that does no I/O,
# which shows what sharing the host's CPUs with the backup costs alone.
# GIO_RUNS pairs (default twice RUNS): single pairs of the same build
# range from 0.5 to 0.95, so five leave the median uncertain.
#
# Writes results/backup-days.tsv, backup-convert.tsv, backup-live.tsv and
# backup-guestio.tsv.
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-3}
DAYS=${DAYS:-10}
V="virsh -c qemu:///system"
start_libvirtd
start_lodged

D=$WORK/backup
B=$D/libvirt
MIB=1048576

disk_of() { "$LODGE" show "$1" -o json | sed -n 's/.*"path": "\(.*\)".*/\1/p' | head -1; }
# jget FIELD FILE: a top-level field of `lodge ... -o json` output
jget() { sed -n "s/^  \"$1\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}\$/\1/p" "$2" | head -1; }

# Each repository gets a path of its own: the daemon keeps every
# repository it opened by path, and one added again at a path whose
# directory was removed is not made anew (its backups then fail).
STAMP=$(date +%s%N)
repo_dir() { echo "$D/repos/$1.$STAMP"; }
repo_add() { "$LODGE" backup repo add "$1" "$(repo_dir "$1")" >/dev/null; }
# Repositories stay until the scenario ends. This host's root filesystem
# is ext4 without a journal, where allocating an inode skips every inode
# freed in the last seconds, reading each one's table block: removing a
# thousand-chunk repository just before the next full backup made that
# backup pay for the bench's own cleanup (a sixth of its time).
repo_rm() {
  "$LODGE" backup repo remove "$1" >/dev/null 2>&1 || true
  rm -rf "$(repo_dir "$1")"
}
# repo_bytes NAME: what the repository's chunks take, as Lodge counts it
repo_bytes() {
  "$LODGE" backup repo list -o json | tr -d ' \n' |
    sed -n "s/.*{\"name\":\"$1\",[^}]*\"size\":\([0-9]*\).*/\1/p"
}

# bk VM REPO JSON: one backup, after a sync; prints the wall time.
bk() {
  local t
  sync
  t=$(now)
  "$LODGE" backup create "$1" --repo "$2" -o json >"$3" || return 1
  elapsed "$t"
}

# offsets PATTERN DAY: the 13 start offsets (MiB) of a 5% change.
offsets() {
  local k
  for k in $(seq 0 12); do
    case "$1" in
      aligned) echo $((1024 + 80 * k + 4 * $2)) ;;
      unaligned) echo $((1024 + 78 * k + 1 + 4 * $2)) ;;
    esac
  done
}

# change_stopped DISK PATTERN DAY: the change, from the host, into the
# stopped VM's disk; each run gets its own random bytes.
change_stopped() {
  local disk=$1 args=() k=0 o
  rm -f "$D"/chg.*
  head -c 52M /dev/urandom | split -b 4M -d -a 2 - "$D/chg."
  for o in $(offsets "$2" "$3"); do
    args+=(-c "write -s $D/chg.$(printf %02d "$k") $((o * MIB)) $((4 * MIB))")
    k=$((k + 1))
  done
  qemu-io -f qcow2 "${args[@]}" "$disk" >/dev/null
  rm -f "$D"/chg.*
}

# guest_change DAY: the guest's own shell loop for the unaligned change.
guest_change() {
  echo "for o in $(offsets unaligned "$1" | tr '\n' ' '); do dd if=/dev/urandom of=/dev/vda bs=1M seek=\$o count=4 oflag=direct 2>/dev/null || exit 1; done; sync"
}

# lv_run DOMAIN CMD: run sh -c CMD in a libvirt guest through its agent
# and wait for it to end; fails if the command does.
lv_run() {
  local pid st
  pid=$($V qemu-agent-command "$1" "{\"execute\":\"guest-exec\",\"arguments\":{\"path\":\"/bin/sh\",\"arg\":[\"-c\",\"$2\"]}}" |
    sed -n 's/.*"pid":\([0-9]*\).*/\1/p')
  [ -n "$pid" ] || { echo "lv_run $1: guest-exec failed" >&2; return 1; }
  for _ in $(seq 1200); do
    st=$($V qemu-agent-command "$1" "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$pid}}")
    case "$st" in
      *'"exited":true'*'"exitcode":0'* | *'"exitcode":0'*'"exited":true'*) return 0 ;;
      *'"exited":true'*) echo "lv_run $1: $st" >&2; return 1 ;;
    esac
    sleep 0.1
  done
  echo "lv_run $1: timed out" >&2
  return 1
}

# lv_backup full|inc RUN: a push-mode backup of lv-bk's vda to a qcow2
# file with a new checkpoint (f$RUN for the full, n$RUN for the
# incremental, which starts from f$RUN). Prints the seconds to the
# job-completed event, the seconds with a sync of the file too, the
# bytes the job processed and the file's size.
lv_backup() {
  local kind=$1 run=$2 ck inc="" tgt t a s ep
  if [ "$kind" = full ]; then ck=f$run; else ck=n$run; inc="<incremental>f$run</incremental>"; fi
  tgt=$B/$kind-$run.qcow2
  rm -f "$tgt"
  cat >"$B/backup.xml" <<XML
<domainbackup mode='push'>
  $inc
  <disks>
    <disk name='vda' backup='yes' type='file'><driver type='qcow2'/><target file='$tgt'/></disk>
    <disk name='hdc' backup='no'/>
  </disks>
</domainbackup>
XML
  cat >"$B/checkpoint.xml" <<XML
<domaincheckpoint>
  <name>$ck</name>
  <disks><disk name='vda' checkpoint='bitmap'/><disk name='hdc' checkpoint='no'/></disks>
</domaincheckpoint>
XML
  sync
  $V event lv-bk --event job-completed --timeout 300 >"$B/event.out" &
  ep=$!
  sleep 0.5 # the listener is registered by then
  t=$(now)
  if ! $V backup-begin lv-bk "$B/backup.xml" "$B/checkpoint.xml" >/dev/null; then
    kill "$ep" 2>/dev/null || true
    return 1
  fi
  wait "$ep" || return 1
  a=$(elapsed "$t")
  sync "$tgt"
  s=$(elapsed "$t")
  grep -q 'success: 1' "$B/event.out" || { echo "libvirt $kind backup $run failed:" >&2; cat "$B/event.out" >&2; return 1; }
  echo "$a $s $(sed -n 's/.*disk_total: \([0-9]*\).*/\1/p' "$B/event.out") $(stat -c %s "$tgt")"
}

cleanup() {
  # A backup still running in the background (the script failed) holds
  # the VM and writes into its repository: let it end first. Not the
  # daemon, which start_lodged may have started from this shell.
  local p
  for p in $(jobs -p); do
    [ "$p" = "$(cat "$WORK/daemon.pid" 2>/dev/null)" ] || wait "$p" || true
  done
  $V destroy lv-bk >/dev/null 2>&1 || true
  $V undefine lv-bk --checkpoints-metadata --snapshots-metadata >/dev/null 2>&1 || true
  local vm r
  for vm in bk-s bk-l; do "$LODGE" delete --force "$vm" >/dev/null 2>&1 || true; done
  for r in $("$LODGE" backup repo list -o json 2>/dev/null | sed -n 's/.*"name": "\(bk-[a-z0-9-]*\)".*/\1/p'); do repo_rm "$r"; done
  rm -rf "$D" "$WORK"/lv-bk*
}
cleanup
trap cleanup EXIT
mkdir -p "$D/repos" "$B"

# The data, the same bytes in both Lodge VMs (and so in libvirt's copy).
head -c 1G /dev/urandom >"$D/random.bin"
for vm in bk-s bk-l; do
  "$LODGE" create "$vm" --image tiny --disk 4G --memory 256M >/dev/null
  qemu-io -f qcow2 -c "write -s $D/random.bin $((1024 * MIB)) $((1024 * MIB))" "$(disk_of "$vm")" >/dev/null
done
rm -f "$D/random.bin"
S=$(disk_of bk-s)
L=$(disk_of bk-l)
# One untimed pass, so that both readers find the same data cached.
qemu-img convert -f qcow2 -O qcow2 "$S" "$D/conv.qcow2"
rm -f "$D/conv.qcow2"

# --- Stopped VM: full, incrementals, 10 days, qemu-img convert.
days=$RESULTS/backup-days.tsv
conv=$RESULTS/backup-convert.tsv
echo -e "run\tpattern\tday\tkind\twall_s\tduration_s\tread\tstored\tsize\trepo_bytes\trepo_du" >"$days"
echo -e "run\tpattern\tlodge_s\tqemuimg_s\tlodge_read\tqemuimg_bytes" >"$conv"
for i in $(seq "$RUNS"); do
  for p in aligned unaligned; do
    repo=bk-$p-$i
    repo_add "$repo"
    sync
    t=$(now)
    qemu-img convert -f qcow2 -O qcow2 "$S" "$D/conv.qcow2"
    sync
    q=$(elapsed "$t")
    qb=$(stat -c %s "$D/conv.qcow2")
    rm -f "$D/conv.qcow2"
    for day in $(seq "$DAYS"); do
      [ "$day" = 1 ] || change_stopped "$S" "$p" "$day"
      w=$(bk bk-s "$repo" "$D/b.json")
      kind=$(jget kind "$D/b.json")
      want=incremental
      if [ "$day" = 1 ]; then want=full; fi
      if [ "$kind" != "$want" ]; then
        echo "day $day backup is $kind: $(jget reason "$D/b.json")" >&2
        exit 1
      fi
      echo -e "$i\t$p\t$day\t$kind\t$w\t$(jget duration_seconds "$D/b.json")\t$(jget read "$D/b.json")\t$(jget new_data "$D/b.json")\t$(jget size "$D/b.json")\t$(repo_bytes "$repo")\t$(du -sb "$(repo_dir "$repo")" | cut -f1)" | tee -a "$days"
      if [ "$day" = 1 ]; then
        echo -e "$i\t$p\t$w\t$q\t$(jget read "$D/b.json")\t$qb" >>"$conv"
      fi
    done
  done
done
cat "$conv"

# --- Running VMs: Lodge against virsh backup-begin.
qemu-img convert -f qcow2 -O qcow2 "$L" "$WORK/lv-bk.qcow2"
cp "$LODGE_HOME/vms/bk-l/seed.iso" "$WORK/lv-bk-seed.iso"
libvirt_define lv-bk "$WORK/lv-bk.qcow2" "$WORK/lv-bk-seed.iso" 256
"$LODGE" start bk-l >/dev/null
$V start lv-bk >/dev/null
"$LODGE" exec bk-l --wait 180s -- true
libvirt_wait_agent lv-bk

live=$RESULTS/backup-live.tsv
echo -e "run\tlodge_full_s\tlodge_full_read\tlodge_full_stored\tvirsh_full_s\tvirsh_full_sync_s\tvirsh_full_bytes\tvirsh_full_file\tlodge_inc_s\tlodge_inc_read\tlodge_inc_stored\tvirsh_inc_s\tvirsh_inc_sync_s\tvirsh_inc_bytes\tvirsh_inc_file" >"$live"
for i in $(seq "$RUNS"); do
  repo=bk-live-$i
  repo_add "$repo"
  lf=$(bk bk-l "$repo" "$D/lf.json")
  [ "$(jget kind "$D/lf.json")" = full ] || { echo "live backup $i is not full" >&2; exit 1; }
  vf=$(lv_backup full "$i")
  chg=$(guest_change "$i")
  "$LODGE" exec bk-l -- sh -c "$chg"
  lv_run lv-bk "$chg"
  li=$(bk bk-l "$repo" "$D/li.json")
  [ "$(jget kind "$D/li.json")" = incremental ] || { echo "live backup $i is $(jget kind "$D/li.json"): $(jget reason "$D/li.json")" >&2; exit 1; }
  vi=$(lv_backup inc "$i")
  echo -e "$i\t$lf\t$(jget read "$D/lf.json")\t$(jget new_data "$D/lf.json")\t$(echo "$vf" | tr ' ' '\t')\t$li\t$(jget read "$D/li.json")\t$(jget new_data "$D/li.json")\t$(echo "$vi" | tr ' ' '\t')" | tee -a "$live"
  $V checkpoint-delete lv-bk "n$i" >/dev/null
  $V checkpoint-delete lv-bk "f$i" >/dev/null
  rm -f "$B"/*.qcow2
done
$V destroy lv-bk >/dev/null
$V undefine lv-bk --checkpoints-metadata >/dev/null
rm -f "$WORK"/lv-bk*

# --- Guest writes during a backup.
ddc='a=$(cut -d" " -f1 /proc/uptime); dd if=/dev/zero of=/dev/vda bs=1M seek=3000 count=200 oflag=direct 2>/dev/null || exit 1; b=$(cut -d" " -f1 /proc/uptime); echo "$a $b"'
# The same, for the guest's CPU alone: a shell loop, no I/O. It tells
# how much of dd's slowdown is the host's CPUs being shared (the backup
# hashes and compresses; QEMU's TCG emulates the guest on a host CPU).
cpuc='a=$(cut -d" " -f1 /proc/uptime); i=0; while [ $i -lt 40000 ]; do i=$((i+1)); done; b=$(cut -d" " -f1 /proc/uptime); echo "$a $b"'
# secs "A B": the guest's seconds between its two uptimes
secs() { echo "$1" | awk '{printf "%.2f", $2-$1}'; }

# alone CMD: the guest's seconds for CMD with nothing else going on.
alone() {
  sync
  secs "$("$LODGE" exec bk-l -- sh -c "$1")"
}

# during CMD REPO: CMD started in the guest as soon as a full backup to
# the new repository REPO has taken its point. Prints the guest's seconds
# for CMD, the share of CMD's host-side window the backup covered, the
# backup's seconds, the seconds from the backup's start to CMD's, and how
# many times the agent refused the exec because the filesystems were
# frozen.
during() {
  local cmd=$1 repo=$2 bp t0 t1 t2 t3 r refused=0
  repo_add "$repo"
  rm -f "$D/g.end"
  sync
  t0=$(now)
  ("$LODGE" backup create bk-l --repo "$repo" -o json >"$D/g.json"; now >"$D/g.end") &
  bp=$!
  # The point is taken (copy-before-write in place) right after the
  # fleecing file appears; if it never shows, CMD starts after 3 s.
  for _ in $(seq 300); do [ -e "$L.fleece.qcow2" ] && break; sleep 0.01; done
  # An exec that reaches the agent while the filesystems are frozen is
  # refused ("the agent is in frozen state"); count those and retry.
  while :; do
    t1=$(now)
    if r=$("$LODGE" exec bk-l -- sh -c "$cmd" 2>"$D/exec.err"); then break; fi
    if ! grep -q 'frozen' "$D/exec.err" || [ "$refused" -ge 500 ]; then
      cat "$D/exec.err" >&2
      return 1
    fi
    refused=$((refused + 1))
    sleep 0.01
  done
  t2=$(now)
  wait "$bp" || return 1
  t3=$(cat "$D/g.end")
  [ "$(jget kind "$D/g.json")" = full ] || { echo "backup to $repo is not full" >&2; return 1; }
  echo "$(secs "$r") $(awk -v a="$t1" -v b="$t2" -v e="$t3" -v s="$t0" 'BEGIN{o=(e<b?e:b)-a; if (o<0) o=0; printf "%.2f %.3f %.3f", o/(b-a), e-s, a-s}') $refused"
}

# Untimed: the first write allocates the clusters; every timed one
# rewrites them.
"$LODGE" exec bk-l -- sh -c "$ddc" >/dev/null
gio=$RESULTS/backup-guestio.tsv
echo -e "run\tdd_with_s\tdd_alone_s\tdd_overlap\tdd_backup_s\tdd_start_s\tdd_refused\tcpu_with_s\tcpu_alone_s\tcpu_overlap\tcpu_backup_s\tcpu_start_s\tcpu_refused\tdd_mib" >"$gio"
for i in $(seq "${GIO_RUNS:-$((2 * RUNS))}"); do
  # Odd runs measure with a backup first, even runs alone first.
  if [ $((i % 2)) = 1 ]; then
    dw=$(during "$ddc" "bk-io-$i")
    da=$(alone "$ddc")
    ca=$(alone "$cpuc")
    cw=$(during "$cpuc" "bk-cpu-$i")
  else
    da=$(alone "$ddc")
    dw=$(during "$ddc" "bk-io-$i")
    cw=$(during "$cpuc" "bk-cpu-$i")
    ca=$(alone "$cpuc")
  fi
  read -r dws dov dbs dst dre <<<"$dw"
  read -r cws cov cbs cst cre <<<"$cw"
  echo -e "$i\t$dws\t$da\t$dov\t$dbs\t$dst\t$dre\t$cws\t$ca\t$cov\t$cbs\t$cst\t$cre\t200" | tee -a "$gio"
done

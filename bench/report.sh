#!/usr/bin/env bash
# Writes the details of results.md, scenario by scenario, from
# bench/results/*.tsv to stdout.
source "$(dirname "$0")/lib.sh"
col() { awk -F'\t' -v c="$2" -v op="$3" 'NR>1 && (op=="" || $1==op){print $c}' "$1" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b>0) printf "%.2f", a/b; else print "-" }'; }
# The summary table, machine and charts come first, from bench/report;
# these are the details behind them.
echo
echo "# Details"
c=$RESULTS
ms() { awk -v x="$1" 'BEGIN{printf "%.0f", x*1000}'; }
times() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a>0) printf "%.0f×", b/a; else print "-" }'; }
# verdict EXPR: pass when the awk expression holds
verdict() { if awk "BEGIN{exit !($1)}"; then echo pass; else echo fail; fi; }
if ls "$c"/clone-*.tsv >/dev/null 2>&1; then
  echo
  echo "## Clones"
  echo
  echo "Medians of $(($(wc -l <"$(ls "$c"/clone-*.tsv | head -1)") - 1)) runs, Lodge and the comparison alternated within each run; \`sync\` before every timed step."
fi
if [ -f "$c/clone-linked.tsv" ]; then
  a=$(col "$c/clone-linked.tsv" 2 ""); b=$(col "$c/clone-linked.tsv" 3 ""); v=$(col "$c/clone-linked.tsv" 4 "")
  d=$(col "$c/clone-linked.tsv" 5 ""); k=$(col "$c/clone-linked.tsv" 6 "")
  echo
  echo "Linked clone of a stopped VM, 4 GiB disk with 1 GiB of data in its top layer:"
  echo
  echo "| measure | Lodge | comparison | comparison / Lodge | target | result |"
  echo "|---|---|---|---|---|---|"
  echo "| \`lodge clone\` against \`virt-clone\` (ms) | $(ms "$a") | $(ms "$b") | $(times "$a" "$b") | < 100 ms, ≥ 20× faster | $(verdict "$a < 0.1 && $b >= 20 * $a") |"
  echo "| of which virt-clone's define (s) | | $d | | | |"
  echo "| and its disk copy (s) | | $k | | | |"
  echo "| against libvirt's copy alone, \`virsh vol-clone\` (ms) | $(ms "$a") | $(ms "$v") | $(times "$a" "$v") | ≥ 20× faster | $(verdict "$v >= 20 * $a") |"
fi
if [ -f "$c/clone-size.tsv" ]; then
  s1=$(col "$c/clone-size.tsv" 2 ""); s4=$(col "$c/clone-size.tsv" 3 ""); s16=$(col "$c/clone-size.tsv" 4 "")
  echo
  echo "Linked clone time against disk size (Lodge only):"
  echo
  echo "| disk (data in its top layer) | Lodge (ms) | 1 GiB disk (ms) | ratio to 1 GiB | target | result |"
  echo "|---|---|---|---|---|---|"
  echo "| 1 GiB (512 MiB) | $(ms "$s1") | $(ms "$s1") | 1.00 | < 100 ms | $(verdict "$s1 < 0.1") |"
  echo "| 4 GiB (1 GiB) | $(ms "$s4") | $(ms "$s1") | $(ratio "$s4" "$s1") | < 100 ms | $(verdict "$s4 < 0.1") |"
  echo "| 16 GiB (1 GiB) | $(ms "$s16") | $(ms "$s1") | $(ratio "$s16" "$s1") | < 100 ms, no growth (≤ 1.5) | $(verdict "$s16 < 0.1 && $s16 <= 1.5 * $s1") |"
fi
if [ -f "$c/clone-full.tsv" ]; then
  f=$c/clone-full.tsv
  a=$(col "$f" 2 ""); b=$(col "$f" 3 "")
  ar=$(awk -F'\t' 'NR>1{printf "%.1f\n", $4/$2/1e6}' "$f" | median)
  br=$(awk -F'\t' 'NR>1{printf "%.1f\n", $5/$3/1e6}' "$f" | median)
  ab=$(col "$f" 4 ""); bb=$(col "$f" 5 "")
  echo
  echo "Full clone of image + top with 1 GiB of data (4 GiB disk) against \`cp --sparse=always\` of the same chain flattened into one qcow2;"
  echo "MB/s on allocated bytes ($(awk -v x="$ab" 'BEGIN{printf "%.0f", x/1048576}') MiB for Lodge's copy, $(awk -v x="$bb" 'BEGIN{printf "%.0f", x/1048576}') MiB for cp's):"
  echo
  echo "| comparison | Lodge (s) | comparison (s) | Lodge (MB/s) | comparison (MB/s) | Lodge / comparison, speed | target | result |"
  echo "|---|---|---|---|---|---|---|---|"
  echo "| \`cp --sparse=always\` | $a | $b | $ar | $br | $(ratio "$ar" "$br") | ≥ 0.90 | $(verdict "$ar >= 0.9 * $br") |"
fi
if [ -f "$c/clone-boot.tsv" ]; then
  a=$(col "$c/clone-boot.tsv" 2 ""); b=$(col "$c/clone-boot.tsv" 3 ""); k=$(col "$c/clone-boot.tsv" 4 "")
  echo
  echo "From clone to agent ready, against a fresh boot of the image:"
  echo
  echo "| measure | Lodge clone + start + exec | fresh create --start + exec | Lodge / fresh | target | result |"
  echo "|---|---|---|---|---|---|"
  echo "| to agent ready (s) | $a | $b | $(ratio "$a" "$b") | ≤ 1.00 | $(verdict "$a <= $b") |"
  echo "| of which \`lodge clone\` (ms) | $(ms "$k") | | | | |"
fi
if [ -f "$c/snapshot.tsv" ]; then
  f=$c/snapshot.tsv
  a=$(col "$f" 2 ""); b=$(col "$f" 3 ""); ga=$(col "$f" 4 ""); gb=$(col "$f" 5 ""); p=$(col "$f" 6 "")
  ra=$(col "$f" 7 ""); rb=$(col "$f" 8 ""); bl=$(col "$f" 9 ""); bv=$(col "$f" 10 "")
  echo
  echo "## Snapshots with memory"
  echo
  echo "Guest with 1 GiB of RAM (600 MiB filled) and a 4 GiB disk holding 1 GiB; medians of $(($(wc -l <"$f") - 1)) runs, Lodge and \`virsh snapshot-create-as\` / \`snapshot-revert\` alternated."
  echo "The pause is seen from the guest: it writes to its serial port every 2 ms and the host times the arrivals; the longest gap with nothing going on was $bl ms (Lodge's VM) and $bv ms (libvirt's)."
  echo
  echo "| measure | Lodge | libvirt | Lodge / libvirt | target | result |"
  echo "|---|---|---|---|---|---|"
  echo "| longest guest gap during the snapshot (ms) | $ga | $gb | $(ratio "$ga" "$gb") | < 100 ms | $(verdict "$ga < 100") |"
  echo "| of which Lodge's own pause measure (ms) | $p | | | | |"
  echo "| whole create (s) | $a | $b | $(ratio "$a" "$b") | ≤ 1.00 | $(verdict "$a <= $b") |"
  echo "| revert (s) | $ra | $rb | $(ratio "$ra" "$rb") | ≤ 0.50 | $(verdict "$ra <= 0.5 * $rb") |"
fi
if [ -f "$c/snapshot-disk.tsv" ]; then
  a=$(col "$c/snapshot-disk.tsv" 2 ""); b=$(col "$c/snapshot-disk.tsv" 3 "")
  echo
  echo "| disk-only snapshot (ms) | Lodge | target | result |"
  echo "|---|---|---|---|"
  echo "| running VM, 4 GiB disk, filesystems frozen | $(ms "$a") | < 200 ms | $(verdict "$a < 0.2") |"
  echo "| stopped VM, 16 GiB disk | $(ms "$b") | < 200 ms | $(verdict "$b < 0.2") |"
fi
if [ -f "$c/memory.tsv" ]; then
  f=$c/memory.tsv
  a=$(col "$f" 2 ""); b=$(col "$f" 3 ""); g=$(col "$f" 4 ""); h=$(col "$f" 5 "")
  echo
  echo "## Memory"
  echo
  echo "A running 1 GiB guest gives back half its memory and takes it again; Lodge's \`set\` returns when the guest is there, libvirt's \`setmem --live\` is followed by polling \`dommemstat\` until it is (within 4 MiB). Medians of $(($(wc -l <"$f") - 1)) runs, alternated."
  echo
  echo "| measure | Lodge | libvirt | Lodge / libvirt | target | result |"
  echo "|---|---|---|---|---|---|"
  echo "| 1 GiB → 512 MiB (s) | $a | $b | $(ratio "$a" "$b") | < 5 s | $(verdict "$a < 5") |"
  echo "| 512 MiB → 1 GiB (s) | $g | $h | $(ratio "$g" "$h") | | |"
  echo
  echo "How fast memory goes is up to the guest's balloon driver: it hands back 1 MiB (256 pages) per request to QEMU, which discards each page, and under TCG every round trip costs about 12 ms of emulated guest work. Lodge only sets the target and watches, so it tracks libvirt run for run, and the absolute time follows how busy this shared machine is. A VM booted with room for hot-plug gives back what was plugged through virtio-mem instead, in 2 MiB blocks, which is faster."
fi
if [ -f "$c/density.tsv" ]; then
  f=$c/density.tsv
  # field NAME SYSTEM: one column of one system's row
  field() { awk -F'\t' -v s="$2" -v k="$1" 'NR==1{for(i=1;i<=NF;i++) h[$i]=i; next} $1==s{print $h[k]}' "$f"; }
  per() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN{ if (n>0) printf "%.0f", (b-a)/n; else print "-" }'; }
  ln=$(field running lodge); vn=$(field running libvirt)
  ld=$(per "$(field daemon_rss_idle_kib lodge)" "$(field daemon_rss_kib lodge)" "$ln")
  vd=$(per "$(field daemon_rss_idle_kib libvirt)" "$(field daemon_rss_kib libvirt)" "$vn")
  lq=$(per 0 "$(field qemu_rss_kib lodge)" "$ln"); vq=$(per 0 "$(field qemu_rss_kib libvirt)" "$vn")
  lh=$(per 0 "$(field host_used_kib lodge)" "$ln"); vh=$(per 0 "$(field host_used_kib libvirt)" "$vn")
  echo
  echo "## Density"
  echo
  echo "From \`density.sh\`, which is not part of \`make bench\` (it takes about 15 minutes); this is its last run, of $(date -u -r "$f" +%Y-%m-%d), before libvirtd was given Debian's /dev/kvm permissions (see bench/README.md). Tiny guests at 128 MiB, started 4 at a time, each waited on until its agent answers. Lodge ran as many as the host's memory limit admits at overcommit 1.0 ($(field admitted lodge); one more start refused: $(field next_refused lodge)); libvirt ran $vn. Per-VM figures, KiB."
  echo
  echo "| measure | Lodge | libvirt | Lodge / libvirt | target | result |"
  echo "|---|---|---|---|---|---|"
  echo "| VMs running at once | $ln | $vn | | | |"
  echo "| all started and agent-ready (s) | $(field boot_all_s lodge) | $(field boot_all_s libvirt) | | | |"
  echo "| daemon RSS per running VM | $ld | $vd | $(ratio "$ld" "$vd") | < 1024 | $(verdict "$ld < 1024") |"
  echo "| QEMU RSS per VM | $lq | $vq | $(ratio "$lq" "$vq") | | |"
  echo "| host memory used per VM | $lh | $vh | $(ratio "$lh" "$vh") | | |"
  echo
  echo "Each running VM counts against the limit for its memory and for what its QEMU takes beyond it (\`vm_overhead\`: 40 MiB, plus the 64 MiB TCG code cache here), so the limit admitted no more VMs than the host could carry: with all of them running, the host still had its reserve. Counted on the guest memory alone, the same limit would have admitted 180, which this host cannot run. Lodge caps TCG's code cache at 64 MiB (\`tcg_cache\`) where libvirt leaves QEMU's 1 GiB default, of which a guest keeps about 100 MiB resident after booting: hence the smaller QEMUs. The times to start them all are not comparable (99 against 8 VMs)."
fi
if [ -f "$c/bundle-export.tsv" ]; then
  f=$c/bundle-export.tsv
  a=$(col "$f" 2 ""); q=$(col "$f" 3 ""); z=$(col "$f" 4 "")
  lb=$(col "$f" 5 ""); qb=$(col "$f" 6 ""); zb=$(col "$f" 7 ""); ib=$(col "$f" 8 "")
  mib() { awk -v x="$1" 'BEGIN{printf "%.0f", x/1048576}'; }
  echo
  echo "## Bundles"
  echo
  dm=$(cat "$c/bundle-data-mib.txt" 2>/dev/null || echo 1024)
  echo "A stopped VM's 4 GiB disk holding $dm MiB of random data and $dm MiB of text (Go source), exported with \`lodge export\` (compression fast) against standard tools on the same disk. Medians of $(($(wc -l <"$f") - 1)) runs, alternated; \`sync\` before each."
  echo
  echo "| measure | Lodge | comparison | Lodge / comparison | target | result |"
  echo "|---|---|---|---|---|---|"
  echo "| export against \`qemu-img convert -O qcow2 -c\` (s) | $a | $q | $(ratio "$a" "$q") | ≤ 1.2 | $(verdict "$a <= 1.2 * $q") |"
  zs=$(col "$f" 9 "")
  echo "| export against \`tar -S \| zstd -1\` (s) | $a | $z | $(ratio "$a" "$z") | < 1 | $(verdict "$a < $z") |"
  echo "| export against \`tar -S \| zstd -1\` + \`sync FILE\` (s) | $a | $zs | $(ratio "$a" "$zs") | < 1 | $(verdict "$a < $zs") |"
  echo "| bundle size against random + zstd -1 of the text (MiB) | $(mib "$lb") | $(mib "$ib") | $(ratio "$lb" "$ib") | ≤ 1.05 | $(verdict "$lb <= 1.05 * $ib") |"
  echo "| size of qemu-img -c's qcow2, of tar+zstd (MiB) | | $(mib "$qb"), $(mib "$zb") | | | |"
fi
if [ -f "$c/bundle-import.tsv" ]; then
  f=$c/bundle-import.tsv
  a=$(col "$f" 2 ""); b=$(col "$f" 3 ""); s=$(col "$f" 4 "")
  echo "| import against \`cp\` of the bundle (s) | $a | $b | $(ratio "$a" "$b") | ≤ 1.2 | $(verdict "$a <= 1.2 * $b") |"
  echo "| import against \`cp\` + \`sync\` (s) | $a | $s | $(ratio "$a" "$s") | | |"
fi
if [ -f "$c/bundle-send.tsv" ]; then
  f=$c/bundle-send.tsv
  a=$(col "$f" 2 ""); b=$(col "$f" 3 ""); p=$(col "$f" 4 ""); n=$(col "$f" 5 "")
  mbs() { awk -v n="$n" -v s="$1" 'BEGIN{printf "%.0f", n/s/1e6}'; }
  echo
  echo "\`lodge send\` of the stopped VM to a second daemon on this host (HTTPS over loopback, pinned certificate), until the receiver has checked, written and registered it; against the same bundle file moved with \`nc\` (\`nc -l > file\` and \`nc -N < bundle\`), and against the same work piped through \`nc\`: \`lodge export bundle-src -\` into \`nc\`, and \`nc -l\` into \`lodge import -\` on the second daemon. MB/s of the $(awk -v n="$n" 'BEGIN{printf "%.0f", n/1048576}') MiB bundle; medians of $(($(wc -l <"$f") - 1)) runs, alternated."
  echo
  echo "| measure | lodge send | comparison | send / comparison | target | result |"
  echo "|---|---|---|---|---|---|"
  echo "| against \`cat bundle \| nc\` (MB/s) | $(mbs "$a") | $(mbs "$b") | $(ratio "$b" "$a") | ≥ 0.80 | $(verdict "$b >= 0.8 * $a") |"
  echo "| against \`export - \| nc \| import -\` (MB/s) | $(mbs "$a") | $(mbs "$p") | $(ratio "$p" "$a") | | |"
  echo
  echo "A send makes the bundle as it goes (reads the disk, compresses, hashes) and the receiver checks, decompresses and writes it and syncs, so it cannot move a VM as fast as \`nc\` moves a file that already exists: the export alone takes longer than that (see above). Against the same work piped through \`nc\`, the transport's own cost (TLS, chunk acknowledgements for resuming) is what is left."
fi
if [ -f "$c/bundle-import.tsv" ]; then
  echo
  echo "The import target (within 1.2× of copying the bundle) cannot be met by any import that makes a usable disk: \`cp\` moves the compressed bundle, while an import must check every chunk (BLAKE3), decompress the text and write the whole of the data, then make it durable; \`cp\` + \`sync\` of the raw data would be the fair floor. Lodge writes the qcow2 directly rather than through qemu-nbd."
  echo
  echo "The export comparisons are noisy on this shared machine: see bench/results/bundle-export.tsv for each run. Lodge reads the stopped VM's qcow2 chain straight from its files (package qcow2; qemu-nbd only for images it does not read), compresses 4 MiB chunks on both cores, stores chunks that do not compress as they are, and syncs the file before renaming it into place. \`qemu-img convert -c\` compresses with zlib on one thread."
fi
if ls "$c"/backup-*.tsv >/dev/null 2>&1; then
  # pick FILE EXPR COND: median of the awk expression EXPR over the rows
  # (header skipped) where COND holds
  pick() { awk -F'\t' "NR>1 && ($3) {printf \"%.6f\\n\", $2}" "$1" | median; }
  mb() { awk -v x="$1" 'BEGIN{printf "%.0f", x/1048576}'; }
  # ratio3: ratio with three decimals, for ratios held against a target
  ratio3() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b>0) printf "%.3f", a/b; else print "-" }'; }
  echo
  echo "## Backups"
  echo
  echo "A VM made from the tiny guest with a 4 GiB disk holding 1 GiB of random data (written at 1 GiB, past the guest's partitions; the guest's own files add about 45 MiB). Each scenario backs up into a new repository (1 MiB chunks). The 5% change is 13 runs of 4 MiB of new random data (52 MiB, 5.1% of the 1 GiB) spread through the data: *aligned*, each run on a 4 MiB boundary; *unaligned*, each run 1 or 3 MiB past a 4 MiB boundary (it would straddle two chunks of 4 MiB, the size Proxmox uses; with 1 MiB chunks both patterns touch 4 chunks per run). \`sync\` before every timed step."
fi
if [ -f "$c/backup-days.tsv" ]; then
  f=$c/backup-days.tsv
  last=$(awk -F'\t' 'NR>1 && $3>m{m=$3} END{print m+0}' "$f")
  echo
  echo "Stopped VM, changes written from the host with \`qemu-io\` (QEMU records them in the disk's persistent dirty bitmap); each run is a full backup and then $((last - 1)) days of change + incremental. Medians of $(awk -F'\t' 'NR>1 && $3==1' "$f" | wc -l | awk '{print $1/2}') runs per pattern ($(awk -F'\t' 'NR>1 && $4=="incremental"' "$f" | wc -l | awk '{print $1/2}') incrementals each):"
  echo
  echo "| measure | incremental | full | incremental / full | target | result |"
  echo "|---|---|---|---|---|---|"
  for p in aligned unaligned; do
    ir=$(pick "$f" '$7' "\$2==\"$p\" && \$4==\"incremental\""); fr=$(pick "$f" '$7' "\$2==\"$p\" && \$4==\"full\"")
    is=$(pick "$f" '$8' "\$2==\"$p\" && \$4==\"incremental\""); fs=$(pick "$f" '$8' "\$2==\"$p\" && \$4==\"full\"")
    it=$(pick "$f" '$5' "\$2==\"$p\" && \$4==\"incremental\""); ft=$(pick "$f" '$5' "\$2==\"$p\" && \$4==\"full\"")
    echo "| $p: data read (MiB) | $(mb "$ir") | $(mb "$fr") | $(ratio3 "$ir" "$fr") | ≤ 0.10 | $(verdict "$ir <= 0.1 * $fr") |"
    echo "| $p: data stored, compressed (MiB) | $(mb "$is") | $(mb "$fs") | $(ratio3 "$is" "$fs") | ≤ 0.10 | $(verdict "$is <= 0.1 * $fs") |"
    echo "| $p: time (s) | $(printf %.3f "$it") | $(printf %.3f "$ft") | $(ratio3 "$it" "$ft") | ≤ 0.20 | $(verdict "$it <= 0.2 * $ft") |"
  done
  echo
  echo "| repository after $last daily backups | size (MiB) | one full backup (MiB) | ratio | target | result |"
  echo "|---|---|---|---|---|---|"
  for p in aligned unaligned; do
    # per run: the repository after the last day against after the first
    r=$(awk -F'\t' -v p="$p" -v l="$last" 'NR>1 && $2==p && $3==1{a[$1]=$10} NR>1 && $2==p && $3==l{b[$1]=$10} END{for (k in b) if (a[k]>0) printf "%.4f\n", b[k]/a[k]}' "$f" | median)
    rs=$(pick "$f" '$10' "\$2==\"$p\" && \$3==$last"); fs=$(pick "$f" '$10' "\$2==\"$p\" && \$3==1")
    du=$(pick "$f" '$11' "\$2==\"$p\" && \$3==$last")
    echo "| $p (on disk, with manifests: $(mb "$du") MiB) | $(mb "$rs") | $(mb "$fs") | $(printf %.2f "$r") | < 1.6 | $(verdict "$r < 1.6") |"
  done
fi
if [ -f "$c/backup-convert.tsv" ]; then
  f=$c/backup-convert.tsv
  a=$(col "$f" 3 ""); q=$(col "$f" 4 "")
  ar=$(pick "$f" '$5/$3/1e6' 1); qr=$(pick "$f" '$5/$4/1e6' 1)
  echo
  echo "Full backup of the stopped VM against \`qemu-img convert -O qcow2\` of its disk chain to a file in the same filesystem, then \`sync\`; MB/s of the same $(mb "$(col "$f" 5 "")") MiB of data. Medians of $(($(wc -l <"$f") - 1)) pairs, qemu-img just before each full backup:"
  echo
  echo "| measure | Lodge | qemu-img convert + sync | Lodge / qemu-img, speed | target | result |"
  echo "|---|---|---|---|---|---|"
  echo "| time (s) | $a | $q | | | |"
  echo "| throughput (MB/s) | $(printf %.0f "$ar") | $(printf %.0f "$qr") | $(ratio3 "$ar" "$qr") | ≥ 0.70 | $(verdict "$ar >= 0.7 * $qr") |"
fi
if [ -f "$c/backup-guestio.tsv" ]; then
  f=$c/backup-guestio.tsv
  w=$(pick "$f" '$14/$2' 1); a=$(pick "$f" '$14/$3' 1)
  cw=$(pick "$f" '1/$8' 1); ca=$(pick "$f" '1/$9' 1)
  ov=$(awk -F'\t' 'NR>1 && $4<m{m=$4} END{if (m>=1) print "every dd ended before its backup did"; else printf "the shortest overlap was %.0f%% of the dd", m*100}' m=1 "$f")
  echo
  echo "Guest writes during a backup: the running VM's guest writes 200 MiB with \`dd if=/dev/zero of=/dev/vda bs=1M seek=3000 oflag=direct\`, timed in the guest, as soon as a full backup (1 GiB of data) has taken its point, and with no backup, alternated; the same for a shell loop that does no I/O. Medians of $(($(wc -l <"$f") - 1)) runs. The dd started $(col "$f" 6 "") s after the backup did (median) and the backups took $(col "$f" 5 "") s; $ov. The agent refused the exec as \"frozen\" $(awk -F'\t' 'NR>1{n+=$7+$13} END{print n+0}' "$f") times in all (retried)."
  echo
  echo "| measure | during a backup | without | during / without | target | result |"
  echo "|---|---|---|---|---|---|"
  echo "| guest dd write throughput (MiB/s) | $(printf %.0f "$w") | $(printf %.0f "$a") | $(ratio3 "$w" "$a") | ≥ 0.80 | $(verdict "$w >= 0.8 * $a") |"
  echo "| guest dd, pair by pair: median of during / without | | | $(printf %.3f "$(pick "$f" '$3/$2' 1)") | | |"
  echo "| guest CPU loop, no I/O (s) | $(col "$f" 8 "") | $(col "$f" 9 "") | speed $(ratio "$cw" "$ca") | | |"
fi
if [ -f "$c/backup-live.tsv" ]; then
  f=$c/backup-live.tsv
  lf=$(col "$f" 2 ""); vf=$(col "$f" 5 ""); vfs=$(col "$f" 6 "")
  li=$(col "$f" 9 ""); vi=$(col "$f" 12 ""); vis=$(col "$f" 13 "")
  echo
  echo "Live backups against libvirt: the running VM and a libvirt domain on a standalone qcow2 copy of its disk (same guest, data, memory), \`lodge backup create\` against \`virsh backup-begin\` in push mode to a qcow2 file with a checkpoint (the incremental with \`<incremental>\` naming the full's checkpoint), timed from the call to libvirt's job-completed event, and with a \`sync\` of the file. Between full and incremental each guest rewrites the same 52 MiB (the unaligned pattern) with \`dd if=/dev/urandom ... oflag=direct\`. Alternated, medians of $(($(wc -l <"$f") - 1)) runs. Lodge freezes the guest's filesystems for the point and hashes, compresses and deduplicates into its repository; libvirt's backup-begin has no freeze and writes a plain qcow2."
  echo
  echo "| measure | Lodge | libvirt | Lodge / libvirt | target | result |"
  echo "|---|---|---|---|---|---|"
  echo "| full (s) | $lf | $vf | $(ratio "$lf" "$vf") | | |"
  echo "| full, libvirt with a sync of its file (s) | $lf | $vfs | $(ratio "$lf" "$vfs") | | |"
  echo "| incremental (s) | $li | $vi | $(ratio "$li" "$vi") | | |"
  echo "| incremental, libvirt with a sync (s) | $li | $vis | $(ratio "$li" "$vis") | | |"
  echo "| incremental: data read (MiB) | $(mb "$(col "$f" 10 "")") | $(mb "$(col "$f" 14 "")") | $(ratio "$(col "$f" 10 "")" "$(col "$f" 14 "")") | | |"
  echo "| incremental: written to the backup (MiB) | $(mb "$(col "$f" 11 "")") | $(mb "$(col "$f" 15 "")") | $(ratio "$(col "$f" 11 "")" "$(col "$f" 15 "")") | | |"
  echo "| full: written to the backup (MiB) | $(mb "$(col "$f" 4 "")") | $(mb "$(col "$f" 8 "")") | $(ratio "$(col "$f" 4 "")" "$(col "$f" 8 "")") | | |"
  echo "| Lodge live: incremental / full, time | $(ratio3 "$li" "$lf") | | | ≤ 0.20 | $(verdict "$li <= 0.2 * $lf") |"
  echo "| Lodge live: incremental / full, data read | $(ratio3 "$(col "$f" 10 "")" "$(col "$f" 3 "")") | | | ≤ 0.10 | $(verdict "$(col "$f" 10 "") <= 0.1 * $(col "$f" 3 "")") |"
fi
if [ -f "$c/backup-days.tsv" ]; then
  echo
  echo "Chunk size: with 4 MiB chunks the unaligned pattern makes each incremental read and store both chunks a run straddles, twice the data that changed; with 1 MiB chunks both patterns cost what they change, as libvirt's incremental does with its 64 KiB clusters. A 4 MiB write that is not even 1 MiB-aligned touches 5 chunks (1.25× the data)."
  echo
  echo "A full backup does more than a copy: it hashes every byte (BLAKE3) and writes one file per chunk. It reads a stopped VM's qcow2 chain straight from the files (package qcow2) rather than through qemu-nbd over a socket; its workers hash (one chunk per goroutine, internal/chunkhash) and compress while goroutines of their own write the new chunks with O_DIRECT, so the CPUs need not wait on the disk and the one syncfs at commit has little left; chunks that look random (byte entropy above 7.9 bits) are stored as raw zstd blocks. Through qemu-nbd and with all writeback left to the syncfs, the same backup ran at 0.49 of qemu-img's speed; with the direct read alone, about 0.6."
  echo
  echo "During a backup Lodge's hashing and compression run at nice 10, and the daemon lowers its own session's autogroup to nice 10 while the backup reads (package priority): every QEMU is a session of its own, and the kernel weighs sessions as wholes. In an A/B run on this host that took the guest's dd from 0.48 to 0.67 of its speed. The backup also pauses its reads while the guest writes hard (its fleecing files grow 40 MiB/s or more), within a budget: in an A/B run, 6 pairs each, 0.82 of its speed with the pauses and 0.69 without. What is left is copy-before-write itself, each 1 MiB the guest writes first costing QEMU a read and a write of the old data: with no backup reading at all, 13 pairs gave a median of 0.83. Single pairs range widely (0.53-0.96 for one binary in 12 pairs), and so does dd alone (0.42-0.94 s), so five pairs leave this median uncertain. Under TCG the vCPU is a host thread that competes for the two CPUs with QEMU's own copy-before-write and NBD serving; with KVM a guest doing dd mostly waits on I/O. An exec sent while the backup has the filesystems frozen is held until the thaw."
fi
if [ -f "$c/stack.tsv" ]; then
  f=$c/stack.tsv
  a=$(col "$f" 2 ""); b=$(col "$f" 3 ""); w=$(col "$f" 4 ""); o=$(col "$f" 5 "")
  echo
  echo "## Stacks"
  echo
  echo "\`lodge stack up\` against the same VMs created and started by hand, back to back, each waited on until its agent runs a command; every side creates its VMs anew. Medians of $(($(wc -l <"$f") - 1)) runs, alternated."
  echo
  echo "| measure | stack up | by hand | stack / by hand | target | result |"
  echo "|---|---|---|---|---|---|"
  echo "| chain of 3 (b waits for a's agent, c for b's) (s) | $a | $b | $(ratio "$a" "$b") | ≤ 1.05 | $(verdict "$a <= 1.05 * $b") |"
  echo "| 3 independent members against one VM alone (s) | $w | $o | $(ratio "$w" "$o") | close to 1 | |"
  if [ "$(awk -F'\t' 'NR==1{print NF}' "$f")" -ge 6 ]; then
    p=$(col "$f" 6 "")
    echo "| 3 independent members against the same 3 booted by hand at once (s) | $w | $p | $(ratio "$w" "$p") | ≤ 1.05 | $(verdict "$w <= 1.05 * $p") |"
  fi
  echo
  echo "The three independent members boot at once on this machine's two CPUs under TCG, where booting is CPU-bound: three guests share what one had, so their time is not one guest's; the same three VMs created and started by hand all at once take as long, which leaves the rollout's own cost. The rollout itself adds up to its polling interval (250 ms) per wait, and no second round trip to an agent it has just heard from. Single runs of the same side vary by 10 s or more on this shared host, so a chain ratio within 1.1 is within the noise."
fi

#!/usr/bin/env bash
# Turns bench/results/*.tsv into a markdown report on stdout.
source "$(dirname "$0")/lib.sh"
col() { awk -F'\t' -v c="$2" -v op="$3" 'NR>1 && (op=="" || $1==op){print $c}' "$1" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b>0) printf "%.2f", a/b; else print "-" }'; }
accel=$(cat "$RESULTS/accel.txt" 2>/dev/null || echo "?")
echo "# Lodge vs libvirt: measured $(date -u +%Y-%m-%d), $(nproc) CPUs, accelerator ${accel:-?}"
echo
echo "Medians of runs alternated Lodge / libvirt in one session on one machine."
echo "Only the ratios carry over to other machines."
echo
echo "| scenario | Lodge | libvirt | Lodge / libvirt | target |"
echo "|---|---|---|---|---|"
if [ -f "$RESULTS/startup.tsv" ]; then
  a=$(col "$RESULTS/startup.tsv" 2 ""); b=$(col "$RESULTS/startup.tsv" 3 "")
  echo "| start to agent ready (s) | $a | $b | $(ratio "$a" "$b") | ≤ 1.10 |"
  a=$(col "$RESULTS/startup.tsv" 4 ""); b=$(col "$RESULTS/startup.tsv" 5 "")
  echo "| of which the start command itself (s) | $a | $b | $(ratio "$a" "$b") | |"
  a=$(awk -F'\t' 'NR>1{printf "%.3f\n", $2-$4}' "$RESULTS/startup.tsv" | median)
  b=$(awk -F'\t' 'NR>1{printf "%.3f\n", $3-$5}' "$RESULTS/startup.tsv" | median)
  echo "| and the boot after it (s) | $a | $b | $(ratio "$a" "$b") | |"
fi
if [ -f "$RESULTS/overhead.tsv" ]; then
  for op in create show list; do
    a=$(col "$RESULTS/overhead.tsv" 3 "$op")
    b=$(awk -F'\t' -v op="$op" 'NR>1 && $1==op && $4!="-"{print $4}' "$RESULTS/overhead.tsv" | median)
    echo "| CLI $op, 100 VMs defined (ms) | $(awk -v x="$a" 'BEGIN{printf "%.0f", x*1000}') | $(awk -v x="$b" 'BEGIN{printf "%.0f", x*1000}') | $(ratio "$a" "$b") | Lodge < 50 ms |"
  done
  rss=$(awk -F'\t' '$1=="rss_kib"{print $3}' "$RESULTS/overhead.tsv")
  echo "| daemon RSS, 100 VMs defined (MiB) | $(awk -v x="$rss" 'BEGIN{printf "%.1f", x/1024}') | - | - | < 50 MiB |"
fi
echo
echo "Raw runs: bench/results/*.tsv (not committed)."
echo
echo "Most of libvirt's start-to-agent time here is \`virsh start\` itself (about 4 s"
echo "before QEMU runs the guest), again libvirtd waiting in this container; the boot"
echo "after the start command is within 10% on both, as expected of the same"
echo "QEMU, machine and guest."
echo
echo "libvirt's create is virsh define, timed on the first few domains only: on these"
echo "machines libvirtd waits 30-80 s per define with no CPU used (no systemd or D-Bus"
echo "in the container), which says nothing about libvirt itself. Its show and list are"
echo "measured with all domains loaded."

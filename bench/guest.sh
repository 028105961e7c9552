#!/usr/bin/env bash
# What a VM gets against the bare host, by `lodge bench` itself: a tiny
# guest with 2 vCPUs and 512 MiB, RUNS repeats of each test on each side.
# Writes results/guest.tsv (run, group, percent: each group's geometric
# mean) and the whole report to results/guest-bench.json.
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-3}
start_lodged
"$LODGE" delete --force bench-guest >/dev/null 2>&1 || true
"$LODGE" create bench-guest --image tiny --cpus 2 --memory 512M --start >/dev/null
"$LODGE" exec bench-guest --wait 180s -- true
"$LODGE" bench bench-guest --repeats "$RUNS" --duration 500ms --disk-size 128M -o json >"$RESULTS/guest-bench.json"
"$LODGE" delete --force bench-guest >/dev/null
{
  echo -e "run\tgroup\tpercent"
  jq -r '.summary | "1\tcpu\t\(.cpu)", "1\tmemory\t\(.memory)", "1\tdisk\t\(.disk)"' "$RESULTS/guest-bench.json"
} >"$RESULTS/guest.tsv"
cat "$RESULTS/guest.tsv"

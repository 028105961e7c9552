#!/usr/bin/env bash
# make bench: runs every scenario, Lodge and its peer alternated, then
# writes bench/results.md (summary table, details) and bench/charts/.
#
#   bench/run.sh            runs per scenario as below (RUNS=N for all)
#   bench/run.sh --quick    1 run of each, fewer days of backups
#   bench/run.sh --report   only rewrite results.md from bench/results/
#
# Under TCG on 2 CPUs a guest boot takes 15 s and most scenarios boot
# guests, so the runs per scenario are chosen to fit the whole suite in
# about 15 minutes: 3 where a run is cheap, 2 where it boots guests or
# moves a GiB of data, 1 for stacks (ten boots a run).
source "$(dirname "$0")/lib.sh"
trap stop_lodged EXIT
declare -A runs=([startup]=3 [overhead]=1 [clone]=2 [snapshot]=2 [memory]=3 [bundle]=2 [backup]=2 [stack]=1 [guest]=3)
# Ten daily backups, as the backup target is stated; --quick keeps 3.
export DAYS=${DAYS:-10} DATA_MIB=${DATA_MIB:-256} REPS=${REPS:-20}
case "${1:-}" in
  --quick)
    for k in "${!runs[@]}"; do runs[$k]=1; done
    export DAYS=3 REPS=5 ;;
  --report) SCENARIOS=none ;;
  "") ;;
  *) echo "usage: bench/run.sh [--quick|--report]" >&2; exit 2 ;;
esac
SCENARIOS=${SCENARIOS:-startup overhead clone snapshot memory bundle backup stack guest}
timing=$RESULTS/timing.tsv
[ "$SCENARIOS" = none ] || echo -e "scenario\tseconds" >"$timing"
start=$(date +%s)
for s in $SCENARIOS; do
  [ "$s" = none ] && continue
  t=$(date +%s)
  echo "== $s" >&2
  RUNS=${RUNS:-${runs[$s]:-1}} bash "$BENCH_DIR/$s.sh" >"$WORK/$s.log" 2>&1 || { echo "bench: scenario $s failed; its log: $WORK/$s.log" >&2; tail -20 "$WORK/$s.log" >&2; exit 1; }
  echo -e "$s\t$(( $(date +%s) - t ))" | tee -a "$timing" >&2
done
[ "$SCENARIOS" = none ] || echo -e "total\t$(( $(date +%s) - start ))" | tee -a "$timing" >&2
bash "$BENCH_DIR/summarize.sh"
{
  (cd "$ROOT" && go run ./bench/report -results bench/results -charts bench/charts -link charts)
  echo
  echo "Scenario times (s): $(awk -F'\t' 'NR>1{printf "%s%s %s", (n++ ? ", " : ""), $1, $2}' "$timing")."
  bash "$BENCH_DIR/report.sh"
} >"$BENCH_DIR/results.md"
echo "wrote $BENCH_DIR/results.md and $BENCH_DIR/charts/" >&2

#!/usr/bin/env bash
# Runs every scenario and writes bench/results.md with medians and ratios.
source "$(dirname "$0")/lib.sh"
trap stop_lodged EXIT
bash "$BENCH_DIR/startup.sh"
bash "$BENCH_DIR/overhead.sh"
bash "$BENCH_DIR/clone.sh"
bash "$BENCH_DIR/snapshot.sh"
bash "$BENCH_DIR/memory.sh"
bash "$BENCH_DIR/bundle.sh"
bash "$BENCH_DIR/backup.sh"
bash "$BENCH_DIR/stack.sh"
bash "$BENCH_DIR/report.sh" >"$BENCH_DIR/results.md"
cat "$BENCH_DIR/results.md"

#!/usr/bin/env bash
# Stacks: `lodge stack up` of a three-member chain (b waits for a's agent,
# c for b's, and c is ready once a health check of `true` passes through
# its agent) against the same three VMs created and started by hand, back
# to back: start a, wait for its agent, start b, wait, start c, wait. And
# `stack up` of three independent members (each ready when its agent
# answers, through a health check of `true`) against one such VM alone,
# and against the same three booted by hand all at once: on a host whose
# CPUs three booting guests saturate, that tells the rollout's own cost
# from the hardware's.
# Each run creates the VMs anew (`lodge create` is part of both sides) and
# deletes them after; the two sides alternate. Writes results/stack.tsv.
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-3}
start_lodged

D=$WORK/stack
rm -rf "$D"
mkdir -p "$D"
cat >"$D/chain.yaml" <<'YAML'
name: bch
vms:
  a: {image: tiny, memory: 256M}
  b: {image: tiny, memory: 256M, depends_on: {a: agent}}
  c: {image: tiny, memory: 256M, depends_on: {b: agent}, health: {exec: "true"}}
YAML
cat >"$D/wide.yaml" <<'YAML'
name: bwide
vms:
  a: {image: tiny, memory: 256M, health: {exec: "true"}}
  b: {image: tiny, memory: 256M, health: {exec: "true"}}
  c: {image: tiny, memory: 256M, health: {exec: "true"}}
YAML

clean() {
  "$LODGE" stack down bch --delete >/dev/null 2>&1 || true
  "$LODGE" stack down bwide --delete >/dev/null 2>&1 || true
  for vm in bm-a bm-b bm-c bm-one bp-a bp-b bp-c; do "$LODGE" delete --force "$vm" >/dev/null 2>&1 || true; done
}
clean
trap clean EXIT

# boot NAME: create, start and wait until the agent runs a command.
boot() {
  "$LODGE" create "$1" --image tiny --memory 256M >/dev/null
  "$LODGE" start "$1" >/dev/null
  "$LODGE" exec "$1" --wait 180s -- true >/dev/null
}

out=$RESULTS/stack.tsv
echo -e "run\tchain_stack_s\tchain_manual_s\twide_stack_s\tone_vm_s\twide_manual_s" >"$out"
for i in $(seq "$RUNS"); do
  sync; t=$(now); "$LODGE" stack up "$D/chain.yaml" >/dev/null; a=$(elapsed "$t")
  clean
  sync; t=$(now); boot bm-a; boot bm-b; boot bm-c; b=$(elapsed "$t")
  clean
  sync; t=$(now); "$LODGE" stack up "$D/wide.yaml" >/dev/null; c=$(elapsed "$t")
  clean
  sync; t=$(now); boot bm-one; d=$(elapsed "$t")
  clean
  sync; t=$(now); boot bp-a & pa=$!; boot bp-b & pb=$!; boot bp-c & pc=$!
  wait $pa && wait $pb && wait $pc; e=$(elapsed "$t")
  clean
  echo -e "$i\t$a\t$b\t$c\t$d\t$e" | tee -a "$out"
done

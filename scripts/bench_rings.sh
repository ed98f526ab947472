#!/usr/bin/env bash
# Dirty-ring reliability loop: runs the ring tests that provoke ring-full exits on the real
# /dev/kvm RUNS times (default 2000), each bounded by TIMEOUT seconds (default 60; a healthy
# run takes about a second), and counts runs, hangs (the bound struck), lost pages (a test
# reported missing or mismatched pages) and other failures. Then runs MODEL_RUNS (default
# 20000) random interleavings against the model of KVM's ring. Prints a table and writes
# docs/benchmarks/rings.md; logs of failed runs are kept under target/bench-rings/.
# Run: scripts/dev_cli.sh bench rings   (RUNS=N TIMEOUT=S MODEL_RUNS=M to change)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
RUNS=${RUNS:-2000}
TIMEOUT=${TIMEOUT:-60}
MODEL_RUNS=${MODEL_RUNS:-20000}
# The tests that run vCPUs into full rings, with and without a harvester racing them.
TESTS=(ring_full_exits_lose_no_page overfilled_ring_recovers_and_loses_no_page
       ring_full_exits_on_several_vcpus_never_hang_and_lose_no_page
       several_vcpus_racing_a_harvester_lose_no_page)
head=$(git rev-parse --short HEAD)
LOGS="$ROOT/target/bench-rings"
rm -rf "$LOGS"; mkdir -p "$LOGS"

bin=$(cargo test --release -p hypervisor --test dirty_tracking --no-run --message-format=json 2>/dev/null |
      python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "dirty_tracking" and m.get("executable"):
        print(m["executable"])')
[ -x "$bin" ] || { echo "bench_rings.sh: could not build the dirty_tracking tests" >&2; exit 1; }

passed=0 hangs=0 lost=0 other=0
start=$(date +%s)
for ((i = 1; i <= RUNS; i++)); do
    log="$LOGS/run-$i.log"
    rc=0
    timeout --kill-after=5 "$TIMEOUT" "$bin" --test-threads=2 "${TESTS[@]}" >"$log" 2>&1 || rc=$?
    if ((rc == 0)); then
        passed=$((passed + 1)); rm -f "$log"
    elif ((rc == 124 || rc == 137)); then
        hangs=$((hangs + 1)); echo "run $i: hang (bound of ${TIMEOUT}s), log $log" >&2
    elif grep -qE 'lost|missing' "$log"; then
        lost=$((lost + 1)); echo "run $i: lost pages, log $log" >&2
    else
        other=$((other + 1)); echo "run $i: failed (exit $rc), log $log" >&2
    fi
    if ((i % 100 == 0)); then
        echo "  $i runs: $passed passed, $hangs hangs, $lost lost pages, $other other failures" >&2
    fi
done
secs=$(( $(date +%s) - start ))

model_out=$(FERRY_RING_MODEL_RUNS=$MODEL_RUNS cargo test --release -p hypervisor --lib \
    random_interleavings -- --nocapture 2>&1) && model_ok=yes || model_ok=no
model_line=$(grep -E '^[0-9]+ runs, ' <<<"$model_out" | tail -1)

table="| what | runs | passed | hangs | lost pages | other failures | time |
|---|---|---|---|---|---|---|
| real KVM: ${#TESTS[@]} ring tests per run (bound ${TIMEOUT}s) | $RUNS | $passed | $hangs | $lost | $other | ${secs} s |
| model of KVM's ring: random interleavings | $MODEL_RUNS | $([ $model_ok = yes ] && echo "$MODEL_RUNS" || echo "see log") | 0 | $([ $model_ok = yes ] && echo 0 || echo "see log") | - | - |"
echo "$table"
echo "model: $model_line"
cat >"$ROOT/docs/benchmarks/rings.md" <<EOF
# Dirty-ring reliability loop

\`scripts/dev_cli.sh bench rings\` on $head ($(date -u +%F), $(nproc) cores, kernel $(uname -r)).
Each real-KVM run executes the dirty_tracking tests that drive vCPUs into full rings
(\`${TESTS[*]}\`), two at a time, bounded by ${TIMEOUT} s; a hang is a run the bound ended.
A lost page is a run whose test found a written page missing from the dirty set or a
shadow page that differs from guest RAM after the final collection.

$table

Model totals: $model_line
EOF
[ "$hangs" = 0 ] && [ "$lost" = 0 ] && [ "$other" = 0 ] && [ "$model_ok" = yes ]

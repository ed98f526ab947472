#!/usr/bin/env bash
# Profiles one Ferry live migration of the vs-qemu bench's workload b (2 GiB `verify` guest
# over 1 GiB, 2 vCPUs; loopback TCP; downtime 300 ms; migrated 3 s after the guest's first
# progress line) with `perf record -g` on the source and on the destination process, and
# prints each end's hottest symbols outside the vCPU threads (self time).
# Run as root: scripts/profile_migration.sh [OUT_DIR]. Environment: BIN_DIR (default
# $CARGO_TARGET_DIR/release, else target/release), PERF (perf), FREQ (sampling Hz, 999),
# TOP (lines per end, 25), CMDLINE / MEM / CPUS (the guest).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
PERF=${PERF:-perf}
FREQ=${FREQ:-999}
TOP=${TOP:-25}
CMDLINE=${CMDLINE:-workload=verify start=1M size=1G}
MEM=${MEM:-2G}
CPUS=${CPUS:-2}
GUEST=$ROOT/target/test-guest/guest.elf
OUT=${1:-$(mktemp -d /tmp/ferry-profile.XXXXXX)}
mkdir -p "$OUT"
for f in "$BIN_DIR/ferry" "$BIN_DIR/ferry-remote" "$GUEST"; do
    [ -e "$f" ] || { echo "profile_migration.sh: $f missing" >&2; exit 1; }
done
command -v "$PERF" >/dev/null || { echo "profile_migration.sh: no $PERF" >&2; exit 1; }
FERRY=$BIN_DIR/ferry REMOTE=$BIN_DIR/ferry-remote
PORT=$((47000 + RANDOM % 900))

PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

"$FERRY" --api-socket "$OUT/dst.sock" >"$OUT/dst.log" 2>&1 &
DST=$!
PIDS+=("$DST")
"$FERRY" --api-socket "$OUT/src.sock" --kernel "$GUEST" --cmdline "$CMDLINE" \
    --cpus "boot=$CPUS" --memory "size=$MEM" --serial "file=$OUT/serial.log" >"$OUT/src.log" 2>&1 &
SRC=$!
PIDS+=("$SRC")
for _ in $(seq 300); do [ -S "$OUT/src.sock" ] && [ -S "$OUT/dst.sock" ] && break; sleep 0.1; done
"$REMOTE" --api-socket "$OUT/dst.sock" receive-migration "tcp:127.0.0.1:$PORT" >"$OUT/recv.out" 2>&1 &
RECV=$!
PIDS+=("$RECV")
# Every vCPU's first progress line, then 3 s (as the bench).
for _ in $(seq 1800); do
    n=$(grep -aoE 'guest: (verified|pass) [0-9]+' "$OUT/serial.log" 2>/dev/null | awk '{print $3}' | sort -u | wc -l || true)
    [ "$n" -ge "$CPUS" ] && break
    sleep 0.1
done
[ "$n" -ge "$CPUS" ] || { echo "profile_migration.sh: the guest did not start" >&2; exit 1; }
sleep 3
"$PERF" record -q -g -F "$FREQ" -p "$SRC" -o "$OUT/src.perf" >"$OUT/perf-src.out" 2>&1 &
PSRC=$!
"$PERF" record -q -g -F "$FREQ" -p "$DST" -o "$OUT/dst.perf" >"$OUT/perf-dst.out" 2>&1 &
PDST=$!
PIDS+=("$PSRC" "$PDST")
# perf needs a moment to attach to every thread.
sleep 2
"$REMOTE" --api-socket "$OUT/src.sock" send-migration "tcp:127.0.0.1:$PORT" --downtime-ms 300 \
    >"$OUT/send.out" 2>&1
wait "$RECV"
kill -INT "$PSRC" "$PDST"
wait "$PSRC" "$PDST" || true
grep -a 'completed' "$OUT/src.log" | tail -1 | cut -c1-200
for end in src dst; do
    # Thread names as perf recorded them (a thread started after perf attached may show
    # as `:TID`); the vCPU threads run the guest and are left out.
    comms=$("$PERF" report -q -i "$OUT/$end.perf" -g none --sort comm 2>/dev/null |
        awk '{print $NF}' | grep -vE '^vcpu[0-9]+$' | paste -sd, -)
    echo "== $end: samples by thread"
    "$PERF" report -q -i "$OUT/$end.perf" -g none -n --sort comm 2>/dev/null | grep -E '^ +[0-9]'
    echo "== $end: self time outside the vCPU threads, % of those threads' samples"
    "$PERF" report -q -i "$OUT/$end.perf" --no-children -g none --percentage relative \
        --comms "$comms" --sort dso,sym 2>/dev/null | grep -E '^ +[0-9]' | head -n "$TOP"
done
echo "perf data and logs: $OUT"

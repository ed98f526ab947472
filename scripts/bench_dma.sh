#!/usr/bin/env bash
# virtio-blk in the guest (issue: DMA devices): the test guest's `dma-bench` reading a
# page-cached 256 MiB disk file with 4 KiB and 64 KiB requests under Ferry with its dirty
# log on, Ferry with FERRY_BENCH_NO_DEVICE_LOG=1 (log off) and QEMU
# (virtio-blk-pci, cache=writeback, aio=threads), ROUNDS rounds (default 3) alternating;
# then a `dma-verify dma=blk` guest (256 MiB region, 1 GiB, 1 vCPU) live-migrated once by
# Ferry and once by QEMU over loopback TCP. Prints tables and writes
# docs/benchmarks/dma.{md,json}.
# Run: scripts/dev_cli.sh bench dma (/dev/kvm, qemu-system-x86; builds first).
# Environment: ROUNDS (3), SECS (5), SIZES ("4K 64K"), MODES ("ferry-log ferry-nolog
# qemu"), DISK_MIB (256), REGION (64M), MIGRATE (1; 0 skips the migrations), MIG_MODES
# ("qemu-bitmap ferry-lo"; also qemu-ring), MIG_SIZE_MIB (256), OUT (docs/benchmarks),
# QUIET_PCT (10) and RETRIES (2): a run during which the rest of the machine used more
# than QUIET_PCT % of a CPU is run again, RETRIES times at most; KEEP=1 keeps the run
# directory (serial logs, VMM logs); BENCH_MACHINE_NOTE.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
for f in target/release/ferry target/release/ferry-remote target/test-guest/guest.elf; do
    [ -e "$ROOT/$f" ] || { echo "bench_dma.sh: $f missing (scripts/dev_cli.sh build)" >&2; exit 1; }
done
command -v qemu-system-x86_64 >/dev/null ||
    { echo "bench_dma.sh: no qemu-system-x86_64 (apt-get install qemu-system-x86)" >&2; exit 1; }

# The run directory, disk files included, on the local filesystem (not a tmpfs): /var/tmp.
WORK=$(mktemp -d /var/tmp/ferry-dma.XXXXXX)
PY=
cleanup() {
    # The driver ends every process it started (and they die with it in any case).
    if [ -n "$PY" ] && kill -0 "$PY" 2>/dev/null; then
        kill -TERM "$PY" 2>/dev/null || true
        wait "$PY" 2>/dev/null || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then echo "run directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# A copy of the binaries, so that a rebuild during the run cannot mix two versions.
mkdir -p "$WORK/bin"
cp -p "$ROOT/target/release/ferry" "$ROOT/target/release/ferry-remote" "$ROOT/target/test-guest/guest.elf" "$WORK/bin/"
"$WORK/bin/ferry" --version >/dev/null
FERRY="$WORK/bin/ferry" REMOTE="$WORK/bin/ferry-remote" GUEST="$WORK/bin/guest.elf"
export ROOT WORK FERRY REMOTE GUEST
export BENCH_CMD="${BENCH_CMD:-${ROUNDS:+ROUNDS=$ROUNDS }scripts/dev_cli.sh bench dma}"
# In the background so that a signal reaches the trap at once, which then ends the driver.
python3 "$ROOT/scripts/bench_dma.py" &
PY=$!
wait "$PY"

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
# shellcheck source=scripts/bench_lib.sh
. "$ROOT/scripts/bench_lib.sh"
bench_setup bench_dma.sh dma "$ROOT/target/release" "$ROOT/target/test-guest/guest.elf"
FERRY="$WORK/bin/ferry" REMOTE="$WORK/bin/ferry-remote" GUEST="$WORK/bin/guest.elf"
export ROOT WORK FERRY REMOTE GUEST
export BENCH_CMD="${BENCH_CMD:-${ROUNDS:+ROUNDS=$ROUNDS }scripts/dev_cli.sh bench dma}"
# In the background so that a signal reaches the trap at once, which then ends the driver.
python3 "$ROOT/scripts/bench_dma.py" &
PY=$!
wait "$PY"

#!/usr/bin/env bash
# The virtio-iommu benchmark (issue 13): MAP/UNMAP requests per second through the device's
# request handler (devices/benches/viommu_requests.rs); virtio-blk throughput in the guest
# (`dma-bench`, 4 KiB and 64 KiB reads) with the disk behind the vIOMMU (`iommu=on`) and
# not, under Ferry and under QEMU (virtio-iommu-pci), ROUNDS rounds (default 3); then the
# `dma-verify iommu=on remap=on` guest with dma=blk and with dma=rng live-migrated by Ferry
# and by QEMU over loopback TCP, MIG_ROUNDS times each (default 3). Prints the tables and
# writes docs/benchmarks/viommu.{md,json} (scripts/bench_viommu.py).
# Run: scripts/dev_cli.sh bench viommu (/dev/kvm, qemu-system-x86; builds first).
#
# Before measuring it waits, up to QUIET_WAIT_S seconds (900), for the 1-minute load
# average to drop below QUIET_LOAD (0.8), and says in the report whether it did.
# The binaries are taken from ${CARGO_TARGET_DIR:-target}/release and the guest from
# ${FERRY_TEST_GUEST_TARGET:-target}/test-guest/guest.elf (where `dev_cli.sh build` puts
# them), and copied first. Environment as for bench_dma.sh (ROUNDS, SECS, SIZES, DISK_MIB,
# REGION, QUIET_PCT, RETRIES, KEEP, BENCH_MACHINE_NOTE, OUT) plus MODES ("ferry
# ferry-iommu qemu qemu-iommu"), MIGRATE (1), MIG_WORKLOADS ("blk rng"), MIG_ROUNDS (3),
# MIG_SIZE_MIB (256), MICRO (1; 0 skips the micro-benchmark).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
GUEST_ELF="${FERRY_TEST_GUEST_TARGET:-$ROOT/target}/test-guest/guest.elf"
# shellcheck source=scripts/bench_lib.sh
. "$ROOT/scripts/bench_lib.sh"
bench_setup bench_viommu.sh viommu "$BIN_DIR" "$GUEST_ELF"
MICRO_BIN=
if [ "${MICRO:-1}" = 1 ]; then
    echo "building devices/benches/viommu_requests.rs" >&2
    exe=$(cargo bench --no-run -p devices --bench viommu_requests 2>&1 |
        sed -n 's/^ *Executable .*(\(.*viommu_requests-[0-9a-f]*\))$/\1/p' | tail -1)
    [ -x "$exe" ] || { echo "bench_viommu.sh: could not build the micro-benchmark" >&2; exit 1; }
    cp -p "$exe" "$WORK/bin/viommu_requests"
    MICRO_BIN="$WORK/bin/viommu_requests"
fi

wait_for_quiet bench_viommu.sh

FERRY="$WORK/bin/ferry" REMOTE="$WORK/bin/ferry-remote" GUEST="$WORK/bin/guest.elf"
export ROOT WORK FERRY REMOTE GUEST MICRO_BIN QUIET_LOAD QUIET_WAIT_S QUIET_START_LOAD QUIET_WAITED_S
export BENCH_CMD="${BENCH_CMD:-${ROUNDS:+ROUNDS=$ROUNDS }scripts/dev_cli.sh bench viommu}"
# In the background so that a signal reaches the trap at once, which then ends the driver.
python3 "$ROOT/scripts/bench_viommu.py" &
PY=$!
wait "$PY"

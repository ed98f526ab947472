#!/usr/bin/env bash
# The vfio-user benchmark (issue 14): one harvest of a vfio-user device's DMA log against
# the mapped region's size and the fraction written (dma_device/benches/log_harvest.rs);
# then the `dma-verify dma=vfio-user` guest, without and with `iommu=on remap=on`, and the
# same guest with `dma=rng` (virtio-rng, Ferry's own device) as a baseline, live-migrated
# by Ferry between two network-namespace hosts, each with its own ferry-dma-device,
# MIG_ROUNDS times each (default 5). Prints the tables and writes
# docs/benchmarks/vfio-user.{md,json} (scripts/bench_vfio_user.py).
# Run: scripts/dev_cli.sh bench vfio-user (root, /dev/kvm, iproute2; builds first).
#
# Before measuring it waits, up to QUIET_WAIT_S seconds (900), for the 1-minute load
# average to drop below QUIET_LOAD (0.8), and says in the report whether it did.
# The binaries are taken from ${CARGO_TARGET_DIR:-target}/release and the guest from
# ${FERRY_TEST_GUEST_TARGET:-target}/test-guest/guest.elf (where `dev_cli.sh build` puts
# them), and copied first. Environment: MIG_ROUNDS (5; 0 skips the migrations), MIG_MODES
# ("vfio-user vfio-user-iommu rng rng-iommu"), MIG_SIZE (16M), MIG_MEM (512M),
# HARVEST_SIZES (64M,256M,1G,4G), HARVEST_REPS (5), HARVEST (1; 0 skips it), DOWNTIME_MS
# (300), SETTLE_S (3), KEEP=1 (keeps the run directory), BENCH_MACHINE_NOTE, OUT.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
GUEST_ELF="${FERRY_TEST_GUEST_TARGET:-$ROOT/target}/test-guest/guest.elf"
[ "$(id -u)" -eq 0 ] || { echo "bench_vfio_user.sh: needs root (KVM, namespaces)" >&2; exit 1; }
[ -x "$BIN_DIR/ferry-dma-device" ] ||
    { echo "bench_vfio_user.sh: $BIN_DIR/ferry-dma-device missing (scripts/dev_cli.sh build)" >&2; exit 1; }
# shellcheck source=scripts/bench_lib.sh
. "$ROOT/scripts/bench_lib.sh"
bench_setup bench_vfio_user.sh vfio-user "$BIN_DIR" "$GUEST_ELF"
cp -p "$BIN_DIR/ferry-dma-device" "$WORK/bin/"

NS_A=ferry-vfu-a NS_B=ferry-vfu-b VETH_A=ferry-vfu-va VETH_B=ferry-vfu-vb
ADDR_A=198.18.251.1 ADDR_B=198.18.251.2
cleanup() {
    bench_cleanup
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
}
trap cleanup EXIT

HARVEST_BIN=
if [ "${HARVEST:-1}" = 1 ]; then
    echo "building dma_device/benches/log_harvest.rs" >&2
    exe=$(cargo bench --no-run -p dma_device --bench log_harvest 2>&1 |
        sed -n 's/^ *Executable .*(\(.*log_harvest-[0-9a-f]*\))$/\1/p' | tail -1)
    [ -x "$exe" ] || { echo "bench_vfio_user.sh: could not build the harvest benchmark" >&2; exit 1; }
    cp -p "$exe" "$WORK/bin/log_harvest"
    HARVEST_BIN="$WORK/bin/log_harvest"
fi

if [ "${MIG_ROUNDS:-5}" != 0 ]; then
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
    ip netns add "$NS_A"
    ip netns add "$NS_B"
    ip link add "$VETH_A" type veth peer name "$VETH_B"
    ip link set "$VETH_A" netns "$NS_A"
    ip link set "$VETH_B" netns "$NS_B"
    ip -n "$NS_A" addr add "$ADDR_A/30" dev "$VETH_A"
    ip -n "$NS_B" addr add "$ADDR_B/30" dev "$VETH_B"
    for ns in "$NS_A" "$NS_B"; do ip -n "$ns" link set lo up; done
    ip -n "$NS_A" link set "$VETH_A" up
    ip -n "$NS_B" link set "$VETH_B" up
fi

wait_for_quiet bench_vfio_user.sh

FERRY="$WORK/bin/ferry" REMOTE="$WORK/bin/ferry-remote" GUEST="$WORK/bin/guest.elf"
DEVICE="$WORK/bin/ferry-dma-device"
export ROOT WORK FERRY REMOTE GUEST DEVICE HARVEST_BIN NS_A NS_B ADDR_B
export QUIET_LOAD QUIET_WAIT_S QUIET_START_LOAD QUIET_WAITED_S
export BENCH_CMD="${BENCH_CMD:-${MIG_ROUNDS:+MIG_ROUNDS=$MIG_ROUNDS }scripts/dev_cli.sh bench vfio-user}"
# In the background so that a signal reaches the trap at once, which then ends the driver.
python3 "$ROOT/scripts/bench_vfio_user.py" &
PY=$!
wait "$PY"

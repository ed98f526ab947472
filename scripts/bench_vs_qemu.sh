#!/usr/bin/env bash
# Live migration, Ferry side by side with QEMU on the same test guest (issue 6):
#  (a) 150 MiB, `dirty` over 1-100 MiB, 1 vCPU     (b) 2 GiB, `verify` over 1 GiB, 2 vCPUs
#  (c) 4 GiB, `idle`                               (d) 8 GiB, `dirty` over a 64 MiB hot set
# each migrated by QEMU (dirty ring, dirty bitmap; loopback) and Ferry (loopback, and between
# two network namespaces), alternating, PAIRS rounds (default 5), one migration at a time.
# Prints a table and writes docs/benchmarks/vs-qemu.{md,json}.
# Run: scripts/dev_cli.sh bench vs-qemu (root, /dev/kvm, qemu-system-x86, iproute2).
# Environment: PAIRS (5), WORKLOADS ("a b c d"), MODES ("qemu-ring qemu-bitmap ferry-lo
# ferry-netns"; also ferry-lo-fits / ferry-netns-fits with --switch-over Fits, and
# qemu-postcopy / ferry-postcopy, loopback, switching after POSTCOPY_AFTER (2) precopy
# passes), DOWNTIME_MS (300), MIGRATION_TIMEOUT_S (120), BOOT_TIMEOUT_S (180),
# CHECK_TIMEOUT_S (60), OUT (docs/benchmarks), KEEP=1 keeps the run directory (logs, serials),
# BIN_DIR (the ferry binaries; default $CARGO_TARGET_DIR/release, else target/release).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
for f in "$BIN_DIR/ferry" "$BIN_DIR/ferry-remote" "$ROOT/target/test-guest/guest.elf"; do
    [ -e "$f" ] || { echo "bench_vs_qemu.sh: $f missing (scripts/dev_cli.sh build)" >&2; exit 1; }
done
command -v qemu-system-x86_64 >/dev/null ||
    { echo "bench_vs_qemu.sh: no qemu-system-x86_64 (apt-get install qemu-system-x86)" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "bench_vs_qemu.sh: needs root (KVM, namespaces)" >&2; exit 1; }

NS_A=ferry-vsq-a NS_B=ferry-vsq-b VETH_A=ferry-vsq-va VETH_B=ferry-vsq-vb
ADDR_A=198.18.252.1 ADDR_B=198.18.252.2
WORK=$(mktemp -d /tmp/ferry-vsq.XXXXXX)
PY=
cleanup() {
    # The driver kills its own processes (and they die with it in any case).
    if [ -n "$PY" ] && kill -0 "$PY" 2>/dev/null; then
        kill -TERM "$PY" 2>/dev/null || true
        wait "$PY" 2>/dev/null || true
    fi
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "run directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

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

# A copy of the binaries, so that a rebuild during the run cannot mix two versions.
mkdir -p "$WORK/bin"
cp -p "$BIN_DIR/ferry" "$BIN_DIR/ferry-remote" "$ROOT/target/test-guest/guest.elf" "$WORK/bin/"
"$WORK/bin/ferry" --version >/dev/null
FERRY="$WORK/bin/ferry" REMOTE="$WORK/bin/ferry-remote" GUEST="$WORK/bin/guest.elf"
export ROOT WORK NS_A NS_B ADDR_B FERRY REMOTE GUEST
export BENCH_CMD="${BENCH_CMD:-${PAIRS:+PAIRS=$PAIRS }${WORKLOADS:+WORKLOADS=\"$WORKLOADS\" }${MODES:+MODES=\"$MODES\" }${POSTCOPY_AFTER:+POSTCOPY_AFTER=$POSTCOPY_AFTER }scripts/dev_cli.sh bench vs-qemu}"
# In the background so that a signal reaches the trap at once, which then ends the driver.
python3 "$ROOT/scripts/bench_vs_qemu.py" &
PY=$!
wait "$PY"

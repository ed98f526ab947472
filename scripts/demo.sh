#!/usr/bin/env bash
# Ferry's main job on built-in defaults: boot the test guest on host A, live-migrate it
# to host B (two network namespaces joined by a veth pair), and show that the guest's
# own verifier finds every page intact on B.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FERRY="$ROOT/target/release/ferry"
REMOTE="$ROOT/target/release/ferry-remote"
GUEST="$ROOT/target/test-guest/guest.elf"
NS_A=ferry-demo-a NS_B=ferry-demo-b
ADDR_A=198.18.250.1 ADDR_B=198.18.250.2 PORT=7000
WORK=$(mktemp -d /tmp/ferry-demo.XXXXXX)

cleanup() {
    [ -n "${SRC_PID:-}" ] && kill "$SRC_PID" 2>/dev/null || true
    [ -n "${DST_PID:-}" ] && kill "$DST_PID" 2>/dev/null || true
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_for() { # FILE PATTERN SECONDS
    local end=$((SECONDS + $3))
    until grep -q "$2" "$1" 2>/dev/null; do
        if ((SECONDS > end)); then
            echo "ferry demo: no '$2' in $1 after $3 s" >&2
            cat "$1" >&2 || true
            exit 1
        fi
        sleep 0.1
    done
}

echo "ferry demo: two hosts ($NS_A $ADDR_A, $NS_B $ADDR_B) joined by a veth pair"
ip netns del "$NS_A" 2>/dev/null || true
ip netns del "$NS_B" 2>/dev/null || true
ip netns add "$NS_A"
ip netns add "$NS_B"
ip link add ferry-demo-va type veth peer name ferry-demo-vb
ip link set ferry-demo-va netns "$NS_A"
ip link set ferry-demo-vb netns "$NS_B"
ip -n "$NS_A" addr add "$ADDR_A/30" dev ferry-demo-va
ip -n "$NS_B" addr add "$ADDR_B/30" dev ferry-demo-vb
for ns in "$NS_A" "$NS_B"; do ip -n "$ns" link set lo up; done
ip -n "$NS_A" link set ferry-demo-va up
ip -n "$NS_B" link set ferry-demo-vb up

SERIAL="$WORK/serial.log"
ip netns exec "$NS_B" "$FERRY" --api-socket "$WORK/b.sock" 2>"$WORK/b.log" &
DST_PID=$!
CMDLINE="workload=verify start=1M size=256M rate=65536 passes=20"
echo "ferry demo: host A boots the test guest: 2 vCPUs, 512 MiB, '$CMDLINE'"
ip netns exec "$NS_A" "$FERRY" --api-socket "$WORK/a.sock" --kernel "$GUEST" \
    --cmdline "$CMDLINE" --cpus boot=2 --memory size=512M --serial "file=$SERIAL" \
    2>"$WORK/a.log" &
SRC_PID=$!
until [ -S "$WORK/b.sock" ] && [ -S "$WORK/a.sock" ]; do sleep 0.05; done
"$REMOTE" --api-socket "$WORK/b.sock" receive-migration "tcp:0.0.0.0:$PORT" >"$WORK/recv.out" 2>&1 &
RECV_PID=$!
wait_for "$SERIAL" "guest: verified 1 1" 60
echo "ferry demo: guest running on A; migrating A -> B over tcp:$ADDR_B:$PORT"
"$REMOTE" --api-socket "$WORK/a.sock" send-migration "tcp:$ADDR_B:$PORT"
wait "$RECV_PID"
wait "$SRC_PID" || true
SRC_PID=
echo "ferry demo: migration statistics (from B's vm.migration-info):"
"$REMOTE" --api-socket "$WORK/b.sock" migration-info >"$WORK/info.json"
python3 - "$WORK/info.json" <<'PY'
import json, sys
i = json.load(open(sys.argv[1]))
r, d = i["ram"], i.get("dirty-tracking", {})
print("  status %s, total %s ms, downtime %s ms" % (i["status"], i.get("total-time"), i.get("downtime")))
print("  %.0f MiB sent at %.0f Mbit/s in %d passes (%d pages with data, %d zero pages); dirty tracking: %s"
      % (r["transferred"] / 2**20, r["mbps"], r["dirty-sync-count"], r["normal"], r["duplicate"], d.get("mode")))
PY
echo "ferry demo: guest now runs on B; waiting for it to finish its passes"
wait_for "$SERIAL" "guest: PASS\|guest: FAIL" 120
set +e
wait "$DST_PID"
status=$?
set -e
DST_PID=
if grep -q MISMATCH "$SERIAL" || [ "$status" -ne 0 ]; then
    grep "MISMATCH\|FAIL" "$SERIAL" || true
    echo "ferry demo: FAIL (guest status $status)"
    exit 1
fi
echo "ferry demo: PASS: the guest verified every page on B after the migration (status 0)"

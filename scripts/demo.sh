#!/usr/bin/env bash
# Ferry's main job on built-in defaults: boot the test guest under ferry and show that
# it runs its self-checking workload to the end.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FERRY="$ROOT/target/release/ferry"
GUEST="$ROOT/target/test-guest/guest.elf"

echo "ferry demo: test guest, 2 vCPUs, 512 MiB, 'verify' over 64 MiB, 3 passes"
start=$(date +%s%N)
set +e
"$FERRY" --kernel "$GUEST" --cpus boot=2 --memory size=512M --serial tty \
    --cmdline "workload=verify start=1M size=64M passes=3"
status=$?
set -e
end=$(date +%s%N)
printf 'ferry demo: guest exited with status %d after %d ms: %s\n' "$status" \
    $(((end - start) / 1000000)) "$([ "$status" -eq 0 ] && echo PASS || echo FAIL)"
exit "$status"

#!/usr/bin/env bash
# scripts/dev_cli.sh soak N: the verify guest ping-pongs between two namespace hosts N
# times (vmm/tests/soak.rs); prints runs, failures and lost pages, and writes the table
# to docs/benchmarks/soak.md.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
RUNS=${1:-100}
case "$RUNS" in
    '' | *[!0-9]*) echo "soak: N must be a number of runs, not '$RUNS'" >&2; exit 2 ;;
esac
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
started=$(date -u +%FT%TZ)
status=0
FERRY_SOAK_RUNS=$RUNS cargo test -q --release -p vmm --test soak -- --ignored --nocapture \
    | tee "$OUT" || status=$?
mkdir -p docs/benchmarks
{
    echo "# Soak: the verify guest ping-ponged between two hosts"
    echo
    echo "\`scripts/dev_cli.sh soak $RUNS\`, started $started on $(nproc) cores"
    echo "($(uname -r)). Each run is one live migration over TCP between two network"
    echo "namespaces (a fresh receiving ferry each time; 2 vCPUs, 256 MiB, the guest"
    echo "rewriting and checking a 64 MiB region on both vCPUs without pause). A lost page is"
    echo "a MISMATCH the guest reports on the next host, which checks every page at least once"
    echo "after each hop; the guest stops at its first, so 'pages lost' counts the runs that"
    echo "lost any (a fresh guest takes over). The machine's load during the run: $(cut -d' ' -f1-3 /proc/loadavg) at the end."
    echo
    grep -E '^\|' "$OUT" || echo "(no table: the run did not finish, status $status)"
    grep -E '^- run ' "$OUT" || true
} > docs/benchmarks/soak.md
echo "soak: table written to docs/benchmarks/soak.md (status $status)"
exit "$status"

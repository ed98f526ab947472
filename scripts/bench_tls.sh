#!/usr/bin/env bash
# Migration over TLS against plain TCP: the same `verify` guest (2 vCPUs, 2 GiB, verify over
# 1 GiB) migrated between two network-namespace hosts, without and with tls_dir, over 1 and
# 2 connections, RUNS times each (default 1). Prints a table (total ms, MiB sent, MiB/s,
# TLS/plain ratio) and writes docs/benchmarks/tls.md. Run: scripts/dev_cli.sh bench tls
# Needs root (namespaces, KVM), openssl, and the release binaries and test guest
# (scripts/dev_cli.sh build).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_DIR=${BIN_DIR:-$ROOT/target/release}
GUEST=${GUEST:-$ROOT/target/test-guest/guest.elf}
RUNS=${RUNS:-1}
OUT=${OUT:-$ROOT/docs/benchmarks/tls.md}
NS_A=ferry-tlsb-a NS_B=ferry-tlsb-b ADDR_A=198.18.252.1 ADDR_B=198.18.252.2 PORT=7000

# shellcheck source=scripts/bench_lib.sh
. "$ROOT/scripts/bench_lib.sh"
command -v openssl >/dev/null || { echo "bench_tls.sh: no openssl (apt-get install openssl)" >&2; exit 1; }
bench_hosts_setup bench_tls.sh tls "$BIN_DIR" "$GUEST" "$NS_A" "$NS_B"
bench_two_hosts ferry-tlsb "$ADDR_A" "$ADDR_B"

# The credentials, as the README shows: a CA, the receiver's certificate for ADDR_B, the
# sender's client certificate.
PKI=$WORK/pki; mkdir -p "$PKI/ca" "$PKI/recv" "$PKI/send"
(
    cd "$PKI/ca"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=Ferry bench CA" -keyout ca-key.pem -out ca-cert.pem
    for side in server client; do
        dir=$PKI/send; [ $side = server ] && dir=$PKI/recv
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -subj "/CN=ferry $side" -keyout "$dir/$side-key.pem" -out "$side.csr"
        if [ $side = server ]; then
            printf 'subjectAltName=IP:%s\nextendedKeyUsage=serverAuth\n' "$ADDR_B" >"$side.ext"
        else
            printf 'extendedKeyUsage=clientAuth\n' >"$side.ext"
        fi
        openssl x509 -req -in "$side.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
            -days 2 -extfile "$side.ext" -out "$dir/$side-cert.pem"
        chmod 600 "$dir/$side-key.pem"
        cp ca-cert.pem "$dir/"
    done
) >"$WORK/openssl.log" 2>&1 || { cat "$WORK/openssl.log" >&2; exit 1; }

wait_for() { local end=$((SECONDS + $3)); until grep -q "$2" "$1" 2>/dev/null; do
    ((SECONDS > end)) && { echo "bench_tls.sh: no '$2' in $1" >&2; exit 1; }; sleep 0.05; done; }

# one_run MODE(plain|tls) CONNECTIONS RUN
one_run() {
    local mode=$1 conns=$2 run=$3
    local d="$WORK/$mode-$conns-$run"; mkdir -p "$d"
    local recv_tls=() send_tls=()
    if [ "$mode" = tls ]; then
        recv_tls=(--tls-dir "$PKI/recv"); send_tls=(--tls-dir "$PKI/send")
    fi
    ip netns exec "$NS_B" "$FERRY" --api-socket "$d/b.sock" 2>"$d/b.log" &
    local dst=$!
    ip netns exec "$NS_A" "$FERRY" --api-socket "$d/a.sock" --kernel "$ELF" \
        --cmdline "workload=verify start=1M size=1G" --cpus boot=2 --memory size=2G \
        --serial "file=$d/serial.log" 2>"$d/a.log" &
    local src=$!
    local end=$((SECONDS + 30))
    until [ -S "$d/b.sock" ] && [ -S "$d/a.sock" ]; do
        ((SECONDS > end)) && { echo "bench_tls.sh: no API socket" >&2; exit 1; }; sleep 0.05; done
    "$REMOTE" --api-socket "$d/b.sock" receive-migration "tcp:0.0.0.0:$PORT" "${recv_tls[@]}" \
        >"$d/recv.out" 2>&1 &
    local recv=$!
    wait_for "$d/serial.log" "guest: verified 1 1" 180
    # Past the 2 s after which this host's kernel hands freed memory back (as
    # bench_migration.sh does): every run's destination starts from such memory.
    sleep 3
    timeout 600 "$REMOTE" --api-socket "$d/a.sock" send-migration "tcp:$ADDR_B:$PORT" \
        --downtime-ms 300 --connections "$conns" "${send_tls[@]}" >"$d/send.out" 2>&1 ||
        { echo "bench_tls.sh: $mode x$conns: send-migration failed:" >&2; cat "$d/send.out" "$d/a.log" >&2; exit 1; }
    wait "$recv" || { echo "bench_tls.sh: receive-migration failed:" >&2; cat "$d/recv.out" >&2; exit 1; }
    timeout 30 tail --pid="$src" -f /dev/null || true
    "$REMOTE" --api-socket "$d/b.sock" migration-info >"$d/info.json"
    # The guest goes on on B with nothing lost.
    local n; n=$(wc -c <"$d/serial.log")
    end=$((SECONDS + 60))
    until [ "$(tail -c +"$((n + 1))" "$d/serial.log" | grep -c 'guest: verified')" -gt 0 ]; do
        ((SECONDS > end)) && { echo "bench_tls.sh: the guest did not go on on B" >&2; exit 1; }; sleep 0.1; done
    if grep -q "MISMATCH\|FAIL" "$d/serial.log"; then echo "bench_tls.sh: the guest reported loss" >&2; exit 1; fi
    python3 -c 'import json, sys
i = json.load(open(sys.argv[4]))
print(json.dumps({"mode": sys.argv[1], "connections": int(sys.argv[2]), "run": int(sys.argv[3]),
    "total_ms": i["total-time"], "downtime_ms": i["downtime"], "bytes": i["ram"]["transferred"]}))' \
        "$mode" "$conns" "$run" "$d/info.json" >>"$WORK/runs.jsonl"
    kill "$dst" 2>/dev/null || true; wait "$dst" 2>/dev/null || true
    wait "$src" 2>/dev/null || true
    echo "  $mode, $conns connection(s), run $run done" >&2
}

LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
for run in $(seq 1 "$RUNS"); do
    for conns in 1 2; do
        one_run plain "$conns" "$run"
        one_run tls "$conns" "$run"
    done
done

python3 - "$WORK/runs.jsonl" "$OUT" "$RUNS" "$LOAD_BEFORE" "$(nproc)" <<'PY'
import json, statistics, sys, datetime
runs = [json.loads(l) for l in open(sys.argv[1])]
out, nruns, load, cpus = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
def med(mode, conns, key):
    return statistics.median(r[key] for r in runs if r["mode"] == mode and r["connections"] == conns)
rows = []
for conns in (1, 2):
    plain_rate = None
    for mode in ("plain", "tls"):
        ms, b, down = med(mode, conns, "total_ms"), med(mode, conns, "bytes"), med(mode, conns, "downtime_ms")
        mib = b / (1 << 20)
        rate = mib / (ms / 1000) if ms else 0.0
        if mode == "plain":
            plain_rate = rate
        ratio = rate / plain_rate if plain_rate else 0.0
        rows.append((mode, conns, ms, down, mib, rate, ratio))
head = "| transport | connections | total ms | downtime ms | MiB sent | MiB/s | MiB/s vs plain |"
sep = "|---|---:|---:|---:|---:|---:|---:|"
lines = [head, sep] + [
    f"| {m} | {c} | {ms:.0f} | {d:.0f} | {mib:.0f} | {r:.0f} | {q:.2f} |"
    for (m, c, ms, d, mib, r, q) in rows]
table = "\n".join(lines)
print(table)
with open(out, "w") as f:
    f.write(f"""# Migration over TLS against plain TCP

`scripts/dev_cli.sh bench tls` (scripts/bench_tls.sh): the `verify` guest (2 vCPUs,
2 GiB of RAM, `workload=verify start=1M size=1G`) migrated between two network-namespace
hosts joined by a veth pair, `downtime_ms` 300, without and with `tls_dir` (TLS 1.3,
rustls with the ring provider, ECDSA P-256 certificates, mutual authentication), over 1
and 2 connections; {nruns} run(s) each ({"the median shown" if int(nruns) > 1 else "one run: its own figures, no median"}). MiB/s is the data sent (after
zero-page elision) over the total time; the ratio is TLS's rate over plain TCP's at the
same connection count.

{table}

Measured {datetime.date.today().isoformat()} on this project's machine ({cpus} cores, a
nested PVM-based KVM; 1-minute load average {load} at the start). Both ends run on the
same two cores, so TLS's encryption on the source and decryption on the destination
compete with each other and with the guest's vCPUs.
""")
print(f"wrote {out}", file=sys.stderr)
PY

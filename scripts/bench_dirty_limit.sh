#!/usr/bin/env bash
# A guest that dirties memory faster than the migration link carries it, migrated between
# two network-namespace hosts over a rate-limited veth (tc tbf, LINK_MBIT, default 200
# Mbit/s), three ways: without auto-converge (it does not converge: cancelled at
# TIMEOUT_S), with auto-converge (the whole VM throttled), and without auto-converge but
# with QMP's set-vcpu-dirty-limit on each vCPU (LIMIT_MIB MiB/s, default 4). The guest:
# `workload=verify start=1M size=128M`, 2 vCPUs, flat out (full pages of its pattern, which
# nothing on the way compresses; it also reports any page lost). Its dirty rate is measured with
# QMP's calc-dirty-rate before each migration. Prints a table and writes
# docs/benchmarks/dirty-limit.md. Run: scripts/dev_cli.sh bench dirty-limit
# Needs root (namespaces, tc, KVM), python3, and the release binaries and test guest
# (scripts/dev_cli.sh build).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_DIR=${BIN_DIR:-$ROOT/target/release}
GUEST=${GUEST:-$ROOT/target/test-guest/guest.elf}
OUT=${OUT:-$ROOT/docs/benchmarks/dirty-limit.md}
LINK_MBIT=${LINK_MBIT:-200}
LIMIT_MIB=${LIMIT_MIB:-4}
TIMEOUT_S=${TIMEOUT_S:-45}
NS_A=ferry-dlb-a NS_B=ferry-dlb-b ADDR_A=198.18.249.1 ADDR_B=198.18.249.2 PORT=7000

# shellcheck source=scripts/bench_lib.sh
. "$ROOT/scripts/bench_lib.sh"
command -v tc >/dev/null || { echo "bench_dirty_limit.sh: no tc (apt-get install iproute2)" >&2; exit 1; }
bench_hosts_setup bench_dirty_limit.sh dirty-limit "$BIN_DIR" "$GUEST" "$NS_A" "$NS_B"
bench_two_hosts ferry-dlb "$ADDR_A" "$ADDR_B"
# The link: pages leave A at LINK_MBIT.
ip netns exec "$NS_A" tc qdisc add dev ferry-dlb-va root tbf rate "${LINK_MBIT}mbit" \
    burst 256kb latency 100ms

# qmp SOCKET COMMAND [JSON-ARGS]: runs one QMP command, prints its answer's JSON.
qmp() {
    python3 - "$@" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("r")
f.readline()
def run(name, args):
    s.sendall((json.dumps({"execute": name, "arguments": args}) + "\n").encode())
    while True:
        v = json.loads(f.readline())
        if "event" not in v:
            return v
run("qmp_capabilities", {})
a = run(sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
if "error" in a:
    sys.exit("QMP %s: %s" % (sys.argv[2], a["error"]["desc"]))
print(json.dumps(a["return"]))
PY
}

# dirty_rate SOCKET: calc-dirty-rate over 1 s, prints query-dirty-rate's answer.
dirty_rate() {
    qmp "$1" calc-dirty-rate '{"calc-time": 1, "mode": "dirty-ring"}' >/dev/null
    local i r
    for i in $(seq 1 100); do
        r=$(qmp "$1" query-dirty-rate)
        case $r in *'"measured"'*) echo "$r"; return;; esac
        sleep 0.1
    done
    echo "bench_dirty_limit.sh: no dirty rate after 10 s" >&2; exit 1
}

wait_for() { local end=$((SECONDS + $3)); until grep -q "$2" "$1" 2>/dev/null; do
    ((SECONDS > end)) && { echo "bench_dirty_limit.sh: no '$2' in $1" >&2; exit 1; }; sleep 0.05; done; }

# one_run MODE: none (no auto-converge), auto (auto-converge), limit (dirty limit, no
# auto-converge)
one_run() {
    local mode=$1
    local d="$WORK/$mode"; mkdir -p "$d"
    ip netns exec "$NS_B" "$FERRY" --api-socket "$d/b.sock" 2>"$d/b.log" &
    local dst=$!
    ip netns exec "$NS_A" "$FERRY" --api-socket "$d/a.sock" --qmp "unix:$d/a.qmp" \
        --kernel "$ELF" --cmdline "workload=verify start=1M size=128M" --cpus boot=2 \
        --memory size=512M --serial "file=$d/serial.log" 2>"$d/a.log" &
    local src=$!
    local end=$((SECONDS + 30))
    until [ -S "$d/b.sock" ] && [ -S "$d/a.sock" ] && [ -S "$d/a.qmp" ]; do
        ((SECONDS > end)) && { echo "bench_dirty_limit.sh: no API socket" >&2; exit 1; }; sleep 0.05; done
    "$REMOTE" --api-socket "$d/b.sock" receive-migration "tcp:0.0.0.0:$PORT" >"$d/recv.out" 2>&1 &
    local recv=$!
    wait_for "$d/serial.log" "guest: verified 1 1" 120
    local free limited=null
    free=$(dirty_rate "$d/a.qmp")
    local send_args=(--downtime-ms 300 --timeout-s "$TIMEOUT_S" --timeout-strategy Cancel)
    [ "$mode" = auto ] || send_args+=(--no-auto-converge)
    if [ "$mode" = limit ]; then
        qmp "$d/a.qmp" set-vcpu-dirty-limit "{\"dirty-rate\": $LIMIT_MIB}" >/dev/null
        sleep 0.5
        limited=$(dirty_rate "$d/a.qmp")
    fi
    local ok=1
    timeout $((TIMEOUT_S + 120)) "$REMOTE" --api-socket "$d/a.sock" send-migration \
        "tcp:$ADDR_B:$PORT" "${send_args[@]}" >"$d/send.out" 2>&1 || ok=0
    if [ $ok = 1 ]; then
        wait "$recv" || { echo "bench_dirty_limit.sh: receive-migration failed:" >&2; cat "$d/recv.out" >&2; exit 1; }
        timeout 30 tail --pid="$src" -f /dev/null || true
        "$REMOTE" --api-socket "$d/b.sock" migration-info >"$d/info.json"
        # The guest goes on at B with nothing lost.
        local n; n=$(wc -c <"$d/serial.log")
        end=$((SECONDS + 60))
        until [ "$(tail -c +"$((n + 1))" "$d/serial.log" | grep -c 'guest: verified')" -gt 1 ]; do
            ((SECONDS > end)) && { echo "bench_dirty_limit.sh: the guest did not go on on B" >&2; exit 1; }; sleep 0.1; done
    else
        # Not converged: the source still runs its guest and knows how far it got.
        "$REMOTE" --api-socket "$d/a.sock" migration-info >"$d/info.json"
        kill "$src" 2>/dev/null || true
        kill "$recv" 2>/dev/null || true; wait "$recv" 2>/dev/null || true
    fi
    python3 -c 'import json, sys
i = json.load(open(sys.argv[3]))
free, lim = json.loads(sys.argv[4]), json.loads(sys.argv[5])
ram = i.get("ram", {})
print(json.dumps({"mode": sys.argv[1], "converged": sys.argv[2] == "1",
    "status": i.get("status"), "total_ms": i.get("total-time"), "downtime_ms": i.get("downtime"),
    "bytes": ram.get("transferred"), "passes": ram.get("dirty-sync-count"),
    "remaining": ram.get("remaining"), "throttle": i.get("cpu-throttle-percentage"),
    "free_rate": free.get("dirty-rate"), "limited_rate": lim and lim.get("dirty-rate"),
    "limited_vcpus": lim and [v["dirty-rate"] for v in lim["vcpu-dirty-rate"]]}))' \
        "$mode" "$ok" "$d/info.json" "$free" "$limited" >>"$WORK/runs.jsonl"
    if grep -q "MISMATCH\|FAIL" "$d/serial.log"; then echo "bench_dirty_limit.sh: the guest reported loss" >&2; exit 1; fi
    kill "$dst" 2>/dev/null || true; wait "$dst" 2>/dev/null || true
    wait "$src" 2>/dev/null || true
    echo "  $mode done (converged: $ok)" >&2
}

LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
for mode in none auto limit; do
    one_run "$mode"
done
LOAD_AFTER=$(cut -d' ' -f1 /proc/loadavg)

python3 - "$WORK/runs.jsonl" "$OUT" "$LOAD_BEFORE" "$LOAD_AFTER" "$(nproc)" "$LINK_MBIT" \
    "$LIMIT_MIB" "$TIMEOUT_S" <<'PY'
import json, sys, datetime
runs = [json.loads(l) for l in open(sys.argv[1])]
out, load0, load1, cpus, link, limit, timeout = sys.argv[2:9]
names = {"none": "no auto-converge, no limit", "auto": "auto-converge",
         "limit": f"dirty limit {limit} MiB/s per vCPU, no auto-converge"}
def n(v, f="{:.0f}"):
    return "-" if v is None else f.format(v)
head = ("| migration | converged | guest dirty MiB/s (before) | guest dirty MiB/s (limited) "
        "| total s | downtime ms | MiB sent | dirty syncs | MiB left | auto-converge throttle % |")
sep = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
rows = []
for r in runs:
    lim = "-" if r["limited_rate"] is None else f'{r["limited_rate"]} ({" + ".join(map(str, r["limited_vcpus"]))})'
    rows.append(
        f'| {names[r["mode"]]} | {"yes" if r["converged"] else "no (" + str(r["status"]) + ")"} '
        f'| {n(r["free_rate"])} | {lim} | {n(r["total_ms"] and r["total_ms"] / 1000, "{:.1f}")} '
        f'| {n(r["downtime_ms"] if r["converged"] else None)} | {n(r["bytes"] and r["bytes"] / 2**20)} '
        f'| {n(r["passes"])} | {n(None if r["converged"] else r["remaining"] and r["remaining"] / 2**20)} '
        f'| {n(r["throttle"])} |')
table = "\n".join([head, sep] + rows)
print(table)
with open(out, "w") as f:
    f.write(f"""# A guest faster than the link: not converging, auto-converge, the dirty limit

`scripts/dev_cli.sh bench dirty-limit` (scripts/bench_dirty_limit.sh): the `verify` guest
(2 vCPUs, 512 MiB of RAM, `workload=verify start=1M size=128M`, each vCPU checking and
rewriting every page of its 64 MiB share with a new pattern, flat out: full pages that do
not compress, and a lost one would be reported) migrated between two network-namespace
hosts over a veth limited to {link} Mbit/s ({int(link) / 8 * 1e6 / 2**20:.1f} MiB/s; tc tbf on the
source's side), `downtime_ms` 300, `timeout_s` {timeout} with `Cancel`. Three migrations:

* without auto-converge and without a limit;
* with auto-converge (Ferry's default: the whole VM is throttled, every vCPU alike);
* without auto-converge, after QMP `set-vcpu-dirty-limit` with `dirty-rate` {limit} (MiB/s,
  each vCPU).

The guest's dirty rate is QMP's `calc-dirty-rate` (`dirty-ring` mode, 1 s) before the
migration, and for the limited run again once the limit is set (in all, then per vCPU).
A page counts once per ring harvest, so a guest rewriting a small share reads at most its
share per harvest interval. "MiB left" is what was still dirty when a migration that did
not converge was cancelled. Each migration that completed was checked on the destination:
the guest went on, nothing lost. One run each.

{table}

Measured {datetime.date.today().isoformat()} on this project's machine ({cpus} cores, a
nested KVM; 1-minute load average {load0} at the start, {load1} at the end; a load
above 1 means something else shared the 2 cores). The guest's own rate depends on the CPU
it gets, the limit does not.
""")
print(f"wrote {out}", file=sys.stderr)
PY

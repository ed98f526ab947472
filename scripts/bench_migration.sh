#!/usr/bin/env bash
# Migration benchmark: total time, downtime, bytes and throughput for
#  (a) 150 MiB guest, `dirty` over 1-100 MiB, 1 vCPU (QEMU's own test workload)
#  (b) 4 GiB guest, `verify` over 1 GiB, 2 vCPUs
# over TCP between two network-namespace hosts, RUNS times each (default 3). Prints a table
# and writes docs/benchmarks/migration.{md,json}. Run: scripts/dev_cli.sh bench migration
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FERRY="$ROOT/target/release/ferry"
REMOTE="$ROOT/target/release/ferry-remote"
GUEST="$ROOT/target/test-guest/guest.elf"
RUNS=${RUNS:-3}
NS_A=ferry-bench-a NS_B=ferry-bench-b ADDR_B=198.18.251.2 PORT=7000
WORK=$(mktemp -d /tmp/ferry-bench.XXXXXX)
cleanup() {
    pkill -f "$WORK" 2>/dev/null || true
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
ip netns del "$NS_A" 2>/dev/null || true
ip netns del "$NS_B" 2>/dev/null || true
ip netns add "$NS_A"; ip netns add "$NS_B"
ip link add ferry-bench-va type veth peer name ferry-bench-vb
ip link set ferry-bench-va netns "$NS_A"; ip link set ferry-bench-vb netns "$NS_B"
ip -n "$NS_A" addr add 198.18.251.1/30 dev ferry-bench-va
ip -n "$NS_B" addr add "$ADDR_B/30" dev ferry-bench-vb
for ns in "$NS_A" "$NS_B"; do ip -n "$ns" link set lo up; done
ip -n "$NS_A" link set ferry-bench-va up; ip -n "$NS_B" link set ferry-bench-vb up

wait_for() { local end=$((SECONDS + $3)); until grep -q "$2" "$1" 2>/dev/null; do
    ((SECONDS > end)) && { echo "no '$2' in $1" >&2; exit 1; }; sleep 0.05; done; }

# one_run NAME MEMORY CPUS CMDLINE FIRST_LINE
one_run() {
    local name=$1 mem=$2 cpus=$3 cmdline=$4 first=$5 run=$6
    local d="$WORK/$name-$run"; mkdir -p "$d"
    ip netns exec "$NS_B" "$FERRY" --api-socket "$d/b.sock" 2>"$d/b.log" &
    local dst=$!
    ip netns exec "$NS_A" "$FERRY" --api-socket "$d/a.sock" --kernel "$GUEST" --cmdline "$cmdline" \
        --cpus "boot=$cpus" --memory "size=$mem" --serial "file=$d/serial.log" 2>"$d/a.log" &
    local src=$!
    until [ -S "$d/b.sock" ] && [ -S "$d/a.sock" ]; do sleep 0.05; done
    "$REMOTE" --api-socket "$d/b.sock" receive-migration "tcp:0.0.0.0:$PORT" >"$d/recv.out" 2>&1 &
    local recv=$!
    wait_for "$d/serial.log" "$first" 120
    # Past the 2 s after which this host's kernel hands freed memory back to the outer
    # hypervisor (free page reporting): every run's destination starts from such memory.
    sleep 3
    "$REMOTE" --api-socket "$d/a.sock" send-migration "tcp:$ADDR_B:$PORT" --downtime-ms 300 >/dev/null
    wait "$recv"; wait "$src" || true
    "$REMOTE" --api-socket "$d/b.sock" migration-info >"$d/info.json"
    # The guest must go on on B, with nothing lost.
    local n; n=$(wc -c <"$d/serial.log")
    local end=$((SECONDS + 30))
    until [ "$(tail -c +"$((n + 1))" "$d/serial.log" | grep -c 'guest: ')" -gt 0 ]; do
        ((SECONDS > end)) && { echo "$name: the guest did not go on on B" >&2; exit 1; }; sleep 0.1; done
    if grep -q "MISMATCH\|FAIL" "$d/serial.log"; then echo "$name: guest reported loss" >&2; exit 1; fi
    local rss; rss=$(awk '/VmHWM/{print $2}' /proc/"$dst"/status 2>/dev/null || echo 0)
    # The guest's pause on one clock: the source's log line just before it pauses the vCPUs
    # to the destination's just after it resumed them (microsecond timestamps).
    python3 -c 'import json, sys, re, datetime
def at(path, needle):
    for line in open(path, errors="replace"):
        m = re.match(r"\[(\S+?)Z ", line)
        if needle in line and m:
            return datetime.datetime.fromisoformat(m.group(1)).timestamp()
p, r = at(sys.argv[5], "stop-and-copy: pausing the VM"), at(sys.argv[6], "after Complete")
print(json.dumps({"workload": sys.argv[1], "run": int(sys.argv[2]),
    "dest_peak_rss_kib": int(sys.argv[3]), "info": json.load(open(sys.argv[4])),
    "pause_resume_ms": round((r - p) * 1000, 1) if p and r else None}))' \
        "$name" "$run" "$rss" "$d/info.json" "$d/a.log" "$d/b.log" >>"$WORK/runs.jsonl"
    kill "$dst" 2>/dev/null || true; wait "$dst" 2>/dev/null || true
    echo "  $name run $run done" >&2
}

for run in $(seq 1 "$RUNS"); do
    one_run "a-150M-dirty-1-100M" 150M 1 "workload=dirty start=1M size=99M" "guest: pass 0" "$run"
    one_run "b-4G-verify-1G" 4G 2 "workload=verify start=1M size=1G" "guest: verified 1 1" "$run"
done

python3 - "$WORK/runs.jsonl" "$ROOT/docs/benchmarks" <<'PY'
import json, os, statistics, sys, datetime, platform
runs = [json.loads(l) for l in open(sys.argv[1])]
out = sys.argv[2]; os.makedirs(out, exist_ok=True)
rows = []
for w in sorted({r["workload"] for r in runs}):
    rs = [r for r in runs if r["workload"] == w]
    def fig(f, whole=False):
        v = [f(r if whole else r["info"]) for r in rs]
        v = [x for x in v if x is not None] or [float("nan")]
        return statistics.median(v), min(v), max(v)
    # Page data (pages that were not zero, 4 KiB each) moved per second over all passes,
    # each pass ending when the destination held it, and wire bits per second over the
    # whole migration.
    data = lambda i: i["ram"]["normal-bytes"] * 8 / max(sum(p["duration-ms"] for p in i["iterations"]), 1) / 1e6
    wire = lambda i: i["ram"]["transferred"] * 8 / max(i["total-time"], 1) / 1e3
    rows.append((w, len(rs), fig(lambda i: i["total-time"]), fig(lambda i: i["downtime"]),
                 fig(lambda r: r["pause_resume_ms"], whole=True),
                 fig(lambda i: i["ram"]["transferred"] / 2**20), fig(data), fig(wire),
                 fig(lambda i: i["ram"]["dirty-sync-count"]),
                 fig(lambda i: i.get("cpu-throttle-percentage", 0))))
def f3(t, p=0): return f"{t[0]:.{p}f} ({t[1]:.{p}f}-{t[2]:.{p}f})"
head = ("| workload | runs | total ms | downtime ms | pause→resume ms | MiB sent | page data Gbit/s | wire Mbit/s | passes | throttle % |\n"
        "|---|---|---|---|---|---|---|---|---|---|")
lines = [f"| {w} | {n} | {f3(t)} | {f3(d)} | {f3(pr, 1)} | {f3(b)} | {f3(g, 1)} | {f3(m)} | {f3(p)} | {f3(th)} |"
         for w, n, t, d, pr, b, g, m, p, th in rows]
print(head); print("\n".join(lines))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
date = datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC")
md = f"""# Live migration benchmark

Measured {date} on {cpu}, {os.cpu_count()} cores, nested PVM KVM. Command:
`scripts/dev_cli.sh bench migration` (RUNS={len(runs)//max(1,len(rows))}). TCP between two network
namespaces over a veth pair, `downtime_ms` 300, one connection, dirty rings (65536 entries),
sparse chunks and auto-converge on (the defaults).
Each figure: median (min-max). After every run the guest must go on on the destination
with no mismatch, or the benchmark fails. *total ms* and *downtime ms*: the destination's
`vm.migration-info`, which reports the source's clock (downtime: from the source's pause
until the destination's `Resumed` reached it). *pause→resume ms*: the same pause on one
host clock from the two processes' logs (the source's line just before it pauses the
vCPUs, the destination's just after it resumed them), as a check. *page data Gbit/s*: the
guest pages that were not zero (`ram.normal-bytes`, 4 KiB each, however few bytes a
sparse page took on the wire) over the time of all passes, each pass ending when the
destination had written it into guest RAM;
*wire Mbit/s*: bytes on the wire over the whole migration. *throttle %*: auto-converge's
last hold on the source's vCPUs (0: none).

{head}
""" + "\n".join(lines) + "\n"
open(os.path.join(out, "migration.md"), "w").write(md)
json.dump({"date": date, "cpu": cpu, "runs": runs}, open(os.path.join(out, "migration.json"), "w"), indent=1)
print("\nwritten to docs/benchmarks/migration.md and migration.json")
PY

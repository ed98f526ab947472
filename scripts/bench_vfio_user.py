#!/usr/bin/env python3
"""The vfio-user benchmark (issue 14): what reading a vfio-user device's DMA log costs,
and the vfio-user guest live-migrated.

Run through scripts/bench_vfio_user.sh (`scripts/dev_cli.sh bench vfio-user`), which
builds and copies the binaries (the harvest benchmark's too), makes the two network
namespace hosts, waits for a quiet machine and passes all of it in the environment.

1. Harvest: dma_device/benches/log_harvest.rs (one `DmaTracker::<UserDeviceLog>::harvest`
   of the device model's log against the mapped region's size and the fraction of it the
   device wrote), its table as printed and its rows from `--save`.
2. Migration: the test guest's `dma-verify dma=vfio-user size=MIG_SIZE` with a
   `ferry-dma-device` on each host, without and with `iommu=on remap=on`, and as a baseline
   the same guest with `dma=rng` (virtio-rng, Ferry's own device model; with and without
   the vIOMMU), moved by Ferry from host A to host B (two network namespaces joined by a
   veth pair) MIG_ROUNDS times each, the modes in turn in every round. A run counts only
   if the guest goes on on B: two more `dma-verified` lines, no MISMATCH/FAIL.

Writes docs/benchmarks/vfio-user.json (raw runs) and vfio-user.md (tables), prints the
tables. Python 3.11 standard library only.
"""

import datetime
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dma as bd  # noqa: E402  (after the path)
import bench_vs_qemu as vsq  # noqa: E402

ROOT, WORK, OUT = vsq.ROOT, vsq.WORK, vsq.OUT
FERRY, REMOTE, GUEST = vsq.FERRY, vsq.REMOTE, vsq.GUEST
DEVICE = os.environ.get("DEVICE") or os.path.join(ROOT, "target/release/ferry-dma-device")
HARVEST_BIN = os.environ.get("HARVEST_BIN", "")
HARVEST_SIZES = os.environ.get("HARVEST_SIZES", "64M,256M,1G,4G")
HARVEST_REPS = int(os.environ.get("HARVEST_REPS", "5"))
NS_A, NS_B, ADDR_B = vsq.NS_A, vsq.NS_B, vsq.ADDR_B

MIG_ROUNDS = int(os.environ.get("MIG_ROUNDS", "5"))
MIG_SIZE = os.environ.get("MIG_SIZE", "16M")
MIG_MEM = os.environ.get("MIG_MEM", "512M")
MIG_MODES = os.environ.get(
    "MIG_MODES", "vfio-user vfio-user-iommu rng-shared rng-iommu-shared rng").split()
MODE_NAMES = {
    "vfio-user": "vfio-user (ferry-dma-device)",
    "vfio-user-iommu": "vfio-user, iommu=on remap=on",
    "rng-shared": "baseline: virtio-rng, shared RAM",
    "rng-iommu-shared": "baseline: virtio-rng, iommu=on remap=on, shared RAM",
    "rng": "baseline: virtio-rng, private RAM (Ferry's default)",
}
# Each vfio-user mode's baseline: the same RAM backing (a vfio-user device makes guest RAM
# shared memory, a memfd) and the same vIOMMU setting.
BASELINE = {"vfio-user": "rng-shared", "vfio-user-iommu": "rng-iommu-shared"}
QUIET_LOAD = float(os.environ.get("QUIET_LOAD", "0.8"))
QUIET_WAIT_S = int(os.environ.get("QUIET_WAIT_S", "900"))
QUIET_START_LOAD = os.environ.get("QUIET_START_LOAD")
QUIET_WAITED_S = os.environ.get("QUIET_WAITED_S")

log = vsq.log
MIB = vsq.MIB


def sha16(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


# ---------------------------------------------------------------------------- harvest

def harvest_run():
    """log_harvest's printed table and its saved rows (None when it failed)."""
    if not HARVEST_BIN:
        return "(not run)", None
    out = os.path.join(WORK, "harvest.json")
    r = subprocess.run([HARVEST_BIN, "--sizes", HARVEST_SIZES, "--reps", str(HARVEST_REPS),
                        "--save", out], capture_output=True, text=True, timeout=1800,
                       preexec_fn=vsq._die_with_parent)
    text = (r.stdout + ("" if r.returncode == 0 else "\n" + r.stderr[-2000:])).strip()
    if r.returncode != 0:
        log(f"log_harvest failed ({r.returncode}): {r.stderr[-800:]}")
        return text, None
    with open(out) as f:
        return text, json.load(f)


def harvest_table(text, saved):
    if not HARVEST_BIN:
        return "(not run)"
    if not saved:
        return f"(failed)\n\n```\n{text}\n```"
    lines = [l for l in text.splitlines() if l.startswith("|") or l.startswith("skipped")]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- migration

def mode_parts(mode):
    """(guest command line, vIOMMU?, vfio-user?, shared RAM?) of a migration mode."""
    iommu = "-iommu" in mode
    user = mode.startswith("vfio-user")
    cmdline = f"workload=dma-verify dma={'vfio-user' if user else 'rng'} size={MIG_SIZE}"
    if iommu:
        cmdline += " iommu=on remap=on"
    return cmdline, iommu, user, user or mode.endswith("-shared")


def api_put(sock_path, endpoint, body, timeout):
    """PUT /api/v1/<endpoint> with a JSON body over Ferry's API socket: (status, text)."""
    data = json.dumps(body).encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
        s.sendall(f"PUT /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n"
                  f"Accept: application/json\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        reply = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            reply += b
    finally:
        s.close()
    head, _, rest = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, rest.decode(errors="replace")


def start_device(path, logpath, netns):
    dev = vsq.Proc([DEVICE, "--socket", path], logpath, netns)
    vsq.wait_until(f"{os.path.basename(path)} listening", lambda: os.path.exists(path), 20, [dev])
    return dev


def run_mode(mode, rnd, port, rec):
    cmdline, iommu, user, shared = mode_parts(mode)
    d = os.path.join(WORK, f"{mode}-{rnd}")
    os.makedirs(d, exist_ok=True)
    serial, ssock, dsock = f"{d}/serial.log", f"{d}/src.sock", f"{d}/dst.sock"
    dev_a, dev_b = f"{d}/dev-a.sock", f"{d}/dev-b.sock"
    procs = []
    try:
        if user:
            procs.append(start_device(dev_a, f"{d}/dev-a.log", NS_A))
            procs.append(start_device(dev_b, f"{d}/dev-b.log", NS_B))
            fdev = ["--user-device", f"socket={dev_a}" + (",iommu=on" if iommu else "")]
        else:
            fdev = ["--rng", "src=/dev/urandom" + (",iommu=on" if iommu else "")]
        dst = vsq.Proc([FERRY, "--api-socket", dsock], f"{d}/dst.log", NS_B)
        src = vsq.Proc([FERRY, "--api-socket", ssock, "--kernel", GUEST, "--cmdline", cmdline,
                        "--cpus", "boot=1",
                        "--memory", f"size={MIG_MEM}" + (",shared=on" if shared and not user else ""),
                        "--serial", f"file={serial}"] + fdev, f"{d}/src.log", NS_A)
        procs += [dst, src]
        vsq.wait_until("API sockets", lambda: os.path.exists(ssock) and os.path.exists(dsock),
                       30, [src, dst])
        body = {"receiver_url": f"tcp:0.0.0.0:{port}"}
        if user:
            body["user_devices"] = [{"socket": dev_b}]
        recv = {}

        def receive():
            try:
                recv["reply"] = api_put(dsock, "vm.receive-migration", body,
                                        vsq.MIGRATION_TIMEOUT_S + 60)
            except OSError as e:
                recv["reply"] = (0, str(e))
        t = threading.Thread(target=receive, daemon=True)
        t.start()
        vsq.wait_until("destination listening", lambda: vsq.listening(dst.pid, port), 30, [dst])
        vsq.wait_until("guest's first progress line",
                       lambda: vsq.guest_ready("dma-verify", 1, serial), vsq.BOOT_TIMEOUT_S,
                       [src, dst])
        rec["boot_s"] = round(time.monotonic() - src.started, 2)
        time.sleep(vsq.SETTLE_S)
        t0 = time.monotonic()
        send = vsq.Proc([REMOTE, "--api-socket", ssock, "send-migration",
                         f"tcp:{ADDR_B}:{port}", "--downtime-ms", str(vsq.DOWNTIME_MS)],
                        f"{d}/send.out")
        procs.append(send)
        if not send.wait(vsq.MIGRATION_TIMEOUT_S):
            vsq.run_cmd([REMOTE, "--api-socket", ssock, "cancel-migration"], 10)
            raise vsq.RunFailed(f"did not complete within {vsq.MIGRATION_TIMEOUT_S:.0f} s; "
                                f"cancelled")
        t.join(60)
        rec["wall_ms"] = round((time.monotonic() - t0) * 1000)
        status, text = recv.get("reply", (0, "no answer"))
        if send.status != 0 or status != 204:
            raise vsq.RunFailed(f"send status {send.status} {send.log_tail(2)}, "
                                f"receive-migration HTTP {status} {text.strip()[:300]}")
        offset = len(vsq.read_text(serial))
        rc, out, err = vsq.run_cmd([REMOTE, "--api-socket", dsock, "migration-info"], 30)
        if rc != 0:
            raise vsq.RunFailed(f"migration-info: {err.strip()}")
        info = json.loads(out)
        rec["info"] = info
        if info.get("status") != "completed":
            raise vsq.RunFailed(f"destination says {info.get('status')}")
        if not src.wait(30):
            raise vsq.RunFailed("the source ferry still runs 30 s after the migration")
        rec["src_log_total_ms"] = vsq.source_log_total(f"{d}/src.log")
        rec["pause_resume_ms"] = vsq.ferry_pause_resume_ms(f"{d}/src.log", f"{d}/dst.log")

        def running():
            rc, out, err = vsq.run_cmd([REMOTE, "--api-socket", dsock, "info"], 30)
            if rc != 0:
                return err.strip()
            st = json.loads(out).get("state")
            return True if st == "Running" else st

        w = {"kind": "dma-verify", "cpus": 1}
        rec["check_s"] = round(vsq.check_destination(w, [serial], serial, offset, dst, running), 2)
    finally:
        for p in reversed(procs):
            p.stop(grace=5)


def figures(rec):
    info = rec.get("info") or {}
    ram = info.get("ram", {})
    src = (info.get("dirty-tracking") or {}).get("sources") or {}
    total = info.get("total-time")
    if info and total is None:
        total = rec.get("src_log_total_ms") or rec.get("wall_ms")
    sent = ram.get("transferred")
    return {
        "total_ms": total,
        "downtime_ms": info.get("downtime"),
        "pause_resume_ms": rec.get("pause_resume_ms"),
        "sent_mib": sent / MIB if sent is not None else None,
        "passes": ram.get("dirty-sync-count"),
        "user_device_pages": src.get("user-devices"),
        "viommu_dma_pages": src.get("viommu-dma"),
        "device_pages": src.get("devices"),
        "check_s": rec.get("check_s"),
    }


def migration_runs(jsonl):
    runs = []
    port = 47800
    n = MIG_ROUNDS * len(MIG_MODES)
    for rnd in range(1, MIG_ROUNDS + 1):
        # Rotate the order by one mode each round.
        k = (rnd - 1) % len(MIG_MODES)
        for mode in MIG_MODES[k:] + MIG_MODES[:k]:
            port += 1
            rec = {"mode": mode, "round": rnd, "ok": False, "cmdline": mode_parts(mode)[0],
                   "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                       timespec="seconds"), "loadavg": bd.loadavg()}
            if vsq.LIVE:
                raise SystemExit(f"processes left from the previous run: "
                                 f"{[p.pid for p in vsq.LIVE]}")
            t0 = time.monotonic()
            try:
                run_mode(mode, rnd, port, rec)
                rec["ok"] = True
            except (vsq.RunFailed, OSError, ValueError, subprocess.TimeoutExpired) as e:
                rec["error"] = str(e)
            finally:
                vsq.stop_all()
            rec["run_s"] = round(time.monotonic() - t0, 1)
            rec.update(figures(rec))
            runs.append(rec)
            with open(jsonl, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if rec["ok"]:
                log(f"[{len(runs)}/{n}] {mode} round {rnd}: total {rec['total_ms']} ms, "
                    f"downtime {rec['downtime_ms']} ms, {rec['sent_mib']:.0f} MiB, "
                    f"{rec['passes']} passes, {rec['user_device_pages']} device-log pages")
            else:
                log(f"[{len(runs)}/{n}] {mode} round {rnd}: FAILED: {rec.get('error')}")
    return runs


MIG_KEYS = [("total_ms", "total ms", 0), ("downtime_ms", "downtime ms", 0),
            ("pause_resume_ms", "pause→resume ms", 1), ("sent_mib", "MiB sent", 0),
            ("passes", "passes (dirty syncs)", 0),
            ("user_device_pages", "pages from the device's log", 0),
            ("viommu_dma_pages", "pages from vIOMMU DMA", 0),
            ("device_pages", "pages from Ferry's devices", 0),
            ("check_s", "guest went on, s", 2)]


def migration_table(runs):
    out = ["| guest | ok | " + " | ".join(c for _, c, _ in MIG_KEYS) + " |",
           "|---|---|" + "---|" * len(MIG_KEYS)]
    summary = {}
    for mode in MIG_MODES:
        mr = [r for r in runs if r["mode"] == mode]
        if not mr:
            continue
        cells = []
        s = {}
        for k, _, p in MIG_KEYS:
            st = vsq.stats(mr, k)
            s[k] = st[0] if st else None
            cells.append(vsq.fmt(st, p))
        summary[mode] = s
        ok = sum(r["ok"] for r in mr)
        out.append(f"| {MODE_NAMES[mode]} | {ok}/{len(mr)} | " + " | ".join(cells) + " |")
    for user, base in BASELINE.items():
        a, b = summary.get(user), summary.get(base)
        if not a or not b:
            continue
        cells = []
        for k, _, _ in MIG_KEYS[:5]:
            cells.append(f"{a[k] / b[k]:.2f}" if a.get(k) and b.get(k) else "–")
        out.append(f"| {MODE_NAMES[user]} / {MODE_NAMES[base].removeprefix('baseline: ')} "
                   f"(medians) | | " + " | ".join(cells) + " |" + " |" * (len(MIG_KEYS) - 5))
    fails = [r for r in runs if not r["ok"]]
    if fails:
        out.append("")
        out += [f"- failed: {r['mode']} round {r['round']}: {r.get('error')}" for r in fails]
    return "\n".join(out), summary


# ---------------------------------------------------------------------------- report

KEEP_MARK = "<!-- Written by hand below this line; bench_vfio_user.py keeps it. -->"
MACHINE_NOTE = bd.MACHINE_NOTE


def quiet_note(runs):
    start = float(QUIET_START_LOAD) if QUIET_START_LOAD else None
    waited = int(QUIET_WAITED_S) if QUIET_WAITED_S else None
    if start is None:
        first = "The run did not wait for a quiet machine."
    elif start < QUIET_LOAD:
        first = (f"Before measuring, the script waited {waited} s for the 1-minute load average "
                 f"to drop below {QUIET_LOAD:g}: it was {start:.2f} when the run started.")
    else:
        first = (f"**The machine was not quiet**: after waiting {waited} s (at most "
                 f"{QUIET_WAIT_S} s) the 1-minute load average was still {start:.2f} "
                 f"(wanted below {QUIET_LOAD:g}) and the run went ahead; the figures carry "
                 f"that noise.")
    loads = [r["loadavg"] for r in runs if r.get("loadavg") is not None]
    if loads:
        first += (f" The 1-minute load average at the migrations' starts: "
                  f"{min(loads):.2f}–{max(loads):.2f} (it counts the previous run's VM).")
    return first


def write_report(htext, hsaved, runs, started, finished, cmd, mach):
    mtab, summary = migration_table(runs) if runs else ("(not run)", {})
    htab = harvest_table(htext, hsaved)
    doc = {"date": started, "finished": finished, "machine": mach, "machine_note": MACHINE_NOTE,
           "command": cmd, "quiet": {"want_load_below": QUIET_LOAD, "waited_s": QUIET_WAITED_S,
                                     "load_at_start": QUIET_START_LOAD, "max_wait_s": QUIET_WAIT_S},
           "harvest": {"sizes": HARVEST_SIZES, "reps": HARVEST_REPS, "saved": hsaved,
                       "output": htext},
           "migration": {"rounds": MIG_ROUNDS, "size": MIG_SIZE, "memory": MIG_MEM,
                         "modes": {m: mode_parts(m)[0] for m in MIG_MODES},
                         "downtime_limit_ms": vsq.DOWNTIME_MS, "settle_s": vsq.SETTLE_S,
                         "summary": summary},
           "migration_runs": runs}
    bd.save_json("vfio-user", doc)
    kept = bd.kept_part("vfio-user", KEEP_MARK)
    changes = bd.worktree_note(mach)
    span = (hsaved or {}).get("report_span_bytes")
    span_note = f"{span >> 30} GiB" if span else "32 GiB"
    md = f"""# vfio-user devices: the device's DMA log harvested, the vfio-user guest migrated

Measured {started} – {finished} on {mach['cpu']}, {mach['cores']} cores, {mach['memory']} RAM,
Linux {mach['kernel']}, nested PVM-based KVM (guest ring 0 emulated, ring 3 native);
Ferry: the binaries of the checkout at {mach['git_head']} (its head when the run started)
as built {mach['ferry_built']} (copied before the run; sha256 in the JSON{changes}).
{MACHINE_NOTE} {quiet_note(runs)}

Command: `{cmd}` (raw runs in [vfio-user.json](vfio-user.json)). It runs the two parts
below in this order, one thing at a time.

## 1. One harvest of the device's DMA log (`dma_device/benches/log_harvest.rs`)

Host-side only, no guest: the device model of `ferry-dma-device` (`dma_device::Device`)
serving on a UNIX socket from a thread of the benchmark's process, and Ferry's client
reading its log exactly as a migration does at every pass:
`vfio_dirty::DmaTracker::<UserDeviceLog>::harvest`, which sends DMA_LOGGING_REPORT
requests of at most one message's bitmap each (1 MiB of bitmap, so one request covers
{span_note} at 4 KiB pages: *reports* is how many one harvest sends), decodes the bits
and merges the pages into guest-physical ranges. The client DMA-maps one memfd of the
region's size (sparse) at address 0, starts logging, then, untimed, has the device write
a fraction of the region through its doorbell registers: *none*; *1%*: every 100th page,
one one-page job each; *100%*: every page, in jobs of 1 MiB (the largest the device
takes). Each 64 MiB of writes is punched out of the memfd again (`fallocate
PUNCH_HOLE`), so a 4 GiB region written whole never holds more than 64 MiB of RAM; the
device's log keeps its bits. Then one harvest is timed. *Pages found* (the harvest's
ranges, in pages) must equal *pages written*: the benchmark asserts it for every run.
Figures: the best of {HARVEST_REPS} harvests (each after its own writes); *ns per GiB
mapped*: that over the region's size.

{htab}

## 2. The vfio-user guest migrated between two hosts

`workload=dma-verify dma=vfio-user size={MIG_SIZE}` (test_guest/README.md), {MIG_MEM.replace('M', ' MiB').replace('G', ' GiB')},
1 vCPU: only the device writes the region, by DMA, through its doorbell; the guest checks
every page of it each pass against what the device last wrote there. The source host's
`ferry-dma-device --socket A` serves `ferry --user-device socket=A` (with `iommu=on` the
device sits behind the virtio-iommu and the guest adds `iommu=on remap=on`: IOVAs only,
and every pass it unmaps and maps again one 2 MiB window while the device works, which
Ferry passes to the device as DMA_UNMAP/DMA_MAP); the destination host has its own
`ferry-dma-device --socket B`, named in `vm.receive-migration`'s body
(`{{"receiver_url": "tcp:0.0.0.0:PORT", "user_devices": [{{"socket": B}}]}}`). The
baselines run the same guest with `dma=rng` (virtio-rng, Ferry's own device model, whose
DMA Ferry marks itself), with `--rng src=/dev/urandom[,iommu=on]`: with `--memory
...,shared=on` (guest RAM a memfd, as a vfio-user device makes it; the ratio rows compare
against these), and once with Ferry's default private anonymous RAM. The hosts are two
network namespaces joined by a veth pair (each ferry and device process in its host's
namespace; the serial file and the sockets on the one filesystem); Ferry's
`send-migration --downtime-ms {vsq.DOWNTIME_MS}` over TCP from A to B, default dirty rings,
{vsq.SETTLE_S:g} s after the guest's first `dma-verified` line. {MIG_ROUNDS} round{'s' if MIG_ROUNDS != 1 else ''}, each
running every mode once, the order rotated by one mode each round. A run counts only if
the guest goes on on B: two more `dma-verified` lines (each a pass that checked every page
of the region) and no `MISMATCH`/`FAIL`.

Figures: median (min–max) over the rounds, from the destination's `vm.migration-info`:
*total* (`total-time`, the source's clock from start to `Resumed`), *downtime*, *MiB sent*
(`ram.transferred`), *passes* (`ram.dirty-sync-count`), and the pages each dirty source
contributed over the whole migration (`dirty-tracking.sources`: `user-devices`, from the
vfio-user devices' own logs; `viommu-dma`, DMA of Ferry's devices behind the vIOMMU;
`devices`, Ferry's device models otherwise). *pause→resume*: the source's log line just
before it pauses the vCPUs to the destination's just after it resumed them, one host
clock. *guest went on*: seconds until B's second `dma-verified` line. Ratio rows: the
vfio-user guest's median over its baseline's.

{mtab}

{KEEP_MARK}{kept}"""
    with open(os.path.join(OUT, "vfio-user.md"), "w", encoding="utf-8") as f:
        f.write(md)
    return f"{htab}\n\n{mtab}"


# ---------------------------------------------------------------------------- main

def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for m in MIG_MODES:
        if m not in MODE_NAMES:
            sys.exit(f"unknown mode {m} ({' '.join(MODE_NAMES)})")
    if MIG_ROUNDS and not (NS_A and NS_B and ADDR_B):
        sys.exit("the migrations need NS_A, NS_B and ADDR_B (run scripts/bench_vfio_user.sh)")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = os.environ.get("BENCH_CMD", "scripts/dev_cli.sh bench vfio-user")
    mach = bd.machine()
    mach["sha256"].update({os.path.basename(p): sha16(p)
                           for p in (DEVICE, HARVEST_BIN) if p})
    log("harvest: dma_device/benches/log_harvest.rs")
    htext, hsaved = harvest_run()
    print(htext, file=sys.stderr)
    jsonl = os.path.join(WORK, "runs.jsonl")
    try:
        runs = migration_runs(jsonl) if MIG_ROUNDS else []
    finally:
        vsq.stop_all()
    finished = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(write_report(htext, hsaved, runs, started, finished, cmd, mach))
    log(f"written to {OUT}/vfio-user.md and vfio-user.json")
    if hsaved is None or any(not r["ok"] for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""virtio-blk throughput in the guest, Ferry (dirty logging on and off) beside QEMU, and a
migration of a guest whose region only the disk writes (`dma-verify dma=blk`), Ferry
beside QEMU.

Run through scripts/bench_dma.sh (`scripts/dev_cli.sh bench dma`), which copies the
binaries and passes their paths in the environment.

Throughput: the test guest's `workload=dma-bench dma=blk bs=N secs=SECS` (one vCPU, one
queue, up to 64 requests in flight, reading a page-cached disk file sequentially into a
64 MiB region; see test_guest/README.md) booted by
  * `ferry-log`:   Ferry as it is (device writes marked in the dirty log),
  * `ferry-nolog`: Ferry with FERRY_BENCH_NO_DEVICE_LOG=1 (no device write marked),
  * `qemu`:        QEMU, -device virtio-blk-pci on -drive cache=writeback,aio=threads,
for each request size, ROUNDS rounds, the three modes in turn in every round. The
logging cost is 1 - ferry-log / ferry-nolog (medians of MiB/s).

Migration: the same `dma-verify dma=blk` guest moved once by Ferry (two processes, over
loopback TCP, through the API) and once by QEMU (its own migration, loopback TCP, QMP),
driven by bench_vs_qemu.py's code (its `run_ferry` / `run_qemu`): the guest must go on on
the destination (two more `dma-verified` lines, each a pass that checked every page)
without a MISMATCH.

Writes docs/benchmarks/dma.json (raw runs) and dma.md (tables), prints the tables.
Python 3.11 standard library only.
"""

import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_vs_qemu as vsq  # noqa: E402  (after the path)

ROOT = vsq.ROOT
FERRY, GUEST, QEMU, QEMU_CPU = vsq.FERRY, vsq.GUEST, vsq.QEMU, vsq.QEMU_CPU
WORK = vsq.WORK
OUT = vsq.OUT

ROUNDS = int(os.environ.get("ROUNDS", "3"))
SECS = int(os.environ.get("SECS", "5"))
SIZES = os.environ.get("SIZES", "4K 64K").split()
MODES = os.environ.get("MODES", "ferry-log ferry-nolog qemu").split()
DISK_MIB = int(os.environ.get("DISK_MIB", "256"))
REGION = os.environ.get("REGION", "64M")
REGION_BYTES = int(REGION[:-1]) << {"K": 10, "M": 20, "G": 30}[REGION[-1].upper()]
BENCH_MEM = "1G"
RUN_TIMEOUT_S = float(os.environ.get("RUN_TIMEOUT_S", "180"))
# A throughput run during which the rest of the machine used more than QUIET_PCT % of one
# CPU is run again, RETRIES times at most (the discarded runs stay in the JSON).
QUIET_PCT = float(os.environ.get("QUIET_PCT", "10"))
RETRIES = int(os.environ.get("RETRIES", "2"))
# The migration: a guest of 1 GiB, 1 vCPU, dma-verify over 256 MiB (a 512 MiB disk).
MIGRATE = os.environ.get("MIGRATE", "1") == "1"
MIG_MODES = os.environ.get("MIG_MODES", "qemu-bitmap ferry-lo").split()
MIG_SIZE_MIB = int(os.environ.get("MIG_SIZE_MIB", "256"))
QEMU_DRIVE = "format=raw,cache=writeback,aio=threads"

MODE_NAMES = {
    "ferry-log": "Ferry, dirty log on",
    "ferry-nolog": "Ferry, log off (FERRY_BENCH_NO_DEVICE_LOG=1)",
    "qemu": "QEMU virtio-blk-pci",
}
LINE = re.compile(r"guest: dma-bench bs=(\d+) requests=(\d+) bytes=(\d+) ms=(\d+) "
                  r"MiB/s=([\d.]+) req/s=(\d+) notifies=(\d+)")
MIB = 1 << 20


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def cpu_busy_s():
    """Seconds of CPU time the whole machine has spent busy (all CPUs; /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle, iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def sample_threads(pid, seen):
    """Records each thread's name and CPU ticks (utime + stime) into `seen` by thread id,
    keeping the last value read (a thread's time can no longer be read once it or the
    process has ended)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        seen[tid] = (name, int(fields[11]) + int(fields[12]))


VCPU_THREAD = re.compile(r"^(vcpu\d+|CPU \d+/KVM)$")


def thread_cpu(seen):
    """(CPU s of the threads that are not vCPUs, CPU s of Ferry's disk worker threads)."""
    hz = os.sysconf("SC_CLK_TCK")
    io = sum(t for n, t in seen.values() if not VCPU_THREAD.match(n)) / hz
    worker = sum(t for n, t in seen.values() if n.startswith("disk")) / hz
    return io, worker


def make_disk(path, mib):
    """A file of `mib` MiB of random bytes (so the page cache holds real pages, not
    holes), then read once: it stays in the page cache (the machine has RAM to spare)."""
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        while f.read(8 * MIB):
            pass


def cached_note(path):
    """`fincore`'s view of how much of the file is in the page cache, if it is there."""
    try:
        r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", path],
                           capture_output=True, text=True, timeout=30)
        res, size = r.stdout.split()[:2]
        return f"{int(res) / MIB:.0f} of {int(size) / MIB:.0f} MiB in the page cache"
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------- throughput

def bench_argv(mode, bs, serial, disk):
    cmdline = f"workload=dma-bench dma=blk bs={bs} secs={SECS} size={REGION}"
    if mode.startswith("ferry"):
        return [FERRY, "--kernel", GUEST, "--memory", f"size={BENCH_MEM}", "--cpus", "boot=1",
                "--serial", f"file={serial}", "--disk", f"path={disk}", "--cmdline", cmdline]
    # debug-threads=on names the vCPU threads `CPU n/KVM` (VCPU_THREAD), which the CPU
    # figures leave out; without it every QEMU thread is `qemu-system-x86`.
    return [QEMU, "-name", "debug-threads=on", "-accel", "kvm", "-cpu", QEMU_CPU,
            "-m", BENCH_MEM, "-smp", "1", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-device", "virtio-blk-pci,drive=d0",
            "-drive", f"file={disk},if=none,id=d0,{QEMU_DRIVE}",
            "-serial", f"file:{serial}", "-kernel", GUEST, "-append", cmdline]


def bench_run(mode, bs, rnd, disk, argv_of=None):
    """One `dma-bench` run of `mode` with `bs`-byte requests on `disk`; `argv_of(mode, bs,
    serial, disk)` gives the VMM's command line (default: `bench_argv`): a mode starting
    with `ferry` is Ferry (exit status 0), anything else QEMU (isa-debug-exit, 1)."""
    d = os.path.join(WORK, f"bench-{bs}-{mode}-{rnd}")
    os.makedirs(d, exist_ok=True)
    serial = f"{d}/serial.log"
    env = dict(os.environ)
    env.pop("FERRY_BENCH_NO_DEVICE_LOG", None)
    if mode == "ferry-nolog":
        env["FERRY_BENCH_NO_DEVICE_LOG"] = "1"
    rec = {"mode": mode, "bs": bs, "round": rnd, "ok": False, "loadavg": loadavg(),
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    argv = (argv_of or bench_argv)(mode, bs, serial, disk)
    rec["argv"] = argv
    t0 = time.monotonic()
    busy0 = cpu_busy_s()
    with open(f"{d}/vmm.log", "wb") as out:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             env=env, preexec_fn=vsq._die_with_parent)
    status = ru = None
    threads = {}
    try:
        while True:
            sample_threads(p.pid, threads)
            pid, st, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                status = os.waitstatus_to_exitcode(st)
                p.returncode = status
                break
            if time.monotonic() - t0 > RUN_TIMEOUT_S:
                rec["error"] = f"still running after {RUN_TIMEOUT_S:.0f} s"
                break
            time.sleep(0.02)
    finally:
        if status is None:
            p.kill()
            _, st, ru = os.wait4(p.pid, 0)
    rec["run_s"] = round(time.monotonic() - t0, 2)
    rec["status"] = status
    if ru is not None:
        rec["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 2)
        # What everything else on the machine used meanwhile, in % of one CPU: how quiet
        # the machine was (the VMM's own threads keep about two CPUs busy).
        others = cpu_busy_s() - busy0 - rec["cpu_s"]
        rec["others_cpu_pct"] = round(max(0.0, others) / rec["run_s"] * 100, 1)
    text = vsq.read_text(serial)
    m = LINE.search(text)
    want = 0 if mode.startswith("ferry") else 1  # QEMU: isa-debug-exit (0 << 1) | 1
    if m and status == want and "guest: PASS" in text:
        rec.update(ok=True, bytes_per_req=int(m[1]), requests=int(m[2]), bytes=int(m[3]),
                   ms=int(m[4]), mib_s=float(m[5]), req_s=int(m[6]), notifies=int(m[7]),
                   line=m[0])
        # CPU per request on the device side, from the threads' times read every 20 ms
        # (the requests of the warm-up count too: one per bs-sized buffer of the region).
        io_s, worker_s = thread_cpu(threads)
        n = rec["requests"] + REGION_BYTES // rec["bytes_per_req"]
        rec["threads"] = {f"{tid} {name}": t for tid, (name, t) in sorted(threads.items())}
        rec["io_cpu_us_per_req"] = round(io_s / n * 1e6, 3)
        if mode.startswith("ferry"):
            rec["worker_cpu_us_per_req"] = round(worker_s / n * 1e6, 3)
    elif "error" not in rec:
        bad = vsq.BAD.search(text)
        rec["error"] = (f"status {status}: " + (bad[0] if bad else "no dma-bench line")
                        + f"; log: {vsq.read_text(f'{d}/vmm.log')[-300:]!r}")
    return rec


# Median (min–max) over the runs that went well, and its cell: bench_vs_qemu's.
med = vsq.stats
fmt = vsq.fmt


def throughput_runs(bench, sizes, modes, rounds, disk, jsonl, argv_of=None):
    """For each request size, `rounds` rounds of one `bench_run` per mode, each round
    starting from the next mode (no mode always runs first); a run during which the rest
    of the machine used more than QUIET_PCT % of a CPU is run again, RETRIES times at most
    (the discarded runs are kept, marked). Appends every run to `bench` and to the JSON
    lines file `jsonl`."""
    t0 = time.monotonic()
    for bs in sizes:
        for rnd in range(1, rounds + 1):
            k = (rnd - 1) % len(modes)
            for m in modes[k:] + modes[:k]:
                for attempt in range(RETRIES + 1):
                    rec = bench_run(m, bs, rnd, disk, argv_of)
                    rec["attempt"] = attempt + 1
                    noisy = rec.get("others_cpu_pct", 0) > QUIET_PCT
                    if noisy and attempt < RETRIES:
                        rec["discarded"] = True
                    bench.append(rec)
                    with open(jsonl, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if not rec.get("discarded"):
                        break
                    log(f"bs={bs} round {rnd} {m}: the rest of the machine used "
                        f"{rec['others_cpu_pct']} % CPU ({rec.get('mib_s')} MiB/s): again")
                what = (f"{rec['mib_s']} MiB/s, {rec['req_s']} req/s, {rec['notifies']} notifies"
                        if rec["ok"] else f"FAILED: {rec.get('error')}")
                log(f"[{time.monotonic() - t0:.0f}s] bs={bs} round {rnd} {m}: {what} "
                    f"(others {rec.get('others_cpu_pct')} % CPU)")
    return bench


def mode_summaries(runs, sizes, modes, keys):
    """Per request size and mode, in order: the runs and the medians of `keys` (each ok
    run gets its `notifies_s` first, and its `cpu_s_per_gib` if that is a key)."""
    for bs in sizes:
        for m in modes:
            rs = [r for r in runs if r["bs"] == bs and r["mode"] == m]
            if not rs:
                continue
            for r in rs:
                if r.get("ok"):
                    r["notifies_s"] = r["notifies"] * 1000 / r["ms"] if r["ms"] else None
                if r.get("ok") and "cpu_s_per_gib" in keys:
                    # The whole process's CPU time (boot and warm-up too) over what the
                    # timed run read: a rough figure, for comparing the VMMs.
                    r["cpu_s_per_gib"] = (r["cpu_s"] / (r["bytes"] / (1 << 30))
                                          if r.get("cpu_s") is not None and r["bytes"] else None)
            yield bs, m, rs, {k: med(rs, k) for k in keys}


def bench_table(all_runs):
    runs = [r for r in all_runs if not r.get("discarded")]
    out = ["| request | mode | ok | MiB/s | req/s | notifies/s | VMM CPU s / GiB read "
           "| CPU µs / request, all but vCPU threads | CPU µs / request, Ferry's disk worker |",
           "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    keys = ("mib_s", "req_s", "notifies_s", "cpu_s_per_gib", "io_cpu_us_per_req",
            "worker_cpu_us_per_req")
    for bs, m, rs, s in mode_summaries(runs, SIZES, MODES, keys):
        summary[(bs, m)] = s
        ok = sum(bool(r.get("ok")) for r in rs)
        out.append(f"| {bs} | {MODE_NAMES[m]} | {ok}/{len(rs)} | {fmt(s['mib_s'], 1)} "
                   f"| {fmt(s['req_s'])} | {fmt(s['notifies_s'])} | {fmt(s['cpu_s_per_gib'], 2)} "
                   f"| {fmt(s['io_cpu_us_per_req'], 2)} | {fmt(s['worker_cpu_us_per_req'], 2)} |")
    out.append("")
    out += ["| request | logging cost (1 − log on / log off, medians) | per round (median) "
            "| disk worker CPU per request, log on / log off − 1 (medians) | per round (median) "
            "| Ferry log on / QEMU (MiB/s) | Ferry log off / QEMU |",
            "|---|---|---|---|---|---|---|"]
    derived = {}
    for bs in SIZES:
        on, off, q = (summary.get((bs, m), {}).get("mib_s") for m in ("ferry-log", "ferry-nolog", "qemu"))
        cost = (1 - on[0] / off[0]) * 100 if on and off else None
        won, woff = (summary.get((bs, m), {}).get("worker_cpu_us_per_req")
                     for m in ("ferry-log", "ferry-nolog"))
        wcost = (won[0] / woff[0] - 1) * 100 if won and woff else None
        wrounds = []
        rounds = []
        for rnd in range(1, ROUNDS + 1):
            a = [r for r in runs if r["bs"] == bs and r["round"] == rnd and r.get("ok")]
            lo = [r["mib_s"] for r in a if r["mode"] == "ferry-log"]
            nl = [r["mib_s"] for r in a if r["mode"] == "ferry-nolog"]
            if lo and nl:
                rounds.append((1 - lo[0] / nl[0]) * 100)
            wlo = [r.get("worker_cpu_us_per_req") for r in a if r["mode"] == "ferry-log"]
            wnl = [r.get("worker_cpu_us_per_req") for r in a if r["mode"] == "ferry-nolog"]
            if wlo and wnl and wlo[0] and wnl[0]:
                wrounds.append((wlo[0] / wnl[0] - 1) * 100)
        r_on = on[0] / q[0] if on and q else None
        r_off = off[0] / q[0] if off and q else None
        derived[bs] = {"logging_cost_pct": cost, "logging_cost_pct_rounds": rounds,
                       "logging_cpu_cost_pct": wcost, "logging_cpu_cost_pct_rounds": wrounds,
                       "ferry_log_over_qemu": r_on, "ferry_nolog_over_qemu": r_off}
        c = "–" if cost is None else f"{cost:.1f} %"
        pr = (", ".join(f"{x:.1f}" for x in rounds) + f" % ({statistics.median(rounds):.1f} %)"
              if rounds else "–")
        wc = "–" if wcost is None else f"{wcost:.1f} %"
        wpr = (", ".join(f"{x:.1f}" for x in wrounds) + f" % ({statistics.median(wrounds):.1f} %)"
               if wrounds else "–")
        out.append(f"| {bs} | {c} | {pr} | {wc} | {wpr} | {'–' if r_on is None else f'{r_on:.2f}'} "
                   f"| {'–' if r_off is None else f'{r_off:.2f}'} |")
    fails = [r for r in runs if not r.get("ok")]
    noisy = [r for r in runs if r.get("others_cpu_pct", 0) > QUIET_PCT]
    dropped = [r for r in all_runs if r.get("discarded")]
    out.append("")
    out.append(f"{len(dropped)} run{'s' if len(dropped) != 1 else ''} discarded and run again "
               f"(the rest of the machine used more than {QUIET_PCT:g} % of a CPU meanwhile); "
               f"{len(noisy)} counted run{'s' if len(noisy) != 1 else ''} still over that "
               f"after {RETRIES} retries.")
    if fails:
        out.append("")
        out += [f"- failed: {r['bs']} {r['mode']} round {r['round']}: {r.get('error')}" for r in fails]
    return "\n".join(out), {f"{bs} {m}": {k: (v[0] if v else None) for k, v in s.items()}
                            for (bs, m), s in summary.items()}, derived


# ---------------------------------------------------------------------------- migration

def migration_runs():
    runs = []
    port = 47300
    for mode in MIG_MODES:
        port += 1
        disk = os.path.join(WORK, f"mig-{mode}.raw")
        with open(disk, "wb") as f:
            f.truncate(2 * MIG_SIZE_MIB * MIB)  # sparse: the guest writes all it reads
        vsq.WORKLOADS["dma"] = dict(
            name=f"dma-verify dma=blk over {MIG_SIZE_MIB} MiB, 1 GiB, 1 vCPU", mem="1G", cpus=1,
            cmdline=f"workload=dma-verify dma=blk size={MIG_SIZE_MIB}M", kind="dma-verify",
            qemu_args=["-device", "virtio-blk-pci,drive=d0",
                       "-drive", f"file={disk},if=none,id=d0,{QEMU_DRIVE}"],
            ferry_args=["--disk", f"path={disk}"])
        vsq.MODES.setdefault(mode, mode)
        rec = vsq.one_run("dma", mode, 1, port)
        rec["loadavg_after"] = loadavg()
        runs.append(rec)
        if rec["ok"]:
            log(f"migration {mode}: total {rec['total_ms']} ms, downtime {rec['downtime_ms']} ms, "
                f"{rec['sent_mib']:.0f} MiB sent")
        else:
            log(f"migration {mode}: FAILED: {rec.get('error')}")
        os.unlink(disk)
    return runs


def migration_table(runs):
    keys = [("total_ms", "total ms", 0), ("downtime_ms", "downtime ms", 0),
            ("pause_resume_ms", "pause→resume ms", 0), ("sent_mib", "MiB sent", 0),
            ("syncs", "dirty syncs", 0), ("check_s", "guest went on, s", 1)]
    out = ["| VMM | ok | " + " | ".join(c for _, c, _ in keys) + " | bytes sent |",
           "|---|---|" + "---|" * (len(keys) + 1)]
    by = {}
    for r in runs:
        by[r["mode"]] = r
        sent = (r.get("info") or {}).get("ram", {}).get("transferred")
        cells = ["–" if r.get(k) is None else f"{r[k]:.{p}f}" for k, _, p in keys]
        out.append(f"| {vsq.MODES.get(r['mode'], r['mode'])} | {'yes' if r['ok'] else 'NO'} | "
                   + " | ".join(cells) + f" | {sent if sent is not None else '–'} |")
    f, q = by.get("ferry-lo"), next((by[m] for m in MIG_MODES if m.startswith("qemu") and m in by), None)
    ratios = {}
    if f and q and f["ok"] and q["ok"]:
        cells = []
        for k, _, _ in keys:
            if f.get(k) is not None and q.get(k):
                ratios[k] = f[k] / q[k]
                cells.append(f"{ratios[k]:.2f}")
            else:
                cells.append("–")
        out.append(f"| Ferry / {vsq.MODES.get(q['mode'], q['mode'])} | | " + " | ".join(cells) + " | |")
    for r in runs:
        if not r["ok"]:
            out.append(f"\n- failed: {r['mode']}: {r.get('error')}")
    return "\n".join(out), ratios


# ---------------------------------------------------------------------------- report

KEEP_MARK = "<!-- Written by hand below this line; bench_dma.py keeps it. -->"
MACHINE_NOTE = os.environ.get("BENCH_MACHINE_NOTE") or (
    "The benchmark runs one VM at a time and ends every process it starts; other sessions "
    "share the machine and may have run builds or tests meanwhile.")


def save_json(stem, doc):
    """Writes `doc` to OUT/<stem>.json."""
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, stem + ".json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def kept_part(stem, keep_mark):
    """The hand-written part of OUT/<stem>.md (after `keep_mark`), kept across runs."""
    try:
        # UTF-8 (the hand-written part has µ, ±, ×): read as latin-1 it would come back
        # encoded twice.
        with open(os.path.join(OUT, stem + ".md"), encoding="utf-8", errors="replace") as f:
            old = f.read()
    except OSError:
        old = ""
    return old[old.index(keep_mark) + len(keep_mark):] if keep_mark in old else "\n"


def worktree_note(mach):
    """What the build took from uncommitted changes, for the md's first paragraph."""
    wc = mach.get("worktree_changes") or []
    return (f"; the working tree then also had uncommitted changes to "
            f"{', '.join(c[3:] for c in wc)}, which the build included" if wc else "")


def write_report(bench, mig, started, finished, cmd, mach, disk_note):
    btab, bsum, derived = bench_table(bench)
    mtab, ratios = migration_table(mig) if mig else ("(not run)", {})
    doc = {"date": started, "finished": finished, "machine": mach, "machine_note": MACHINE_NOTE,
           "command": cmd, "rounds": ROUNDS, "secs": SECS, "sizes": SIZES, "modes": MODES,
           "region": REGION, "quiet_pct": QUIET_PCT, "retries": RETRIES, "memory": BENCH_MEM, "disk_mib": DISK_MIB, "disk_cache": disk_note,
           "qemu_drive": QEMU_DRIVE, "summary": bsum, "derived": derived,
           "migration_ratios_ferry_over_qemu": ratios,
           "bench_runs": bench, "migration_runs": mig}
    save_json("dma", doc)
    md_path = os.path.join(OUT, "dma.md")
    kept = kept_part("dma", KEEP_MARK)
    loads = [r["loadavg"] for r in bench]
    others = [r["others_cpu_pct"] for r in bench
              if r.get("others_cpu_pct") is not None and not r.get("discarded")]
    changes = worktree_note(mach)
    md = f"""# virtio-blk in the guest: throughput with the dirty log on and off, beside QEMU; a DMA guest migrated

Measured {started} – {finished} on {mach['cpu']}, {mach['cores']} cores, {mach['memory']} RAM,
Linux {mach['kernel']}, nested PVM-based KVM (guest ring 0 emulated, ring 3 native; the
guest's driver runs in ring 3); {mach['qemu']}; Ferry: the binaries of the checkout at
{mach['git_head']} (its head when the run started) as built {mach['ferry_built']} (copied
before the run; sha256 in the JSON{changes}). {MACHINE_NOTE} CPU used by everything but
the benchmark's VMM during each throughput run (from /proc/stat, less the VMM's own CPU
time; a run over {QUIET_PCT:g} % is run again, {RETRIES} times at most): {min(others) if others else 0:.0f}–{max(others) if others else 0:.0f} % of one CPU in the counted runs, median
{statistics.median(others) if others else 0:.0f} % (per run in the JSON; the 1-minute load
average at the runs' starts, {min(loads) if loads else 0:.2f}–{max(loads) if loads else 0:.2f}, counts
the previous run's VM, which keeps two threads busy).

Command: `{cmd}` (raw runs in [dma.json](dma.json)).

## Throughput: `workload=dma-bench dma=blk bs=<size> secs={SECS} size={REGION}`

One vCPU, {BENCH_MEM.replace('G', ' GiB')} of guest RAM, one virtio-blk queue of 256 entries with up to 64 requests
in flight (each posted again as soon as it is back), each request one data descriptor of
`bs` bytes, read sequentially from a {DISK_MIB} MiB raw file of random bytes on the local
filesystem into a {REGION.replace('M', ' MiB')} region (see test_guest/README.md, "dma-bench"). The file is
written, fsynced and read once before the runs, so it is in the **page cache** for every
run ({disk_note or 'fincore not available to confirm'}): this measures the VMMs' I/O path,
not the disk. Ferry serves the queue on its worker thread with a plain `pread` into guest
RAM per request; the matching QEMU setup is `-drive {QEMU_DRIVE}` (`cache=writeback`
is QEMU's default: host page cache, no O_DIRECT, like Ferry's `pread` on a normally
opened file; `aio=threads`, QEMU's default, preads from its thread pool), `-device
virtio-blk-pci` with its defaults. Ferry's figure with the log off sets
`FERRY_BENCH_NO_DEVICE_LOG=1` (no device write into the guest marked in the dirty
bitmap; a benchmark seam only). {ROUNDS} round{'s' if ROUNDS != 1 else ''} per request size,
each running every mode once, one VM at a time, in the order {', '.join(MODES)} rotated by
one more mode each round (no mode always runs first).
The guest first reads one request per buffer of its region (warm-up, not timed), then
reads for {SECS} s by its TSC; MiB = 2^20 bytes.

Figures: median (min–max) over the rounds. *notifies/s*: the guest's MMIO notifications
per second (it notifies only when the device has not set `VIRTQ_USED_F_NO_NOTIFY`).
*VMM CPU s / GiB read*: the VMM process's user+system CPU time over its whole life (boot,
warm-up and timed run) per GiB the timed run read: rough, for comparing the two. *CPU µs
/ request*: the CPU time of the VMM's threads, read from /proc every 20 ms, over every
request the guest made (timed run and warm-up): all threads but the vCPU's (which spins
polling the used ring all the time; Ferry: its disk worker, main and other threads; QEMU:
its main loop, which takes the notifications and completions, and its thread-pool
workers, which do the preads), and Ferry's disk worker thread alone, which serves the
queue and does every `pread` and dirty mark. That figure is much less sensitive to
the rest of the machine than the throughput, so its log-on / log-off ratio is the
sharper measure of the logging's cost.

{btab}

## Migration: `dma-verify dma=blk size={MIG_SIZE_MIB}M`, 1 GiB, 1 vCPU

Only virtio-blk writes the {MIG_SIZE_MIB} MiB region (page after page read from a
{2 * MIG_SIZE_MIB} MiB sparse disk file the guest wrote at start), so every page the
migration must resend was dirtied by the device. Moved once by each, over TCP on
loopback, {vsq.SETTLE_S:g} s after the guest's first `dma-verified` line, with the same
downtime limit ({vsq.DOWNTIME_MS} ms) and no bandwidth limit, as in
[vs-qemu.md](vs-qemu.md) (the same code drives it: `bench_vs_qemu.py`'s `run_qemu` /
`run_ferry`): Ferry through its API (`ferry-remote send-migration` /
`receive-migration`, dirty rings), QEMU through QMP (`migrate`, `query-migrate`; its
default dirty bitmap unless MIG_MODES says `qemu-ring`), both destinations opening the
same disk file (shared storage). A run counts only if the guest goes on on the
destination: two more `dma-verified` lines (each a pass that checked every page of the
region against the disk block it was read from) and no `MISMATCH`/`FAIL`. *total*,
*downtime*, *MiB sent*: each VMM's own report (QEMU's `query-migrate`; Ferry's
`migration-info`), *pause→resume*: the guest's pause on one host clock (QMP events;
Ferry's two logs); *bytes sent*: `ram.transferred`. Ratio row: Ferry / QEMU.

{mtab}

{KEEP_MARK}{kept}"""
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(md)
    return btab + "\n\n" + mtab


def machine():
    """bench_vs_qemu's machine facts, and the tracked files that differed from HEAD when
    the binaries were built (other people commit to the same working tree): the binaries
    are of HEAD plus these."""
    mach = vsq.machine()
    mach["worktree_changes"] = subprocess.run(
        ["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True).stdout.split("\n")[:-1]
    return mach


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for m in MODES:
        if m not in MODE_NAMES:
            sys.exit(f"unknown mode {m} ({' '.join(MODE_NAMES)})")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = os.environ.get("BENCH_CMD", "scripts/dev_cli.sh bench dma")
    mach = machine()
    disk = os.path.join(WORK, "bench.raw")
    log(f"writing a {DISK_MIB} MiB disk file of random bytes: {disk}")
    make_disk(disk, DISK_MIB)
    disk_note = cached_note(disk)
    log(f"disk: {disk_note}")
    bench, mig = [], []
    jsonl = os.path.join(WORK, "runs.jsonl")
    try:
        throughput_runs(bench, SIZES, MODES, ROUNDS, disk, jsonl)
        os.unlink(disk)
        if MIGRATE:
            mig = migration_runs()
    finally:
        vsq.stop_all()
    finished = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(write_report(bench, mig, started, finished, cmd, mach, disk_note))
    log(f"written to {OUT}/dma.md and dma.json")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The virtio-iommu benchmark (issue 13): what putting a device behind the vIOMMU costs,
Ferry beside QEMU.

Run through scripts/bench_viommu.sh (`scripts/dev_cli.sh bench viommu`), which builds and
copies the binaries (the micro-benchmark's too), waits for a quiet machine and passes
their paths in the environment.

1. Requests: devices/benches/viommu_requests.rs (MAP + UNMAP pairs per second through the
   request handler; a 4 KiB device write with and without translation), its table as
   printed.
2. Throughput: the test guest's `workload=dma-bench dma=blk bs=N secs=SECS` (one vCPU, one
   queue, up to 64 requests in flight, reading a page-cached disk file into a 64 MiB
   region) with `iommu=on` (the disk behind the virtio-iommu, every DMA translated) and
   without, under Ferry and under QEMU (q35 both, the disk modern-only both;
   `-device virtio-iommu-pci` and `iommu_platform=on` for on), ROUNDS rounds, the four
   modes in turn in every round (bench_dma.py's `throughput_runs` / `bench_run`).
3. Migration: the `dma-verify iommu=on remap=on` guest with dma=blk and with dma=rng
   moved by Ferry and by QEMU over loopback TCP (bench_vs_qemu.py's `one_run`),
   MIG_ROUNDS times each, alternating which VMM goes first; the guest must go on on the
   destination without a MISMATCH.

Writes docs/benchmarks/viommu.json (raw runs) and viommu.md (tables), prints the tables.
Python 3.11 standard library only.
"""

import datetime
import json
import os
import signal
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dma as bd  # noqa: E402  (after the path)
import bench_vs_qemu as vsq  # noqa: E402

ROOT, WORK, OUT = vsq.ROOT, vsq.WORK, vsq.OUT
FERRY, GUEST, QEMU, QEMU_CPU = vsq.FERRY, vsq.GUEST, vsq.QEMU, vsq.QEMU_CPU

ROUNDS = int(os.environ.get("ROUNDS", "3"))
SECS = int(os.environ.get("SECS", "5"))
SIZES = os.environ.get("SIZES", "4K 64K").split()
MODES = os.environ.get("MODES", "ferry ferry-iommu qemu qemu-iommu").split()
DISK_MIB = int(os.environ.get("DISK_MIB", "256"))
REGION = os.environ.get("REGION", "64M")
BENCH_MEM = "1G"
MIGRATE = os.environ.get("MIGRATE", "1") == "1"
MIG_WORKLOADS = os.environ.get("MIG_WORKLOADS", "blk rng").split()
MIG_ROUNDS = int(os.environ.get("MIG_ROUNDS", "3"))
MIG_SIZE_MIB = int(os.environ.get("MIG_SIZE_MIB", "256"))
MIG_MODES = ["qemu-bitmap", "ferry-lo"]
MICRO_BIN = os.environ.get("MICRO_BIN", "")
QEMU_DRIVE = bd.QEMU_DRIVE
# What bench_viommu.sh saw before it started.
QUIET_LOAD = float(os.environ.get("QUIET_LOAD", "0.8"))
QUIET_WAIT_S = int(os.environ.get("QUIET_WAIT_S", "900"))
QUIET_START_LOAD = os.environ.get("QUIET_START_LOAD")
QUIET_WAITED_S = os.environ.get("QUIET_WAITED_S")

MODE_NAMES = {
    "ferry": "Ferry, iommu off",
    "ferry-iommu": "Ferry, iommu=on",
    "qemu": "QEMU, iommu off",
    "qemu-iommu": "QEMU virtio-iommu-pci, iommu=on",
}
# The QEMU machine and the disk's properties, the same with and without the vIOMMU but for
# the vIOMMU itself and `iommu_platform=on` (which a transitional device refuses).
QEMU_MACHINE = "q35"
QEMU_BLK = "virtio-blk-pci,drive=d0,disable-legacy=on"
IOMMU_PROPS = ",iommu_platform=on"

log = bd.log


def bench_argv(mode, bs, serial, disk):
    """The VMM's command line for a `dma-bench` run of `mode` (see MODE_NAMES)."""
    iommu = mode.endswith("-iommu")
    cmdline = f"workload=dma-bench dma=blk bs={bs} secs={SECS} size={REGION}"
    if iommu:
        cmdline += " iommu=on"
    if mode.startswith("ferry"):
        return [FERRY, "--kernel", GUEST, "--memory", f"size={BENCH_MEM}", "--cpus", "boot=1",
                "--serial", f"file={serial}",
                "--disk", f"path={disk}" + (",iommu=on" if iommu else ""), "--cmdline", cmdline]
    # debug-threads=on: the vCPU thread is named `CPU 0/KVM`, which the CPU figures leave
    # out (bench_dma.VCPU_THREAD).
    return ([QEMU, "-name", "debug-threads=on", "-machine", QEMU_MACHINE, "-accel", "kvm",
             "-cpu", QEMU_CPU, "-m", BENCH_MEM, "-smp", "1", "-nodefaults", "-no-user-config",
             "-display", "none", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
            + (["-device", "virtio-iommu-pci"] if iommu else [])
            + ["-device", QEMU_BLK + (IOMMU_PROPS if iommu else ""),
               "-drive", f"file={disk},if=none,id=d0,{QEMU_DRIVE}",
               "-serial", f"file:{serial}", "-kernel", GUEST, "-append", cmdline])


# ---------------------------------------------------------------------------- requests

def micro_run():
    """devices/benches/viommu_requests's table: [[what, ns, per second], ...]."""
    if not MICRO_BIN:
        return None, []
    r = subprocess.run([MICRO_BIN], capture_output=True, text=True, timeout=600,
                       preexec_fn=vsq._die_with_parent)
    if r.returncode != 0:
        log(f"viommu_requests failed ({r.returncode}): {r.stderr[-500:]}")
        return r.stdout + r.stderr, []
    rows = []
    for line in r.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("what", "---"):
            rows.append(cells)
    return r.stdout, rows


def micro_table(rows):
    if not rows:
        return "(not run)"
    out = ["| what | ns | per second |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------- throughput

def bench_tables(all_runs):
    runs = [r for r in all_runs if not r.get("discarded")]
    fmt = vsq.fmt
    out = ["| request | mode | ok | MiB/s | req/s | notifies/s | CPU µs / request, all but vCPU threads "
           "| CPU µs / request, Ferry's disk worker |",
           "|---|---|---|---|---|---|---|---|"]
    summary = {}
    keys = ("mib_s", "req_s", "notifies_s", "io_cpu_us_per_req", "worker_cpu_us_per_req")
    for bs, m, rs, s in bd.mode_summaries(runs, SIZES, MODES, keys):
        summary[(bs, m)] = s
        ok = sum(bool(r.get("ok")) for r in rs)
        out.append(f"| {bs} | {MODE_NAMES[m]} | {ok}/{len(rs)} | {fmt(s['mib_s'], 1)} "
                   f"| {fmt(s['req_s'])} | {fmt(s['notifies_s'])} "
                   f"| {fmt(s['io_cpu_us_per_req'], 2)} | {fmt(s['worker_cpu_us_per_req'], 2)} |")
    out.append("")
    out += ["| request | VMM | iommu=on / off, MiB/s (medians) | per round | "
            "CPU per request, on / off (medians) |",
            "|---|---|---|---|---|"]
    derived = {}

    def m0(bs, m, k):
        s = summary.get((bs, m), {}).get(k)
        return s[0] if s else None

    for bs in SIZES:
        d = derived.setdefault(bs, {})
        for vmm, off, on in (("Ferry", "ferry", "ferry-iommu"), ("QEMU", "qemu", "qemu-iommu")):
            a, b = m0(bs, on, "mib_s"), m0(bs, off, "mib_s")
            ratio = a / b if a and b else None
            rounds = []
            for rnd in range(1, ROUNDS + 1):
                x = [r["mib_s"] for r in runs if r["bs"] == bs and r["round"] == rnd
                     and r.get("ok") and r["mode"] == on]
                y = [r["mib_s"] for r in runs if r["bs"] == bs and r["round"] == rnd
                     and r.get("ok") and r["mode"] == off]
                if x and y:
                    rounds.append(x[0] / y[0])
            ca, cb = m0(bs, on, "io_cpu_us_per_req"), m0(bs, off, "io_cpu_us_per_req")
            cpu = ca / cb if ca and cb else None
            d[vmm] = {"on_over_off": ratio, "on_over_off_rounds": rounds, "cpu_on_over_off": cpu}
            pr = (", ".join(f"{x:.2f}" for x in rounds) + f" ({statistics.median(rounds):.2f})"
                  if rounds else "–")
            out.append(f"| {bs} | {vmm} | {'–' if ratio is None else f'{ratio:.2f}'} | {pr} "
                       f"| {'–' if cpu is None else f'{cpu:.2f}'} |")
    out.append("")
    out += ["| request | Ferry / QEMU, MiB/s, iommu off | Ferry / QEMU, iommu=on |",
            "|---|---|---|"]
    for bs in SIZES:
        f_off, q_off = m0(bs, "ferry", "mib_s"), m0(bs, "qemu", "mib_s")
        f_on, q_on = m0(bs, "ferry-iommu", "mib_s"), m0(bs, "qemu-iommu", "mib_s")
        r_off = f_off / q_off if f_off and q_off else None
        r_on = f_on / q_on if f_on and q_on else None
        derived[bs]["ferry_over_qemu_off"] = r_off
        derived[bs]["ferry_over_qemu_on"] = r_on
        out.append(f"| {bs} | {'–' if r_off is None else f'{r_off:.2f}'} "
                   f"| {'–' if r_on is None else f'{r_on:.2f}'} |")
    fails = [r for r in runs if not r.get("ok")]
    noisy = [r for r in runs if r.get("others_cpu_pct", 0) > bd.QUIET_PCT]
    dropped = [r for r in all_runs if r.get("discarded")]
    out.append("")
    out.append(f"{len(dropped)} run{'s' if len(dropped) != 1 else ''} discarded and run again "
               f"(the rest of the machine used more than {bd.QUIET_PCT:g} % of a CPU meanwhile); "
               f"{len(noisy)} counted run{'s' if len(noisy) != 1 else ''} still over that "
               f"after {bd.RETRIES} retries.")
    if fails:
        out.append("")
        out += [f"- failed: {r['bs']} {r['mode']} round {r['round']}: {r.get('error')}" for r in fails]
    return ("\n".join(out),
            {f"{bs} {m}": {k: (v[0] if v else None) for k, v in s.items()}
             for (bs, m), s in summary.items()},
            derived)


# ---------------------------------------------------------------------------- migration

def mig_cmdline(dma):
    return f"workload=dma-verify dma={dma} size={MIG_SIZE_MIB}M iommu=on remap=on"


def migration_runs(jsonl):
    runs = []
    port = 47600
    for dma in MIG_WORKLOADS:
        for rnd in range(1, MIG_ROUNDS + 1):
            # Alternate which VMM goes first.
            modes = MIG_MODES if rnd % 2 else MIG_MODES[::-1]
            for mode in modes:
                port += 1
                disk = None
                if dma == "blk":
                    disk = os.path.join(WORK, f"mig-{dma}-{mode}-{rnd}.raw")
                    with open(disk, "wb") as f:
                        f.truncate(2 * MIG_SIZE_MIB * bd.MIB)  # the guest writes what it reads
                    qdev = ["-device", QEMU_BLK + IOMMU_PROPS,
                            "-drive", f"file={disk},if=none,id=d0,{QEMU_DRIVE}"]
                    fdev = ["--disk", f"path={disk},iommu=on"]
                else:
                    qdev = ["-device", "virtio-rng-pci,disable-legacy=on" + IOMMU_PROPS]
                    fdev = ["--rng", "src=/dev/urandom,iommu=on"]
                key = f"iommu-{dma}"
                vsq.WORKLOADS[key] = dict(
                    name=f"dma-verify dma={dma} iommu=on remap=on over {MIG_SIZE_MIB} MiB, 1 GiB, 1 vCPU",
                    mem="1G", cpus=1, cmdline=mig_cmdline(dma), kind="dma-verify",
                    qemu_args=["-machine", QEMU_MACHINE, "-device", "virtio-iommu-pci"] + qdev,
                    ferry_args=fdev)
                rec = vsq.one_run(key, mode, rnd, port)
                rec["dma"] = dma
                rec["loadavg_after"] = bd.loadavg()
                runs.append(rec)
                with open(jsonl, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if rec["ok"]:
                    log(f"migration {dma} {mode} round {rnd}: total {rec['total_ms']} ms, "
                        f"downtime {rec['downtime_ms']} ms, {rec['sent_mib']:.0f} MiB sent, "
                        f"{rec['syncs']} syncs")
                else:
                    log(f"migration {dma} {mode} round {rnd}: FAILED: {rec.get('error')}")
                if disk:
                    os.unlink(disk)
    return runs


MIG_KEYS = [("total_ms", "total ms", 0), ("downtime_ms", "downtime ms", 0),
            ("pause_resume_ms", "pause→resume ms", 0), ("sent_mib", "MiB sent", 0),
            ("syncs", "dirty syncs", 0), ("check_s", "guest went on, s", 1)]


def migration_tables(runs):
    out = []
    ratios = {}
    for dma in MIG_WORKLOADS:
        rs = [r for r in runs if r["dma"] == dma]
        if not rs:
            continue
        out += [f"**`{mig_cmdline(dma)}`**, 1 GiB, 1 vCPU", "",
                "| VMM | ok | " + " | ".join(c for _, c, _ in MIG_KEYS) + " |",
                "|---|---|" + "---|" * len(MIG_KEYS)]
        meds = {}
        for mode in MIG_MODES:
            mr = [r for r in rs if r["mode"] == mode]
            if not mr:
                continue
            cells = []
            for k, _, p in MIG_KEYS:
                s = vsq.stats(mr, k)
                meds[(mode, k)] = s[0] if s else None
                cells.append(vsq.fmt(s, p))
            ok = sum(r["ok"] for r in mr)
            out.append(f"| {vsq.MODES[mode]} | {ok}/{len(mr)} | " + " | ".join(cells) + " |")
        cells = []
        rat = {}
        for k, _, _ in MIG_KEYS:
            f, q = meds.get(("ferry-lo", k)), meds.get(("qemu-bitmap", k))
            if f is not None and q:
                rat[k] = f / q
                cells.append(f"{rat[k]:.2f}")
            else:
                cells.append("–")
        ratios[dma] = rat
        out.append("| Ferry / QEMU (medians) | | " + " | ".join(cells) + " |")
        # Per round, the three figures the issue asks for.
        per = []
        for rnd in range(1, MIG_ROUNDS + 1):
            f = next((r for r in rs if r["pair"] == rnd and r["mode"] == "ferry-lo" and r["ok"]), None)
            q = next((r for r in rs if r["pair"] == rnd and r["mode"] == "qemu-bitmap" and r["ok"]), None)
            if f and q and q.get("total_ms") and q.get("downtime_ms") and q.get("sent_mib"):
                per.append(f"{f['total_ms'] / q['total_ms']:.2f} / {f['downtime_ms'] / q['downtime_ms']:.2f}"
                           f" / {f['sent_mib'] / q['sent_mib']:.2f}")
        if per:
            out += ["", "Ferry / QEMU per round (total / downtime / bytes): " + "; ".join(per) + "."]
        for r in rs:
            if not r["ok"]:
                out.append(f"\n- failed: {r['mode']} round {r['pair']}: {r.get('error')}")
        out.append("")
    return "\n".join(out), ratios


# ---------------------------------------------------------------------------- report

KEEP_MARK = "<!-- Written by hand below this line; bench_viommu.py keeps it. -->"
MACHINE_NOTE = bd.MACHINE_NOTE


def quiet_note(bench):
    loads = [r["loadavg"] for r in bench]
    others = [r["others_cpu_pct"] for r in bench
              if r.get("others_cpu_pct") is not None and not r.get("discarded")]
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
    rest = ""
    if others:
        rest = (f" CPU used by everything but the benchmark's VMM during each throughput run "
                f"(from /proc/stat, less the VMM's own CPU time; a run over {bd.QUIET_PCT:g} % "
                f"is run again, {bd.RETRIES} times at most): {min(others):.0f}–{max(others):.0f} % "
                f"of one CPU in the counted runs, median {statistics.median(others):.0f} %; the "
                f"1-minute load average at the runs' starts {min(loads):.2f}–{max(loads):.2f} "
                f"(it counts the previous run's VM, which keeps two threads busy).")
    return first + rest


def write_report(micro_text, micro_rows, bench, mig, started, finished, cmd, mach, disk_note):
    btab, bsum, derived = bench_tables(bench) if bench else ("(not run)", {}, {})
    mtab, ratios = migration_tables(mig) if mig else ("(not run)", {})
    utab = micro_table(micro_rows)
    doc = {"date": started, "finished": finished, "machine": mach, "machine_note": MACHINE_NOTE,
           "command": cmd, "quiet": {"want_load_below": QUIET_LOAD, "waited_s": QUIET_WAITED_S,
                                     "load_at_start": QUIET_START_LOAD, "max_wait_s": QUIET_WAIT_S},
           "micro": {"rows": micro_rows, "output": micro_text},
           "rounds": ROUNDS, "secs": SECS, "sizes": SIZES, "modes": MODES, "region": REGION,
           "memory": BENCH_MEM, "disk_mib": DISK_MIB, "disk_cache": disk_note,
           "qemu_machine": QEMU_MACHINE, "qemu_blk": QEMU_BLK, "qemu_drive": QEMU_DRIVE,
           "quiet_pct": bd.QUIET_PCT, "retries": bd.RETRIES,
           "summary": bsum, "derived": derived,
           "migration": {"workloads": {d: mig_cmdline(d) for d in MIG_WORKLOADS},
                         "rounds": MIG_ROUNDS, "size_mib": MIG_SIZE_MIB,
                         "downtime_limit_ms": vsq.DOWNTIME_MS, "settle_s": vsq.SETTLE_S},
           "migration_ratios_ferry_over_qemu": ratios,
           "bench_runs": bench, "migration_runs": mig}
    bd.save_json("viommu", doc)
    md_path = os.path.join(OUT, "viommu.md")
    kept = bd.kept_part("viommu", KEEP_MARK)
    changes = bd.worktree_note(mach)
    md = f"""# virtio-iommu: requests per second, virtio-blk with the vIOMMU on and off, the `iommu=on` guest migrated (Ferry and QEMU)

Measured {started} – {finished} on {mach['cpu']}, {mach['cores']} cores, {mach['memory']} RAM,
Linux {mach['kernel']}, nested PVM-based KVM (guest ring 0 emulated, ring 3 native); {mach['qemu']};
Ferry: the binaries of the checkout at {mach['git_head']} (its head when the run started)
as built {mach['ferry_built']} (copied before the run; sha256 in the JSON{changes}).
{MACHINE_NOTE} {quiet_note(bench)}

Command: `{cmd}` (raw runs in [viommu.json](viommu.json)). It runs the three parts below in
this order, one thing at a time.

## 1. Requests through the device (`devices/benches/viommu_requests.rs`)

Host-side only, no guest: Ferry's request handler (`devices::viommu::serve`, the table's
write lock included) called in a loop, best of five runs. Rows: *MAP + UNMAP of a page*:
one MAP then one UNMAP of a 4 KiB page in a domain that keeps 10,000 other mappings (ns per
pair; pairs per second, so twice as many requests); *4 KiB device write, no vIOMMU*: a
device's 4 KiB write into guest RAM as a device not behind the vIOMMU makes it
(`GuestRam::write`); *through a domain*: the same write by a device behind the vIOMMU, its
address an IOVA translated through a domain of 14,096 mappings (table read lock, lookup,
permission check); *translation's cost per write*: the difference.

{utab}

## 2. virtio-blk throughput, vIOMMU on and off: `workload=dma-bench dma=blk bs=<size> secs={SECS} size={REGION}` [`iommu=on`]

The test guest's `dma-bench` (test_guest/README.md): one vCPU, {BENCH_MEM.replace('G', ' GiB')} of guest RAM, one
virtio-blk queue with up to 64 requests in flight, each one data descriptor of `bs` bytes,
read sequentially from a {DISK_MIB} MiB raw file of random bytes (written, fsynced and read
once before the runs, so in the page cache: {disk_note or 'fincore not available to confirm'})
into a {REGION.replace('M', ' MiB')} region, completion by polling. With `iommu=on` the guest first attaches the disk's
endpoint to a domain of the virtio-iommu and maps the region (2 MiB windows at IOVAs from
1 TiB) and its driver memory, then gives the disk IOVAs only: every descriptor, header,
data buffer, status byte and ring access the device makes is translated. Nothing is
unmapped during the run, so this is the cost of translation, not of MAP/UNMAP traffic.

Modes: *Ferry, iommu off*: `--disk path=...` (no virtio-iommu at all); *Ferry, iommu=on*:
`--disk path=...,iommu=on`. *QEMU*: `-machine {QEMU_MACHINE}`, `-device {QEMU_BLK}` on
`-drive {QEMU_DRIVE}` (off); *QEMU virtio-iommu-pci*: the same plus `-device
virtio-iommu-pci` and `iommu_platform=on` on the disk (on). {ROUNDS} round{'s' if ROUNDS != 1 else ''} per request size, each running every mode once, one VM at a time,
in the order {', '.join(MODES)} rotated by one more mode each round. The guest first reads one
request per buffer of its region (warm-up, not timed), then reads for {SECS} s by its TSC;
MiB = 2^20 bytes.

Figures: median (min–max) over the rounds. *notifies/s*: the guest's notifications per
second (it notifies only when the device has not set `VIRTQ_USED_F_NO_NOTIFY`). *CPU µs /
request*: CPU time of the VMM's threads other than the vCPU's (read from /proc every 20
ms) over every request the guest made (warm-up too); and of Ferry's disk worker thread
alone, which serves the queue and does every translation, `pread` and dirty mark. Second
table: *iommu=on / off*: the ratio of the MiB/s medians (below 1: what the vIOMMU costs),
and per round; *CPU per request, on / off*: the ratio of the all-but-vCPU CPU medians.
Third table: Ferry's MiB/s median over QEMU's, without and with the vIOMMU.

{btab}

## 3. The `iommu=on` guest migrated, Ferry against QEMU

`dma-verify iommu=on remap=on` (test_guest/README.md) with `size={MIG_SIZE_MIB}M`, 1 GiB, 1
vCPU: only the device writes the {MIG_SIZE_MIB} MiB region, through the vIOMMU (IOVAs only);
every pass the guest unmaps and maps again one 2 MiB window while the device works, and
checks every page of the region against what the device last wrote there. *blk*: virtio-blk
reads each page from a sparse {2 * MIG_SIZE_MIB} MiB disk file the guest wrote at start (Ferry
`--disk path=...,iommu=on`; QEMU `-device {QEMU_BLK}{IOMMU_PROPS}`); *rng*: virtio-rng fills
each page with random bytes and the guest keeps a hash per page (Ferry `--rng
src=/dev/urandom,iommu=on`; QEMU `-device virtio-rng-pci,disable-legacy=on{IOMMU_PROPS}`);
QEMU also `-machine {QEMU_MACHINE} -device virtio-iommu-pci`. `nested-dirty=` is left off
(QEMU does not offer Ferry's extension, so both run the same guest). Moved over TCP on
loopback, {vsq.SETTLE_S:g} s after the guest's first `dma-verified` line, the same downtime
limit ({vsq.DOWNTIME_MS} ms) and no bandwidth limit, driven by bench_vs_qemu.py's code as in
[vs-qemu.md](vs-qemu.md) and [dma.md](dma.md): Ferry through its API (`ferry-remote
send-migration` / `receive-migration`, dirty rings; the vIOMMU's table, the devices' DMA
logs and the migration all Ferry's own), QEMU through QMP (`migrate`, its default dirty
bitmap; its virtio-iommu's state in its device state), both destinations opening the same
disk file. {MIG_ROUNDS} round{'s' if MIG_ROUNDS != 1 else ''} per device, the VMM that goes first alternating. A run counts only if
the guest goes on on the destination: two more `dma-verified` lines (each a pass that
checked every page of the region) and no `MISMATCH`/`FAIL`.

Figures: median (min–max) over the rounds. *total*, *downtime*, *MiB sent*, *dirty
syncs*: each VMM's own report (QEMU's `query-migrate`; Ferry's `migration-info`; MiB sent =
`ram.transferred`); *pause→resume*: the guest's pause measured on one host clock (QMP
events; Ferry's two logs); *guest went on*: seconds until the destination's second
`dma-verified` line. *Ferry / QEMU*: the ratio of the medians (below 1: Ferry's is
smaller), then each round's ratios of total time, downtime and bytes.

{mtab}
{KEEP_MARK}{kept}"""
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(md)
    return "\n\n".join([utab, btab, mtab])


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for m in MODES:
        if m not in MODE_NAMES:
            sys.exit(f"unknown mode {m} ({' '.join(MODE_NAMES)})")
    for d in MIG_WORKLOADS:
        if d not in ("blk", "rng"):
            sys.exit(f"unknown migration workload {d} (blk rng)")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = os.environ.get("BENCH_CMD", "scripts/dev_cli.sh bench viommu")
    mach = bd.machine()
    jsonl = os.path.join(WORK, "runs.jsonl")
    log("requests: devices/benches/viommu_requests")
    micro_text, micro_rows = micro_run()
    if micro_text:
        print(micro_text, file=sys.stderr)
    bench, mig, disk_note = [], [], None
    try:
        if ROUNDS > 0 and SIZES and MODES:
            disk = os.path.join(WORK, "bench.raw")
            log(f"writing a {DISK_MIB} MiB disk file of random bytes: {disk}")
            bd.make_disk(disk, DISK_MIB)
            disk_note = bd.cached_note(disk)
            log(f"disk: {disk_note}")
            bd.throughput_runs(bench, SIZES, MODES, ROUNDS, disk, jsonl, bench_argv)
            os.unlink(disk)
        if MIGRATE:
            mig = migration_runs(jsonl)
    finally:
        vsq.stop_all()
    finished = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(write_report(micro_text, micro_rows, bench, mig, started, finished, cmd, mach,
                       disk_note))
    log(f"written to {OUT}/viommu.md and viommu.json")


if __name__ == "__main__":
    main()

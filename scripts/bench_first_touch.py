#!/usr/bin/env python3
"""What a destination pays before any network: faulting in fresh anonymous memory.

A migration's destination writes every non-zero page it receives into guest RAM it has
never touched, so the host's cost of a first touch caps the page-data rate of a real
migration, whatever the wire carries. This measures that cost for 1 GiB the way Ferry's
destination faults memory in (madvise(MADV_POPULATE_WRITE), 1 MiB at a time, 4 KiB pages)
in three states:

- warm: memory freed by this process a moment ago (still backed by whatever runs below
  this kernel);
- cold: the same after waiting COLD_WAIT_S seconds, past the delay after which a kernel
  with free page reporting (virtio-balloon) hands freed memory back to the outer host;
- huge: cold again, with transparent huge pages asked for (MADV_HUGEPAGE);
- after THP / after 4K: cold, right after AFTER_GIB of memory was faulted in and freed
  with, or without, transparent huge pages (as a QEMU run, whose guest RAM asks for them,
  or a Ferry run, whose does not, leaves the host for the next one).

Prints a table and writes docs/benchmarks/first-touch.md. Python standard library only.
Run: scripts/dev_cli.sh bench first-touch
"""
import datetime
import mmap
import os
import platform
import statistics
import sys
import time

GIB = 1 << 30
STEP = 1 << 20
MADV_POPULATE_WRITE = 23
ROUNDS = int(os.environ.get("ROUNDS", "3"))
COLD_WAIT_S = float(os.environ.get("COLD_WAIT_S", "5"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


AFTER_GIB = int(os.environ.get("AFTER_GIB", "4"))


def fault_in_and_free(size, huge):
    """Faults in `size` bytes of fresh anonymous memory, 1 MiB per madvise call, with or
    without transparent huge pages, and frees it; returns the seconds the faults took.
    (Also used by bench_vs_qemu.py to leave the host's free memory in one state.)"""
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
        start = time.perf_counter()
        for off in range(0, size, STEP):
            m.madvise(MADV_POPULATE_WRITE, off, min(STEP, size - off))
        return time.perf_counter() - start
    finally:
        m.close()


def populate(huge):
    """Seconds to fault in 1 GiB of fresh anonymous memory."""
    return fault_in_and_free(GIB, huge)


SMALL = 150 << 20


def after(huge, touch_huge=False, size=GIB):
    """Seconds per GiB to fault in `size` bytes (with transparent huge pages if
    `touch_huge`) COLD_WAIT_S after AFTER_GIB was faulted in and freed, with or without
    them."""
    fault_in_and_free(AFTER_GIB * GIB, huge)
    time.sleep(COLD_WAIT_S)
    return fault_in_and_free(size, touch_huge) * GIB / size


def main():
    results = {"cold": [], "warm": [], "huge": [], "after THP": [], "after 4K": [],
               "huge after 4K": [], "150 MiB after 4K": [], "150 MiB huge after 4K": []}
    for _ in range(ROUNDS):
        time.sleep(COLD_WAIT_S)
        results["cold"].append(populate(False))
        results["warm"].append(populate(False))
        time.sleep(COLD_WAIT_S)
        results["huge"].append(populate(True))
        results["after THP"].append(after(True))
        results["after 4K"].append(after(False))
        results["huge after 4K"].append(after(False, touch_huge=True))
        results["150 MiB after 4K"].append(after(False, size=SMALL))
        results["150 MiB huge after 4K"].append(after(False, touch_huge=True, size=SMALL))
    rows = []
    for state, what in (("cold", f"freed memory, {COLD_WAIT_S:g} s later"),
                        ("warm", "freed memory, at once"),
                        ("huge", f"freed memory, {COLD_WAIT_S:g} s later, MADV_HUGEPAGE"),
                        ("after THP", f"as cold, {AFTER_GIB} GiB with MADV_HUGEPAGE faulted in "
                                      f"and freed just before"),
                        ("after 4K", f"as cold, {AFTER_GIB} GiB with 4 KiB pages faulted in "
                                     f"and freed just before"),
                        ("huge after 4K", "as after 4K, MADV_HUGEPAGE"),
                        ("150 MiB after 4K", "as after 4K, 150 MiB (per GiB)"),
                        ("150 MiB huge after 4K", "as after 4K, 150 MiB, MADV_HUGEPAGE (per GiB)")):
        v = results[state]
        med = statistics.median(v)
        rows.append(f"| {state} | {what} | {med * 1000:.0f} ({min(v) * 1000:.0f}–{max(v) * 1000:.0f}) "
                    f"| {8 / med:.1f} |")
    table = "\n".join(["| state | memory | ms per GiB | Gbit/s |", "|---|---|---|---|"] + rows)
    print(table)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = f"""# First touch of fresh memory

Measured {date} on {cpu}, {os.cpu_count()} cores, Linux {platform.release()}. Command:
`scripts/dev_cli.sh bench first-touch` ({ROUNDS} rounds; median (min–max)).

A destination writes every non-zero page it receives into memory it has never touched, so
this is the most page data a real migration can move per second here before any network
or protocol cost: 1 GiB of anonymous memory faulted in with `madvise(MADV_POPULATE_WRITE)`,
1 MiB per call (what Ferry's destination does per received chunk), 4 KiB pages unless
marked. *cold*: memory this process freed {COLD_WAIT_S:g} s earlier (a kernel with
virtio-balloon free page reporting has handed it back to the outer host by then); *warm*:
freed a moment earlier. *after THP* / *after 4K*: cold, with {AFTER_GIB} GiB faulted in
and freed by this process just before the wait, with or without transparent huge pages;
what one migration run leaves the host for the next (QEMU asks for huge pages for guest RAM,
Ferry does not). `scripts/bench_vs_qemu.py` faults in and frees memory with 4 KiB pages
before every run so that no mode pays for what the one before it left. The last three rows
compare huge pages with 4 KiB pages in that state, for 1 GiB and for 150 MiB. They settle
no rule: a huge page is either still backed by the outer host or must come back from it,
which one a process gets varies, and the order flips from run to run (an ad hoc C test the
same day, after a 4 KiB fill: 1 GiB 0.38–0.47 s with huge pages against 0.62–1.01 s
without, in 5 of 5 tries; 150 MiB 46–430 ms against 63–126 ms). What Ferry's destination does was settled by migrations
instead (`vs-qemu` bench, Ferry modes only): huge pages on all of its RAM made the 150 MiB
`dirty` guest faster in one set of runs and 2–3× slower in two, the 8 GiB one up to 1.8×
slower; asked for only where the first pass left whole 2 MiB stretches for later, they
made the 2 GiB `verify` guest's migration 22 % (loopback) and 33 % (namespaces) shorter.

{table}
"""
    out = os.path.join(ROOT, "docs", "benchmarks")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "first-touch.md"), "w") as f:
        f.write(md)
    print("\nwritten to docs/benchmarks/first-touch.md")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Side-by-side live-migration benchmark: QEMU against Ferry on the same test guest.

Run through scripts/bench_vs_qemu.sh (`scripts/dev_cli.sh bench vs-qemu`), which makes the
two network-namespace hosts and passes their names in the environment. For every
workload, PAIRS times in a row, one run of each mode in turn (QEMU with KVM's dirty ring,
QEMU with KVM's dirty bitmap, Ferry over loopback, Ferry between the namespaces), one
migration at a time. Each run: boot source and destination, wait for the guest's first
progress line, migrate with the same downtime target, then check that the guest goes on
on the destination with nothing lost (a broken guest is a failed run, not a result).
Writes docs/benchmarks/vs-qemu.json (raw runs) and vs-qemu.md (table), prints the table.

Python 3.11 standard library only.
"""

import ctypes
import datetime
import hashlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

from bench_first_touch import fault_in_and_free

ROOT = os.environ.get("ROOT") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRY = os.environ.get("FERRY") or os.path.join(ROOT, "target/release/ferry")
REMOTE = os.environ.get("REMOTE") or os.path.join(ROOT, "target/release/ferry-remote")
GUEST = os.environ.get("GUEST") or os.path.join(ROOT, "target/test-guest/guest.elf")
QEMU = os.environ.get("QEMU", "qemu-system-x86_64")
QEMU_CPU = os.environ.get("FERRY_QEMU_CPU", "qemu64")

PAIRS = int(os.environ.get("PAIRS", "5"))
DOWNTIME_MS = int(os.environ.get("DOWNTIME_MS", "300"))
# QEMU's max-bandwidth is in bytes per second: 100 GB/s never limits here.
MAX_BANDWIDTH = 100 * 10**9
BOOT_TIMEOUT_S = float(os.environ.get("BOOT_TIMEOUT_S", "180"))
MIGRATION_TIMEOUT_S = float(os.environ.get("MIGRATION_TIMEOUT_S", "120"))
CHECK_TIMEOUT_S = float(os.environ.get("CHECK_TIMEOUT_S", "60"))
# After the first progress line, let the workload run this long before migrating. Longer
# than the 2 s after which this machine's kernel reports freed memory to the outer host
# (virtio-balloon free page reporting), so no mode's destination gets the memory the run
# before it just freed, still backed: on this host a first touch of reported memory costs
# several times more than of memory freed a moment ago, and the order of the modes would
# otherwise decide who pays it.
SETTLE_S = float(os.environ.get("SETTLE_S", "3"))
# Before every run, this much memory (GiB) more than the run before it used (both VMMs' peak
# RSS) is faulted in with 4 KiB pages and freed. Memory freed with transparent huge pages,
# as QEMU's guest RAM is, costs about twice as much to touch again a few seconds later as
# memory freed in 4 KiB pages (docs/benchmarks/first-touch.md, "after THP"): without this,
# whichever mode ran after a QEMU run paid for it (on b, Ferry's total 4.6-5.3 s right
# after QEMU against 2.3-2.9 s right after Ferry, in the same rounds).
RESET_MARGIN_GIB = int(os.environ.get("RESET_MARGIN_GIB", "1"))
# How long an idle guest must stay up on the destination.
IDLE_WATCH_S = 2.0

WORK = os.environ.get("WORK") or "/tmp"
OUT = os.environ.get("OUT") or os.path.join(ROOT, "docs/benchmarks")
NS_A = os.environ.get("NS_A", "")
NS_B = os.environ.get("NS_B", "")
ADDR_B = os.environ.get("ADDR_B", "")

MIB = 1 << 20
PAGE = 4096

WORKLOADS = {
    "a": dict(name="a: 150 MiB, dirty 1M+99M, 1 vCPU", mem="150M", cpus=1,
              cmdline="workload=dirty start=1M size=99M", kind="dirty"),
    "b": dict(name="b: 2 GiB, verify 1M+1G, 2 vCPUs", mem="2G", cpus=2,
              cmdline="workload=verify start=1M size=1G", kind="verify"),
    "c": dict(name="c: 4 GiB, idle, 1 vCPU", mem="4G", cpus=1,
              cmdline="workload=idle", kind="idle"),
    "d": dict(name="d: 8 GiB, dirty 1M+64M, 1 vCPU", mem="8G", cpus=1,
              cmdline="workload=dirty start=1M size=64M", kind="dirty"),
}
MODES = {
    "qemu-ring": "QEMU dirty ring (4096)",
    "qemu-bitmap": "QEMU dirty bitmap",
    "ferry-lo": "Ferry loopback",
    "ferry-netns": "Ferry netns (veth)",
    # The same with `--switch-over Fits` (pause as soon as the rest fits the downtime,
    # QEMU's rule) in place of the default MinDowntime.
    "qemu-ring-ac": "QEMU dirty ring (4096), auto-converge",
    "qemu-bitmap-ac": "QEMU dirty bitmap, auto-converge",
    "ferry-lo-ac": "Ferry loopback, auto-converge",
    "ferry-netns-ac": "Ferry netns (veth), auto-converge",
    "ferry-lo-fits": "Ferry loopback, switch-over Fits",
    "ferry-netns-fits": "Ferry netns (veth), switch-over Fits",
    # Several streams on both: QEMU's multifd with 2 channels, Ferry's 2 connections.
    "qemu-ring-mfd": "QEMU dirty ring (4096), multifd 2 channels",
    "qemu-bitmap-mfd": "QEMU dirty bitmap, multifd 2 channels",
    "ferry-lo-c2": "Ferry loopback, 2 connections",
    "ferry-netns-c2": "Ferry netns (veth), 2 connections",
    # The same with the vCPUs at their own priority (`--no-yield-vcpus`), as QEMU's are.
    "ferry-lo-c2-noyield": "Ferry loopback, 2 connections, vCPUs not yielding",
    "ferry-netns-c2-noyield": "Ferry netns (veth), 2 connections, vCPUs not yielding",
    # Postcopy after the same number of precopy passes on both (not in the default run).
    "qemu-postcopy": f"QEMU postcopy after {os.environ.get('POSTCOPY_AFTER', '2')} passes",
    "ferry-postcopy": f"Ferry postcopy after {os.environ.get('POSTCOPY_AFTER', '2')} passes",
}
DEFAULT_MODES = "qemu-ring qemu-bitmap ferry-lo ferry-netns"
POSTCOPY_AFTER = int(os.environ.get("POSTCOPY_AFTER", "2"))
# Streams in the several-stream modes (QEMU multifd channels, Ferry connections).
STREAMS = 2
PROGRESS = {
    "dirty": re.compile(r"guest: pass (\d+) (\d+)\r?\n"),
    "verify": re.compile(r"guest: verified (\d+) (\d+)\r?\n"),
    "dma-verify": re.compile(r"guest: dma-verified (\d+) (\d+)\r?\n"),
}
READY = re.compile(r"guest: ready [^\n]*\n")
BAD = re.compile(r"guest: (MISMATCH|FAIL|bad argument)[^\n]*")


class RunFailed(Exception):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- processes

_LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent():
    # A child never outlives this driver, whatever ends it.
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


LIVE = set()


class Proc:
    """A child process; reaped with wait4 so its peak RSS (ru_maxrss) is known too."""

    def __init__(self, argv, logpath, netns=None):
        if netns:
            argv = ["ip", "netns", "exec", netns] + argv  # ip execs argv: same pid
        self.argv = argv
        self.logpath = logpath
        with open(logpath, "ab") as f:
            self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f,
                                      stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self.pid = self.p.pid
        self.started = time.monotonic()
        self.status = None  # exit code once reaped (negative: signal)
        self.hwm_kib = None  # VmHWM, last read while the process lived
        self.maxrss_kib = None
        LIVE.add(self)

    def _reap(self):
        if self.status is not None:
            return
        try:
            pid, st, ru = os.wait4(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.status = -999
            LIVE.discard(self)
            return
        if pid:
            self.status = os.waitstatus_to_exitcode(st)
            self.maxrss_kib = ru.ru_maxrss
            self.p.returncode = self.status
            LIVE.discard(self)

    def alive(self):
        self._reap()
        return self.status is None

    def read_hwm(self):
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.hwm_kib = int(line.split()[1])
        except OSError:
            pass
        return self.hwm_kib

    def wait(self, timeout):
        """Waits for the process to end, reading its VmHWM meanwhile; True if it ended."""
        end = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > end:
                return False
            self.read_hwm()
            time.sleep(0.02)
        return True

    def stop(self, grace=10.0):
        if not self.alive():
            return
        self.read_hwm()
        try:
            self.p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not self.wait(grace):
            self.p.kill()
            self.wait(30)

    def peak_kib(self):
        return self.hwm_kib if self.hwm_kib else self.maxrss_kib

    def log_tail(self, n=6):
        try:
            with open(self.logpath, errors="replace") as f:
                return [l.rstrip() for l in f.readlines()[-n:]]
        except OSError:
            return []


def stop_all():
    for p in list(LIVE):
        p.stop(grace=5)


# ---------------------------------------------------------------------------- CPU time

CLK_TCK = os.sysconf("SC_CLK_TCK")
# vCPU threads: Ferry's `vcpuN`, QEMU's `CPU N/KVM`. Their time is the guest's (and KVM's
# dirty tracking on its behalf), not the migration's, so it is left out on both ends.
VCPU_THREAD = re.compile(r"^(vcpu\d+|CPU \d+/KVM)$")


def _stat_ticks(path):
    """user + system clock ticks from a /proc stat file (fields 14 and 15; the name in
    parentheses may hold spaces, so count from the last ')')."""
    with open(path) as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def cpu_sample(pid):
    """`(ticks, vcpus)`: the whole process's user + system clock ticks (threads that
    already ended included) and those of each live vCPU thread by thread id. None once the
    process is gone."""
    try:
        total = _stat_ticks(f"/proc/{pid}/stat")
        vcpus = {}
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    if VCPU_THREAD.match(f.read().strip()):
                        vcpus[tid] = _stat_ticks(f"/proc/{pid}/task/{tid}/stat")
            except (OSError, IndexError, ValueError):
                pass  # the thread ended meanwhile
    except (OSError, IndexError, ValueError):
        return None
    return total, vcpus


class CpuMeter:
    """CPU seconds one VMM process spent outside its vCPU threads between `start` and
    `stop`. Ferry's source ends its vCPU threads right after the pause, before the
    migration counts as done, while a process's total keeps the time of ended threads: so
    `poll` (called every 20 ms meanwhile) keeps each vCPU thread's last reading, and the
    process's in case it ends first. A paused vCPU no longer runs, so a thread's last
    reading is at most one poll short."""

    def __init__(self, proc):
        self.proc = proc
        self.first = self.last = None
        self.vcpu_first = {}
        self.vcpu_last = {}
        self.result = None
        # The guest's side of the same window: its vCPU threads' CPU seconds.
        self.guest = None

    def _take(self, sample):
        if sample is None:
            return
        self.last = sample[0]
        self.vcpu_last.update(sample[1])

    def start(self):
        sample = cpu_sample(self.proc.pid)
        if sample is not None:
            self.first = sample[0]
            self.vcpu_first = dict(sample[1])
        self._take(sample)

    def poll(self):
        if self.result is None:
            self._take(cpu_sample(self.proc.pid))

    def stop(self):
        """The migration's CPU seconds (the first call's answer; None: not measured)."""
        self.poll()
        if self.result is None and self.first is not None and self.last is not None:
            vcpu = sum(t - self.vcpu_first.get(tid, 0) for tid, t in self.vcpu_last.items())
            self.result = round((self.last - self.first - vcpu) / CLK_TCK, 3)
            self.guest = round(vcpu / CLK_TCK, 3)
        return self.result


def run_cmd(argv, timeout=30):
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=timeout, preexec_fn=_die_with_parent)
    return r.returncode, r.stdout, r.stderr


def read_text(path, encoding="latin-1"):
    """A file's text, "" when it cannot be read; latin-1 by default (serial logs may hold
    any byte)."""
    try:
        with open(path, "rb") as f:
            return f.read().decode(encoding, errors="replace")
    except OSError:
        return ""


def wait_until(what, cond, timeout, procs=(), step=0.05):
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        for p in procs:
            if not p.alive():
                raise RunFailed(f"{what}: {os.path.basename(p.logpath)}: process ended "
                                f"(status {p.status}): {p.log_tail(3)}")
            p.read_hwm()
        if time.monotonic() > end:
            raise RunFailed(f"{what}: timed out after {timeout:.0f} s")
        time.sleep(step)


def listening(pid, port):
    """Whether process pid's network namespace has a TCP socket listening on port."""
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
                        return True
        except (OSError, StopIteration):
            pass
    return False


def guest_ready(kind, cpus, path):
    text = read_text(path)
    m = BAD.search(text)
    if m:
        raise RunFailed(f"guest before migration: {m.group(0).strip()}")
    if kind == "idle":
        return bool(READY.search(text))
    seen = {int(m.group(1)) for m in PROGRESS[kind].finditer(text)}
    return all(c in seen for c in range(cpus))


def check_destination(w, serials, dst_path, offset, dst_proc, running):
    """The guest goes on on the destination: for dirty/verify, every vCPU prints two more
    progress lines there (the second ends a pass wholly run on the destination, which for
    verify checked every page of its share); for idle, it stays up. Nothing reports a loss.
    Returns the seconds it took."""
    t0 = time.monotonic()
    kind, cpus = w["kind"], w["cpus"]

    def progressed():
        for path in serials:
            m = BAD.search(read_text(path))
            if m:
                raise RunFailed(f"guest on destination: {m.group(0).strip()}")
        if kind == "idle":
            return time.monotonic() - t0 >= IDLE_WATCH_S
        counts = [0] * cpus
        for m in PROGRESS[kind].finditer(read_text(dst_path)[offset:]):
            c = int(m.group(1))
            if c < cpus:
                counts[c] += 1
        return min(counts) >= 2

    wait_until("guest progress on the destination", progressed, CHECK_TIMEOUT_S, [dst_proc])
    state = running()
    if state is not True:
        raise RunFailed(f"destination VM not running after migration: {state}")
    return time.monotonic() - t0


# ---------------------------------------------------------------------------- QMP

class Qmp:
    def __init__(self, path, timeout, proc):
        def connect():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return s
            except OSError:
                s.close()
                return None
        self.sock = wait_until(f"QMP socket {os.path.basename(path)}", connect, timeout, [proc])
        self.sock.settimeout(30)
        self.rf = self.sock.makefile("rb")
        self.events = []  # (name, host wall-clock seconds) of every event seen
        if "QMP" not in self._read():
            raise RunFailed("no QMP greeting")
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.rf.readline()
        if not line:
            raise RunFailed("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                ts = r.get("timestamp", {})
                self.events.append((r["event"], ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6))
                continue
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RunFailed(f"QMP {name}: {r['error'].get('desc')}")

    def close(self):
        try:
            self.rf.close()
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------- one run

def run_qemu(w, mode, d, port, rec):
    accel = "kvm,dirty-ring-size=4096" if mode.startswith("qemu-ring") else "kvm"
    base = [QEMU, "-accel", accel, "-cpu", QEMU_CPU, "-m", w["mem"], "-smp", str(w["cpus"]),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            # Thread names (`CPU N/KVM`), so that the CPU figures can leave the vCPUs out.
            "-name", "vsq,debug-threads=on",
            "-kernel", GUEST, "-append", w["cmdline"]] + w.get("qemu_args", [])
    src_serial, dst_serial = f"{d}/src.serial", f"{d}/dst.serial"
    src = Proc(base + ["-serial", f"file:{src_serial}",
                       "-qmp", f"unix:{d}/src.qmp,server=on,wait=off"], f"{d}/src.log")
    # multifd: the destination listens only once multifd is on (QEMU sizes its listen
    # backlog from the channel count when it starts listening; with `-incoming tcp:` the
    # extra channels' connections could wait out a SYN retry).
    multifd = mode.endswith("-mfd")
    incoming = "defer" if multifd else f"tcp:127.0.0.1:{port}"
    dst = Proc(base + ["-serial", f"file:{dst_serial}",
                       "-qmp", f"unix:{d}/dst.qmp,server=on,wait=off",
                       "-incoming", incoming], f"{d}/dst.log")
    sq = dq = None
    src_cpu, dst_cpu = CpuMeter(src), CpuMeter(dst)
    try:
        sq = Qmp(f"{d}/src.qmp", 30, src)
        dq = Qmp(f"{d}/dst.qmp", 30, dst)
        if multifd:
            for q in (sq, dq):
                q.cmd("migrate-set-capabilities",
                      {"capabilities": [{"capability": "multifd", "state": True}]})
                q.cmd("migrate-set-parameters", {"multifd-channels": STREAMS})
            dq.cmd("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        wait_until("destination listening", lambda: listening(dst.pid, port), 30, [dst])
        wait_until("guest's first progress line",
                   lambda: guest_ready(w["kind"], w["cpus"], src_serial), BOOT_TIMEOUT_S,
                   [src, dst])
        rec["boot_s"] = round(time.monotonic() - src.started, 2)
        time.sleep(SETTLE_S)
        sq.cmd("migrate-set-parameters",
               {"downtime-limit": DOWNTIME_MS, "max-bandwidth": MAX_BANDWIDTH})
        if mode.endswith("-ac"):
            # QEMU's own throttle, at its defaults (20 % first, 10 % a step), as Ferry's.
            sq.cmd("migrate-set-capabilities",
                   {"capabilities": [{"capability": "auto-converge", "state": True}]})
        postcopy = mode == "qemu-postcopy"
        if postcopy:
            for q in (sq, dq):
                q.cmd("migrate-set-capabilities",
                      {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
        src_cpu.start()
        dst_cpu.start()
        t0 = time.monotonic()
        sq.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        end = t0 + MIGRATION_TIMEOUT_S
        while True:
            info = sq.cmd("query-migrate")
            st = info.get("status")
            if st == "completed":
                break
            # QEMU counts a sync at the start of each pass: POSTCOPY_AFTER passes are done
            # when the next one starts.
            if (postcopy and st == "active"
                    and info.get("ram", {}).get("dirty-sync-count", 0) > POSTCOPY_AFTER):
                sq.cmd("migrate-start-postcopy")
                postcopy = False
            if st in ("failed", "cancelled"):
                raise RunFailed(f"QEMU migration {st}: {info.get('error-desc', '')}")
            if time.monotonic() > end:
                sq.cmd("migrate_cancel")
                ram = info.get("ram", {})
                raise RunFailed(
                    f"did not complete within {MIGRATION_TIMEOUT_S:.0f} s (status {st}, "
                    f"{ram.get('dirty-sync-count')} syncs, {ram.get('remaining', 0) // MIB} MiB "
                    f"remaining, {ram.get('transferred', 0) // MIB} MiB sent); cancelled")
            src.read_hwm()
            dst.read_hwm()
            src_cpu.poll()
            dst_cpu.poll()
            time.sleep(0.02)
        rec["wall_ms"] = round((time.monotonic() - t0) * 1000)
        rec["src_cpu_s"] = src_cpu.stop()
        rec["guest_cpu_s"] = src_cpu.guest
        rec["info"] = info
        # The source has nothing left to do (postmigrate): end it, as Ferry's ends itself.
        sq_events = list(sq.events)
        src.read_hwm()
        try:
            sq.cmd("quit")
        except (RunFailed, OSError):
            pass
        if not src.wait(30):
            src.stop()

        def running():
            st = dq.cmd("query-status").get("status")
            return True if st == "running" else st

        wait_until("destination status running",
                   lambda: dst_cpu.poll() or running() is True, 30, [dst])
        # The destination's share ends once it runs the guest (it loads the last pages and
        # the device state after the source called the migration complete).
        rec["dst_cpu_s"] = dst_cpu.stop()
        # The guest's pause as Ferry measures its own: the source's STOP event to the
        # destination's RESUME event (QMP timestamps, one host clock).
        stop = [t for e, t in sq_events if e == "STOP"]
        wait_until("RESUME event", lambda: dq.cmd("query-status") is not None and
                   any(e == "RESUME" for e, _ in dq.events), 5, [dst])
        resume = [t for e, t in dq.events if e == "RESUME"]
        if stop and resume:
            rec["pause_resume_ms"] = round((resume[0] - stop[0]) * 1000, 1)
        rec["check_s"] = round(check_destination(w, [src_serial, dst_serial], dst_serial, 0,
                                                 dst, running), 2)
        dst.read_hwm()
        try:
            dq.cmd("quit")
        except (RunFailed, OSError):
            pass
        if not dst.wait(30):
            dst.stop()
    finally:
        for q in (sq, dq):
            if q:
                q.close()
        src.stop()
        dst.stop()
        rec["src_hwm_kib"], rec["src_maxrss_kib"] = src.hwm_kib, src.maxrss_kib
        rec["dst_hwm_kib"], rec["dst_maxrss_kib"] = dst.hwm_kib, dst.maxrss_kib
        rec["src_peak_kib"], rec["dst_peak_kib"] = src.peak_kib(), dst.peak_kib()


def source_info(ssock, rec):
    """The source's own figures, read in the 300 ms before it ends itself (the
    destination's `total-time` counts from its receive-migration request)."""
    try:
        rc, out, err = run_cmd([REMOTE, "--api-socket", ssock, "migration-info"], 5)
        rec["src_info"] = json.loads(out) if rc == 0 and out.strip() else None
    except (ValueError, subprocess.TimeoutExpired):
        rec["src_info"] = None


def source_log_total(path):
    """`total-time` from the source's log line 'migration to ... completed: Some(N) ms total'."""
    m = re.search(r"migration to \S+ completed: Some\((\d+)\) ms total", read_text(path))
    return int(m.group(1)) if m else None


def log_time(path, needle):
    """Seconds since the epoch of the first line of a ferry log holding `needle` (ferry logs
    `[2026-11-29T14:52:50.115586Z INFO ] ...`, one host clock for both processes)."""
    for line in read_text(path).splitlines():
        if needle in line:
            m = re.match(r"\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z", line)
            if m:
                return datetime.datetime.fromisoformat(m.group(1)).replace(
                    tzinfo=datetime.timezone.utc).timestamp()
    return None


def ferry_pause_resume_ms(src_log, dst_log):
    """The guest's pause on one clock: the source's log line just before it pauses the vCPUs
    to the destination's just after it resumed them."""
    paused = log_time(src_log, "stop-and-copy: pausing the VM")
    resumed = log_time(dst_log, "after Complete")
    if paused is None:
        paused = log_time(src_log, "switching to postcopy")
    if resumed is None:
        resumed = log_time(dst_log, "postcopy: the VM runs here")
    if paused is None or resumed is None:
        return None
    return round((resumed - paused) * 1000, 1)


def run_ferry(w, mode, d, port, rec):
    netns = mode.startswith("ferry-netns")
    ns_a, ns_b = (NS_A, NS_B) if netns else (None, None)
    host = ADDR_B if netns else "127.0.0.1"
    listen = f"tcp:0.0.0.0:{port}" if netns else f"tcp:127.0.0.1:{port}"
    serial = f"{d}/serial.log"
    ssock, dsock = f"{d}/src.sock", f"{d}/dst.sock"
    dst = Proc([FERRY, "--api-socket", dsock], f"{d}/dst.log", ns_b)
    src = Proc([FERRY, "--api-socket", ssock, "--kernel", GUEST, "--cmdline", w["cmdline"],
                "--cpus", f"boot={w['cpus']}", "--memory", f"size={w['mem']}",
                "--serial", f"file={serial}"] + w.get("ferry_args", []), f"{d}/src.log", ns_a)
    helpers = []
    src_cpu, dst_cpu = CpuMeter(src), CpuMeter(dst)
    try:
        wait_until("API sockets", lambda: os.path.exists(ssock) and os.path.exists(dsock), 30,
                   [src, dst])
        recv = Proc([REMOTE, "--api-socket", dsock, "receive-migration", listen],
                    f"{d}/recv.out")
        helpers.append(recv)
        wait_until("destination listening", lambda: listening(dst.pid, port), 30, [dst, recv])
        wait_until("guest's first progress line",
                   lambda: guest_ready(w["kind"], w["cpus"], serial), BOOT_TIMEOUT_S,
                   [src, dst, recv])
        rec["boot_s"] = round(time.monotonic() - src.started, 2)
        time.sleep(SETTLE_S)
        src_cpu.start()
        dst_cpu.start()
        t0 = time.monotonic()
        extra = (["--memory-mode", "Postcopy", "--postcopy-after-passes", str(POSTCOPY_AFTER)]
                 if mode == "ferry-postcopy" else [])
        if mode.endswith("-fits"):
            extra = ["--switch-over", "Fits"]
        if "-c2" in mode:
            extra = ["--connections", str(STREAMS)]
        if mode.endswith("-noyield"):
            extra.append("--no-yield-vcpus")
        # Ferry throttles a guest that does not converge unless told not to; QEMU's
        # auto-converge is off unless asked for: neither throttles here, except in the
        # `-ac` modes, where both do.
        throttle = [] if mode.endswith("-ac") else ["--no-auto-converge"]
        send = Proc([REMOTE, "--api-socket", ssock, "send-migration", f"tcp:{host}:{port}",
                     "--downtime-ms", str(DOWNTIME_MS)] + throttle + extra,
                    f"{d}/send.out")
        helpers.append(send)
        end = t0 + MIGRATION_TIMEOUT_S
        while send.alive() or recv.alive():
            if time.monotonic() > end:
                rc, out, err = run_cmd([REMOTE, "--api-socket", ssock, "migration-info"], 10)
                try:
                    ram = json.loads(out).get("ram", {})
                except ValueError:
                    ram = {}
                run_cmd([REMOTE, "--api-socket", ssock, "cancel-migration"], 10)
                raise RunFailed(
                    f"did not complete within {MIGRATION_TIMEOUT_S:.0f} s "
                    f"({ram.get('dirty-sync-count')} syncs, {ram.get('remaining', 0) // MIB} MiB "
                    f"remaining, {ram.get('transferred', 0) // MIB} MiB sent); cancelled")
            if not send.alive() and send.status != 0:
                raise RunFailed(f"send-migration failed: {send.log_tail(3)}")
            if not send.alive() and "src_info" not in rec:
                # The source is done once its send-migration returned (and ends itself
                # soon after): read its CPU time first.
                rec["src_cpu_s"] = src_cpu.stop()
                rec["guest_cpu_s"] = src_cpu.guest
                source_info(ssock, rec)
            src_cpu.poll()
            dst_cpu.poll()
            if not recv.alive() and recv.status != 0:
                raise RunFailed(f"receive-migration failed: {recv.log_tail(3)}")
            src.read_hwm()
            dst.read_hwm()
            time.sleep(0.02)
        rec["wall_ms"] = round((time.monotonic() - t0) * 1000)
        # receive-migration returns once the guest runs here.
        rec["dst_cpu_s"] = dst_cpu.stop()
        if "src_cpu_s" not in rec:
            rec["src_cpu_s"] = src_cpu.stop()
            rec["guest_cpu_s"] = src_cpu.guest
        if "src_info" not in rec and send.status == 0:
            source_info(ssock, rec)
        if send.status != 0 or recv.status != 0:
            raise RunFailed(f"send status {send.status} {send.log_tail(2)}, "
                            f"receive status {recv.status} {recv.log_tail(2)}")
        offset = len(read_text(serial))
        rc, out, err = run_cmd([REMOTE, "--api-socket", dsock, "migration-info"], 30)
        if rc != 0:
            raise RunFailed(f"migration-info: {err.strip()}")
        info = json.loads(out)
        rec["info"] = info
        if info.get("status") != "completed":
            raise RunFailed(f"destination says {info.get('status')}")
        # The source ends itself once the destination runs the VM.
        if not src.wait(30):
            raise RunFailed("the source ferry still runs 30 s after the migration")
        rec["src_log_total_ms"] = source_log_total(f"{d}/src.log")
        rec["pause_resume_ms"] = ferry_pause_resume_ms(f"{d}/src.log", f"{d}/dst.log")

        def running():
            rc, out, err = run_cmd([REMOTE, "--api-socket", dsock, "info"], 30)
            if rc != 0:
                return err.strip()
            st = json.loads(out).get("state")
            return True if st == "Running" else st

        rec["check_s"] = round(check_destination(w, [serial], serial, offset, dst, running), 2)
    finally:
        for p in helpers:
            p.stop(grace=2)
        src.stop()
        dst.stop()
        rec["src_hwm_kib"], rec["src_maxrss_kib"] = src.hwm_kib, src.maxrss_kib
        rec["dst_hwm_kib"], rec["dst_maxrss_kib"] = dst.hwm_kib, dst.maxrss_kib
        rec["src_peak_kib"], rec["dst_peak_kib"] = src.peak_kib(), dst.peak_kib()


def per_gib(cpu_s, sent):
    if cpu_s is None or not sent:
        return None
    return cpu_s / (sent / (1 << 30))


def figures(rec):
    """The table's figures from a run's raw answer (QEMU's query-migrate or Ferry's
    migration-info, which uses the same names)."""
    info = rec.get("info") or {}
    ram = info.get("ram", {})
    total = info.get("total-time")
    if rec["mode"].startswith("ferry") and info and total is None:
        # The destination reports the source's own total (start to `Resumed`); should
        # it be missing, the source's log line, or the wall clock.
        if rec.get("src_log_total_ms") is not None:
            total, rec["total_from"] = rec["src_log_total_ms"], "source log"
        else:
            total, rec["total_from"] = rec.get("wall_ms"), "wall clock"
    downtime = info.get("downtime")
    if rec["mode"].startswith("ferry") and info.get("downtime-us") is not None:
        # Ferry's `downtime` is rounded up to whole ms; QEMU's is the difference of two
        # millisecond clock readings (truncated), so within 1 ms either way. The exact
        # figure compares with it without Ferry's rounding up.
        downtime = info["downtime-us"] / 1000
    if (rec["mode"].startswith("qemu") and total == 0 and not downtime
            and (rec.get("wall_ms") or 0) > 0):
        # QEMU 7.2 with multifd once answered `total-time` 0 and `downtime` 0 for a
        # migration that took 0.9 s: not a measurement; left out of the medians.
        total = downtime = None
        rec["qemu_zero_times"] = True
    sent = ram.get("transferred")
    pass0 = (info.get("iterations") or [{}])[0]
    return {
        "total_ms": total,
        "downtime_ms": downtime,
        # QEMU's from its STOP/RESUME events, Ferry's from its two processes' logs.
        "pause_resume_ms": rec.get("pause_resume_ms"),
        "sent_mib": sent / MIB if sent is not None else None,
        # Same formula for both: bytes on the wire over the total time.
        "mbit_s": sent * 8 / total / 1000 if sent is not None and total else None,
        "syncs": ram.get("dirty-sync-count"),
        # Ferry's first pass (its `iterations`; QEMU reports none), and that pass's rate
        # applied to every page of RAM: pass 0 leaves the pages the guest writes again
        # before their turn to the next pass, so it moves less than the whole RAM.
        "pass0_ms": pass0.get("duration-ms"),
        "ram_once_ms": (pass0["duration-ms"] * ram["total"] / PAGE / pass0["pages"]
                        if pass0.get("pages") and ram.get("total") else None),
        # What the guest's vCPUs went without over the migration's own total time (paused,
        # or waiting for a CPU behind the migration's threads): meaningful for vCPUs that
        # always want to run (workloads a, b, d); an idle guest's are asleep anyway.
        "guest_lost_s": (max(round(total / 1000 * WORKLOADS[rec["workload"]]["cpus"]
                                   - rec["guest_cpu_s"], 3), 0.0)
                         if total and rec.get("guest_cpu_s") is not None else None),
        # CPU seconds outside the vCPU threads per GiB on the wire (ram.transferred).
        "src_cpu_s_gib": per_gib(rec.get("src_cpu_s"), sent),
        "dst_cpu_s_gib": per_gib(rec.get("dst_cpu_s"), sent),
        "src_rss_mib": rec["src_peak_kib"] / 1024 if rec.get("src_peak_kib") else None,
        "dst_rss_mib": rec["dst_peak_kib"] / 1024 if rec.get("dst_peak_kib") else None,
    }


def reset_free_memory(prev):
    """Leaves the host's free memory as a 4 KiB-page process would (see RESET_MARGIN_GIB):
    faults in and frees what the previous run `prev` used (4 GiB before the first) plus
    the margin. Returns (GiB, seconds)."""
    used_kib = ((prev or {}).get("src_peak_kib") or 0) + ((prev or {}).get("dst_peak_kib") or 0)
    gib = -(-used_kib // (1 << 20)) + RESET_MARGIN_GIB if used_kib else 4
    t0 = time.monotonic()
    fault_in_and_free(gib << 30, huge=False)
    return gib, round(time.monotonic() - t0, 1)


def one_run(wkey, mode, pair, port, prev):
    w = WORKLOADS[wkey]
    d = os.path.join(WORK, f"{wkey}-{mode}-{pair}")
    os.makedirs(d, exist_ok=True)
    rec = {"workload": wkey, "mode": mode, "pair": pair, "ok": False,
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if LIVE:
        raise SystemExit(f"processes left from the previous run: {[p.pid for p in LIVE]}")
    rec["reset_gib"], rec["reset_s"] = reset_free_memory(prev)
    t0 = time.monotonic()
    try:
        (run_qemu if mode.startswith("qemu") else run_ferry)(w, mode, d, port, rec)
        rec["ok"] = True
    except (RunFailed, OSError, ValueError, subprocess.TimeoutExpired) as e:
        rec["error"] = str(e)
    finally:
        stop_all()
    rec["run_s"] = round(time.monotonic() - t0, 1)
    rec.update(figures(rec))
    return rec


# ---------------------------------------------------------------------------- report

FIGS = [  # key, column, lower is better
    ("total_ms", "total ms", True, 0),
    ("downtime_ms", "downtime ms", True, 1),
    ("pause_resume_ms", "pause→resume ms", True, 1),
    ("sent_mib", "MiB sent", True, 0),
    ("mbit_s", "Mbit/s", False, 0),
    ("syncs", "dirty syncs", True, 0),
    ("pass0_ms", "pass 0 ms", True, 0),
    ("src_cpu_s", "src CPU s", True, 2),
    ("dst_cpu_s", "dst CPU s", True, 2),
    ("src_cpu_s_gib", "src CPU s/GiB", True, 2),
    ("dst_cpu_s_gib", "dst CPU s/GiB", True, 2),
    ("guest_lost_s", "guest vCPU s lost", True, 2),
    ("src_rss_mib", "src peak RSS MiB", True, 0),
    ("dst_rss_mib", "dst peak RSS MiB", True, 0),
]


def stats(runs, key):
    v = [r[key] for r in runs if r["ok"] and r.get(key) is not None]
    if not v:
        return None
    return statistics.median(v), min(v), max(v)


def fmt(s, p=0):
    if s is None:
        return "–"
    med, lo, hi = s
    if lo == hi:
        return f"{med:.{p}f}"
    return f"{med:.{p}f} ({lo:.{p}f}–{hi:.{p}f})"


def table(runs, wkeys, modes):
    out = []
    head = "| mode | ok | " + " | ".join(c for _, c, _, _ in FIGS) + " |"
    sep = "|---|---|" + "---|" * len(FIGS)
    for wk in wkeys:
        rs = [r for r in runs if r["workload"] == wk]
        if not rs:
            continue
        out += [f"**{WORKLOADS[wk]['name']}** (`{WORKLOADS[wk]['cmdline']}`)", "", head, sep]
        med = {}
        for m in modes:
            mr = [r for r in rs if r["mode"] == m]
            if not mr:
                continue
            cells = []
            for key, _, _, p in FIGS:
                s = stats(mr, key)
                med[(m, key)] = s[0] if s else None
                cells.append(fmt(s, p))
            ok = sum(r["ok"] for r in mr)
            out.append(f"| {MODES[m]} | {ok}/{len(mr)} | " + " | ".join(cells) + " |")
        for fm in ("ferry-lo", "ferry-netns", "ferry-lo-fits", "ferry-netns-fits",
                   "ferry-lo-c2", "ferry-netns-c2", "ferry-lo-c2-noyield",
                   "ferry-netns-c2-noyield", "ferry-lo-ac", "ferry-netns-ac",
                   "ferry-postcopy"):
            if fm not in modes or not any(r["mode"] == fm for r in rs):
                continue
            # Postcopy against QEMU's postcopy, auto-converge against QEMU's with it,
            # precopy against every QEMU precopy mode that ran.
            if fm == "ferry-postcopy":
                qmodes = ("qemu-postcopy",)
            elif fm.endswith("-ac"):
                qmodes = ("qemu-ring-ac", "qemu-bitmap-ac")
            else:
                # Every QEMU precopy mode run, one stream or several: the best of them.
                qmodes = ("qemu-ring", "qemu-bitmap", "qemu-ring-mfd", "qemu-bitmap-mfd")
            if not any(med.get((m, "total_ms")) is not None for m in qmodes):
                continue
            cells = []
            for key, _, lower, _ in FIGS:
                q = [med.get((m, key)) for m in qmodes]
                q = [x for x in q if x is not None]
                f = med.get((fm, key))
                if not q or f is None:
                    cells.append("–")
                    continue
                best = min(q) if lower else max(q)
                cells.append(f"{f / best:.2f}" if best else "–")
            best_of = {"ferry-postcopy": "QEMU postcopy",
                       "ferry-lo-ac": "QEMU best with auto-converge",
                       "ferry-netns-ac": "QEMU best with auto-converge"}.get(fm, "QEMU best")
            out.append(f"| {MODES[fm]} / {best_of} | | " + " | ".join(cells) + " |")
        # Postcopy's bound: its total against the time to send the RAM once, from the
        # precopy runs' pass 0 (the guest running, the same rounds): the pass itself, and
        # its rate applied to every page of RAM (the pass leaves re-written pages out).
        p0 = med.get(("ferry-lo", "pass0_ms"))
        once = stats([r for r in rs if r["mode"] == "ferry-lo"], "ram_once_ms")
        pc = med.get(("ferry-postcopy", "total_ms"))
        if p0 and once and pc:
            out.append("")
            out.append(f"Ferry postcopy's median total {pc:.0f} ms against the time to send "
                       f"this guest's RAM once, from the Ferry loopback precopy runs: "
                       f"**{pc / once[0]:.2f}×** their pass 0's rate applied to all of RAM "
                       f"({once[0]:.0f} ms, median), {pc / p0:.2f}× their pass 0 itself "
                       f"({p0:.0f} ms, median, which leaves the pages written again before "
                       f"their turn to the next pass).")
        fails = [r for r in rs if not r["ok"]]
        zeros = [r for r in rs if r.get("qemu_zero_times")]
        if fails or zeros:
            out.append("")
            for r in fails:
                out.append(f"- failed: {MODES[r['mode']]} pair {r['pair']}: {r.get('error')}")
            for r in zeros:
                out.append(f"- {MODES[r['mode']]} pair {r['pair']}: QEMU answered `total-time` 0 "
                           f"and `downtime` 0 for a migration of {r.get('wall_ms')} ms by this "
                           f"script's clock; both left out of the medians")
        out.append("")
    return "\n".join(out)


def raw_lines(runs):
    out = ["| workload | pair | mode | ok | total ms | wall ms | downtime ms | pause→resume ms | MiB sent | Mbit/s "
           "| syncs | pass 0 ms | src CPU s | dst CPU s | src CPU s/GiB | dst CPU s/GiB | guest vCPU s lost | src RSS MiB | dst RSS MiB | boot s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def c(v, p=0):
        return "–" if v is None else f"{v:.{p}f}"
    for r in runs:
        out.append(f"| {r['workload']} | {r['pair']} | {r['mode']} | {'yes' if r['ok'] else 'NO'} "
                   f"| {c(r.get('total_ms'))} | {c(r.get('wall_ms'))} | {c(r.get('downtime_ms'), 1)} | {c(r.get('pause_resume_ms'), 1)} "
                   f"| {c(r.get('sent_mib'))} "
                   f"| {c(r.get('mbit_s'))} | {c(r.get('syncs'))} | {c(r.get('pass0_ms'))} "
                   f"| {c(r.get('src_cpu_s'), 2)} | {c(r.get('dst_cpu_s'), 2)} "
                   f"| {c(r.get('src_cpu_s_gib'), 2)} | {c(r.get('dst_cpu_s_gib'), 2)} "
                   f"| {c(r.get('guest_lost_s'), 2)} | {c(r.get('src_rss_mib'))} "
                   f"| {c(r.get('dst_rss_mib'))} | {c(r.get('boot_s'), 1)} |")
    return "\n".join(out)


def machine():
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
    mem = ""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    qv = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    built = datetime.datetime.fromtimestamp(os.path.getmtime(FERRY), datetime.timezone.utc)
    def sha(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    fv = subprocess.run([FERRY, "--version"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "kernel": platform.release(),
            "qemu": qv[0] if qv else "", "git_head": rev, "ferry_version": fv,
            "ferry_built": built.strftime("%Y-%m-%d %H:%M UTC"),
            "sha256": {os.path.basename(p): sha(p) for p in (FERRY, REMOTE, GUEST)}}


KEEP_MARK = "<!-- Written by hand below this line; bench_vs_qemu.py keeps it. -->"
# What else ran on the machine, as the person running the benchmark knows it.
MACHINE_NOTE = os.environ.get("BENCH_MACHINE_NOTE") or (
    "Nothing else was started on the machine during the run.")


def write_report(runs, wkeys, modes, started, finished, cmd, mach):
    os.makedirs(OUT, exist_ok=True)
    doc = {"date": started, "finished": finished, "machine": mach, "command": cmd,
           "pairs": PAIRS, "downtime_ms": DOWNTIME_MS, "max_bandwidth_bytes_s": MAX_BANDWIDTH,
           "migration_timeout_s": MIGRATION_TIMEOUT_S,
           "workloads": {k: WORKLOADS[k] for k in wkeys}, "modes": {m: MODES[m] for m in modes},
           "runs": runs}
    with open(os.path.join(OUT, "vs-qemu.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    tab = table(runs, wkeys, modes)
    md_path = os.path.join(OUT, "vs-qemu.md")
    kept = ""
    # The report is UTF-8 (latin-1 would garble the kept part's arrows at every run).
    old = read_text(md_path, "utf-8")
    if KEEP_MARK in old:
        kept = old[old.index(KEEP_MARK) + len(KEEP_MARK):]
    order = " → ".join(MODES[m] for m in modes)
    if any(m.endswith("-ac") for m in modes):
        throttle_note = ("neither side has a switch-over timeout on; auto-converge is off "
                         "except in the modes named *auto-converge*, where both throttle "
                         "the vCPUs of a guest that does not converge: QEMU's "
                         "`migrate-set-capabilities` `auto-converge` at its defaults "
                         "(20 % first, 10 % a step), Ferry's `send-migration` without "
                         "`--no-auto-converge`, with the same steps")
    else:
        throttle_note = "neither side has auto-converge or a switch-over timeout on"
    streams_note = ""
    if any(m.endswith(("-mfd", "-c2", "-c2-noyield")) for m in modes):
        streams_note = (f" The modes named *multifd* / *{STREAMS} connections* move the pages "
                        f"over {STREAMS} streams: QEMU's `multifd` capability and "
                        f"`multifd-channels` {STREAMS} set on both ends, the destination "
                        f"started with `-incoming defer` and listening (`migrate-incoming`) "
                        f"only then, Ferry's `send-migration --connections {STREAMS}`; every "
                        f"other mode uses one.")
    md = f"""# Live migration: Ferry side by side with QEMU

Measured {started} – {finished} on {mach['cpu']}, {mach['cores']} cores, {mach['memory']} RAM,
Linux {mach['kernel']}, nested PVM-based KVM; {mach['qemu']}; Ferry: the binaries of the
checkout at {mach['git_head']} (its head when the run started) as built {mach['ferry_built']}
(copied before the run; sha256 in the JSON). {MACHINE_NOTE} The modes alternate run by run,
so whatever noise there is hits them alike, and every other round runs them in reverse,
so that no mode always follows the same one.

Command: `{cmd}` ({PAIRS} round{'s' if PAIRS != 1 else ''} per workload; raw runs in
[vs-qemu.json](vs-qemu.json)).

Setup, the same for every mode: the same guest binary (`target/test-guest/guest.elf`, a
PVH ELF), memory, vCPUs and command line; one migration at a time, the first round running
{order}. QEMU: `-accel kvm,dirty-ring-size=4096`
(ring) or `-accel kvm` (bitmap), `-cpu {QEMU_CPU}`, `-kernel guest.elf -append ...`,
`-device isa-debug-exit`, `-name vsq,debug-threads=on` (thread names only), QMP on a UNIX socket: `migrate-set-parameters` downtime-limit
{DOWNTIME_MS} ms and max-bandwidth {MAX_BANDWIDTH // 10**9} GB/s, `migrate` to
`tcp:127.0.0.1`, `query-migrate` every 20 ms until completed; destination started with
`-incoming tcp:127.0.0.1:PORT`. Ferry: `send-migration --downtime-ms {DOWNTIME_MS} --no-auto-converge` through
its REST API (`ferry-remote`), default dirty rings (65536 entries), over TCP on loopback and
between two network namespaces joined by a veth pair.{streams_note} Ferry's vCPU threads
yield to their own migration by default (nice +10 from the request until the pause;
`--no-yield-vcpus` keeps them at their own priority, the *vCPUs not yielding*
modes): on these 2 cores, shared by the guest's vCPUs and both ends, that hands the
migration the CPU the guest would otherwise take from it; QEMU's vCPU threads compete with
its migration threads as equals. *guest vCPU s lost* says what that costs the guest, for
both alike. The migration starts
{SETTLE_S:g} s after the guest's first progress line (`pass`/`verified` of every vCPU; `ready`
for idle; longer than the 2 s after which this host's kernel hands freed memory back to
the outer hypervisor, whose first touch is then slow again, so that no mode's destination
inherits the previous run's still-backed memory). Before every run the benchmark faults in
and frees, with 4 KiB pages, {RESET_MARGIN_GIB} GiB more than the run before it used (both
VMMs' peak RSS; 4 GiB before the first): memory freed with transparent huge pages, as
QEMU's guest RAM is, is about twice as slow to touch again
([first-touch.md](first-touch.md), *after THP*), and the run after a QEMU run paid for it. A run counts only if the guest then goes on on the destination: two more
progress lines from every vCPU there (for `verify` the second ends a pass, run wholly on
the destination, that checked every page of its share), or for idle the process stays up
{IDLE_WATCH_S:g} s with QEMU's `query-status` `running` / Ferry's `vm.info` `Running`; and
no `MISMATCH`/`FAIL` on any serial. A migration that has not completed after
{MIGRATION_TIMEOUT_S:.0f} s is cancelled and counted as failed ({throttle_note}).

Figures: median (min–max) over the successful runs. *total* and *downtime* are each
VMM's own report: QEMU's `query-migrate` `total-time` and `downtime` (measured on the
source: stop → completion, the difference of two readings of a millisecond clock, so
within 1 ms of the truth either way), Ferry's destination's `vm.migration-info`, which
reports the source's own clock (`downtime-us`, shown in ms: the source's pause until the
destination's `Resumed` reached it, in microseconds; its `downtime`, the same rounded up
to whole milliseconds, is in the JSON; `total-time`: the migration's start until then). *pause→resume* is measured
the same way for both, on one host clock, as the guest sees it: QEMU's from its source's
`STOP` to its destination's `RESUME` QMP event timestamps, Ferry's from the source's log
line just before it pauses the vCPUs ("stop-and-copy: pausing the VM") to the
destination's just after it resumed them ("resumed … after Complete"), both logged with
microsecond timestamps (QEMU's own `downtime` ends when the source is done, before the
destination has loaded the last data and device state and started). *MiB sent*: `ram.transferred`.
*Mbit/s*: transferred bits / total time, the same formula for both (each VMM's own
`ram.mbps` is in the JSON). *dirty syncs*: `ram.dirty-sync-count`. *src/dst CPU s/GiB*:
CPU seconds (user + system, from `/proc/PID/stat`) each VMM process spent outside its vCPU
threads (`/proc/PID/task/*`: Ferry's `vcpuN`, QEMU's `CPU N/KVM`, whose time is the guest's)
from the migrate request until the source was done (QEMU: `query-migrate` completed; Ferry:
its `send-migration` returned) and until the destination ran the guest (QEMU: `query-status`
running; Ferry: `receive-migration` returned), in all (*CPU s*) and per GiB of
`ram.transferred` (*CPU s/GiB*; where Ferry sends a few MiB of a sparse guest, per GiB
says little: compare the seconds). *guest vCPU s lost*: the migration's *total* times
the guest's vCPUs, less the CPU seconds the source's vCPU threads got over the same
window as the CPU figures (ticks of 10 ms; the window opens a few ms before the migration
does, with the guest at full speed): what a guest whose vCPUs always want to run (a, b,
d) went without, paused or waiting for a CPU behind the migration (on a host with a CPU
to spare for each thread, the pause alone); for the idle guest (c), whose vCPU sleeps,
it is only the total again. *Peak RSS*: `VmHWM`
of the source and destination processes read just before they ended (for Ferry's source,
which ends itself, the last reading ≤ 20 ms before; `ru_maxrss` from `wait4` is in the JSON
as a check). *wall ms* (raw runs only): this script's clock from the migrate request to
seeing it completed (QMP polled every 20 ms; Ferry: both `ferry-remote` calls returned).
Ratio rows: Ferry's median / the best QEMU median among its modes that ran (precopy against
every QEMU precopy mode, one stream or several; auto-converge against QEMU's with it;
postcopy against QEMU's postcopy), for each column on its own (below 1 is better for
Ferry, except Mbit/s).

{tab}
<details><summary>Every run</summary>

{raw_lines(runs)}

</details>

{KEEP_MARK}{kept}"""
    if not kept:
        md += "\n"
    with open(md_path, "w") as f:
        f.write(md)
    return tab


# ---------------------------------------------------------------------------- main

def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wkeys = os.environ.get("WORKLOADS", "a b c d").split()
    modes = os.environ.get("MODES", DEFAULT_MODES).split()
    for k in wkeys:
        if k not in WORKLOADS:
            sys.exit(f"unknown workload {k} (a b c d)")
    for m in modes:
        if m not in MODES:
            sys.exit(f"unknown mode {m} ({' '.join(MODES)})")
    if any(m.startswith("ferry-netns") for m in modes) and not (NS_A and NS_B and ADDR_B):
        sys.exit("ferry-netns needs NS_A, NS_B and ADDR_B (run scripts/bench_vs_qemu.sh)")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = os.environ.get("BENCH_CMD", "scripts/dev_cli.sh bench vs-qemu")
    mach = machine()
    runs = []
    jsonl = os.path.join(WORK, "runs.jsonl")
    # Another run on this host (another worktree's) may use the default ports. Below the
    # kernel's ephemeral range (32768-60999 here): a connection's local port there, left
    # in TIME-WAIT, made a later run's listen fail ("Address already in use").
    port = int(os.environ.get("PORT_BASE", "27100"))
    n = len(wkeys) * len(modes) * PAIRS
    t0 = time.monotonic()
    try:
        for wk in wkeys:
            for pair in range(1, PAIRS + 1):
                # Every other round runs the modes in reverse: a run is slower right
                # after some others (on b, Ferry's was ~1 s slower right after a QEMU run
                # than right after a Ferry one), and one fixed order would pin that on
                # the same modes every round. (Rotating would not: each mode would still
                # follow the same one.)
                for m in (modes if pair % 2 else modes[::-1]):
                    port += 1
                    rec = one_run(wk, m, pair, port, runs[-1] if runs else None)
                    runs.append(rec)
                    with open(jsonl, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if rec["ok"]:
                        what = (f"total {rec['total_ms']} ms, downtime {rec['downtime_ms']} ms, "
                                f"{rec['sent_mib']:.0f} MiB, {rec['syncs']} syncs")
                    else:
                        what = f"FAILED: {rec['error']}"
                    log(f"[{len(runs)}/{n} {time.monotonic() - t0:.0f}s] {wk} {m} pair {pair}: "
                        f"{what} ({rec['run_s']} s)")
    finally:
        stop_all()
    finished = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(write_report(runs, wkeys, modes, started, finished, cmd, mach))
    log(f"written to {OUT}/vs-qemu.md and vs-qemu.json")


if __name__ == "__main__":
    main()

//! vCPU threads: each runs one vCPU, dispatches its exits to the port bus, and parks when
//! the VMM asks (pause for migration or the API). A kick (signal + immediate_exit) gets a
//! vCPU out of KVM_RUN, so a pause also flushes what the CPU buffered into the dirty ring.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::{MmioBus, PioBus, PlatformEvent};
use hypervisor::{Vcpu, VcpuExit, VcpuState};
use vm_migration::priority::ThreadNice;

/// Something that ends (or restarts) the VM, sent by a vCPU thread to the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest wrote this status to the debug-exit port.
    DebugExit(u8),
    /// ACPI power-off or KVM_SYSTEM_EVENT shutdown.
    PowerOff,
    /// i8042 reset, triple fault or KVM_SYSTEM_EVENT reset.
    Reset(String),
    /// A vCPU failed; the VM cannot go on.
    Failed(String),
}

/// vCPU exits by reason, summed over vCPUs (`vm.counters`).
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio: AtomicU64,
    pub hlt: AtomicU64,
    pub dirty_ring_full: AtomicU64,
    pub interrupted: AtomicU64,
    pub other: AtomicU64,
    /// Times a vCPU parked for a pause (not an exit reason: a kicked vCPU may park
    /// before its KVM_RUN even returns).
    pub parks: AtomicU64,
}

#[derive(Default)]
struct Flags {
    pause: bool,
    stop: bool,
    parked: u32,
    /// vCPUs whose thread reported a VM event and waits for the end.
    dead: u32,
    /// Bumped by each state-save request; a parked vCPU saves once per value.
    save_gen: u64,
    /// Each save with the request (`save_gen`) it answered: one that finishes after a
    /// newer request was made does not count for it.
    saved: Vec<(u64, Result<VcpuState, String>)>,
}

/// Where a vCPU was when it last parked (for diagnostics and `vm.coredump`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuSnapshot {
    pub index: u32,
    pub rip: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// General-purpose registers in KVM's order: rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp,
    /// r8 to r15.
    pub gprs: [u64; 16],
    pub rflags: u64,
    /// Segment selectors: cs, ss, ds, es, fs, gs.
    pub selectors: [u16; 6],
    pub fs_base: u64,
    pub gs_base: u64,
}

/// Microseconds since the first call (a monotonic clock that fits an atomic).
pub fn now_us() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_micros() as u64
}

/// What the VMM may ask of one vCPU alone (the dirty limit holds vCPUs back one by one).
struct VcpuSlot {
    index: u32,
    thread: libc::pthread_t,
    /// The thread's id, for its priority.
    tid: libc::id_t,
    /// The vCPU stays out of KVM_RUN until this [`now_us`] instant (0: no nap).
    nap_until_us: AtomicU64,
    /// KVM_RUN returns so far: a kicked vCPU has left KVM_RUN once this moved.
    runs: AtomicU64,
}

/// Pause/resume/stop for all vCPU threads.
#[derive(Default)]
pub struct VcpuControl {
    snapshots: Mutex<Vec<VcpuSnapshot>>,
    /// Fast check in the run loop: some request is pending.
    pending: AtomicBool,
    flags: Mutex<Flags>,
    cv: Condvar,
    threads: Mutex<Vec<libc::pthread_t>>,
    /// Each vCPU's own requests, in no particular order.
    slots: Mutex<Vec<Arc<VcpuSlot>>>,
    /// Auto-converge: bumped once per throttle period; each vCPU naps once per value.
    throttle_gen: AtomicU64,
    /// How long each nap lasts, in microseconds.
    throttle_nap_us: AtomicU64,
    /// Bumped per `vm.nmi`; each vCPU injects one NMI per value it has not seen.
    nmi_gen: AtomicU64,
    /// States saved for the current save request (`Flags::save_gen`), read without the
    /// lock by a pauser that spins (see [`SPIN_FOR_SAVES`]).
    saves_done: AtomicU32,
    /// vCPUs out of KVM_RUN and saving for the current request (as `saves_done`).
    saves_started: AtomicU32,
}

/// How long a pauser busy-waits for the vCPUs' saved states before it sleeps on the
/// condition variable, where there is a CPU for it beside every vCPU thread. This is
/// downtime, and a sleeping thread took 40-80 µs to wake on this host once the last
/// vCPU had saved (of ~0.55 ms for an idle guest's whole pause).
const SPIN_FOR_SAVES: Duration = Duration::from_millis(1);

/// Whether this process may use more CPUs than `vcpus`: one to spin on while each vCPU
/// thread has its own. Without, a spinner would take a CPU from a vCPU it waits for.
fn spare_cpu_beside(vcpus: u32) -> bool {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cpus = *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    cpus > vcpus as usize
}

/// Busy-waits at most `at_most` for `done`, yielding the CPU to any other runnable thread
/// between looks (a vCPU thread it waits for, on a host busier than the count says).
fn spin_until(at_most: Duration, done: impl Fn() -> bool) {
    let end = Instant::now() + at_most;
    while !done() && Instant::now() < end {
        // SAFETY: no arguments, no memory touched.
        unsafe { libc::sched_yield() };
    }
}

impl VcpuControl {
    /// A control whose vCPUs park before their first KVM_RUN (a VM restored paused):
    /// `resume` lets them run.
    pub fn parked_at_start() -> VcpuControl {
        let c = VcpuControl::default();
        c.lock().pause = true;
        c.pending.store(true, Ordering::SeqCst);
        c
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Flags> {
        self.flags.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kick_all(&self) {
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            hypervisor::kick_thread(*t);
        }
    }

    /// Has every vCPU park at its next exit from KVM_RUN, without kicking any and without
    /// waiting: a vCPU waiting inside KVM_RUN for a postcopy page that will not come for
    /// now stays there (kicked, a vCPU on this host's KVM retries that fault in a loop
    /// instead of leaving KVM_RUN).
    pub fn request_pause(&self) {
        let mut f = self.lock();
        f.pause = true;
        self.pending.store(true, Ordering::SeqCst);
        self.cv.notify_all();
        drop(f);
    }

    /// Parks every vCPU outside KVM_RUN and returns once all are parked.
    pub fn pause(&self, count: u32) {
        let mut f = self.lock();
        f.pause = true;
        self.pending.store(true, Ordering::SeqCst);
        // Wakes vCPUs napping for the throttle.
        self.cv.notify_all();
        drop(f);
        self.kick_all();
        let mut f = self.lock();
        while f.parked < count && !f.stop {
            f = self.cv.wait(f).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Parks every vCPU and has each save its own state (KVM wants vCPU ioctls from a
    /// vCPU that is not running; its own thread is where that is certain). Saved with the
    /// VM-wide state (`Machine::save_state`: beside it or right before), not earlier: an
    /// interrupt raised while paused (the power button's level SCI, serial input, a PIT
    /// tick) would otherwise be in the IOAPIC's state but not in the LAPIC's, and the TSC
    /// would lag kvmclock by the time between.
    ///
    /// `meanwhile` runs once on the calling thread: as soon as every vCPU is out of
    /// KVM_RUN and saving, where a spare CPU lets this thread watch for that (the VM-wide
    /// save then overlaps the vCPUs' own, ~20 µs of an idle guest's downtime here), else
    /// once they have saved. Its result comes back with the states.
    pub fn pause_and_save<T>(
        &self,
        count: u32,
        mut meanwhile: impl FnMut() -> T,
    ) -> Result<(Vec<VcpuState>, T), String> {
        self.request_save(count);
        let mut result = None;
        if spare_cpu_beside(count) {
            let end = Instant::now() + SPIN_FOR_SAVES;
            let all_saving = || self.saves_started.load(Ordering::Acquire) >= count;
            spin_until(SPIN_FOR_SAVES, all_saving);
            if all_saving() {
                result = Some(meanwhile());
            }
            spin_until(end.saturating_duration_since(Instant::now()), || {
                self.saves_done.load(Ordering::Acquire) >= count
            });
        }
        let states = self.take_saves(count)?;
        let result = match result {
            Some(r) => r,
            None => meanwhile(),
        };
        Ok((states, result))
    }

    /// The states saved for the current request, once all `count` are in.
    fn take_saves(&self, count: u32) -> Result<Vec<VcpuState>, String> {
        let mut f = self.wait_for_saves(count)?;
        let gen = f.save_gen;
        let mut states = std::mem::take(&mut f.saved)
            .into_iter()
            .filter(|(g, _)| *g == gen)
            .map(|(_, s)| s)
            .collect::<Result<Vec<_>, _>>()?;
        states.sort_by_key(|s| s.index);
        Ok(states)
    }

    /// Sleeps until `count` states were saved for the current request; the lock held.
    fn wait_for_saves(&self, count: u32) -> Result<std::sync::MutexGuard<'_, Flags>, String> {
        let mut f = self.lock();
        let current = |f: &Flags| f.saved.iter().filter(|(g, _)| *g == f.save_gen).count() as u32;
        while current(&f) < count && f.dead == 0 && !f.stop {
            f = self.cv.wait(f).unwrap_or_else(|p| p.into_inner());
        }
        if f.dead > 0 || f.stop {
            return Err("the VM ended while its state was being saved".into());
        }
        Ok(f)
    }

    /// Parks every vCPU and has each save its own state on its thread, without waiting
    /// (`pause_and_save` collects it). Parked vCPUs are woken, not kicked.
    fn request_save(&self, count: u32) {
        let mut f = self.lock();
        f.pause = true;
        f.save_gen += 1;
        f.saved.clear();
        self.saves_done.store(0, Ordering::Release);
        self.saves_started.store(0, Ordering::Release);
        self.pending.store(true, Ordering::SeqCst);
        self.cv.notify_all();
        let all_parked = f.parked >= count;
        drop(f);
        if !all_parked {
            self.kick_all();
        }
    }

    pub fn resume(&self) {
        let mut f = self.lock();
        f.pause = false;
        // What the vCPUs saved for this pause is stale once they run.
        f.saved.clear();
        self.pending.store(f.stop, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// Has every vCPU sleep `nap` once, outside KVM_RUN (one throttle period's share).
    pub fn throttle_tick(&self, nap: Duration) {
        self.throttle_nap_us
            .store(nap.as_micros() as u64, Ordering::SeqCst);
        self.throttle_gen.fetch_add(1, Ordering::SeqCst);
        self.pending.store(true, Ordering::SeqCst);
        self.kick_all();
    }

    /// Ends the throttle: vCPUs stop looking for naps.
    pub fn throttle_off(&self) {
        self.throttle_nap_us.store(0, Ordering::SeqCst);
        let f = self.lock();
        self.pending.store(f.pause || f.stop, Ordering::SeqCst);
    }

    /// Sleeps the calling vCPU thread if a throttle period started since `seen`; a pause
    /// or stop ends the nap at once (a migration pauses a throttled guest to finish, and
    /// the nap would otherwise add to its downtime).
    fn nap_if_throttled(&self, seen: &mut u64) {
        let g = self.throttle_gen.load(Ordering::SeqCst);
        if g == *seen {
            return;
        }
        *seen = g;
        let us = self.throttle_nap_us.load(Ordering::SeqCst);
        if us == 0 {
            return;
        }
        let until = std::time::Instant::now() + Duration::from_micros(us);
        let mut f = self.lock();
        while !(f.pause || f.stop) {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            f = self
                .cv
                .wait_timeout(f, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn pause_requested(&self) -> bool {
        let f = self.lock();
        f.pause || f.stop
    }

    /// A pause whose state save this vCPU has not answered yet (`saved_gen`: the last
    /// request it answered): the save records where it parked.
    fn save_requested(&self, saved_gen: u64) -> bool {
        let f = self.lock();
        f.pause && !f.stop && f.save_gen != saved_gen
    }

    /// Has every vCPU take an NMI (`vm.nmi`). Each injects it itself before its next
    /// KVM_RUN (KVM wants vCPU ioctls from the vCPU's own thread), kicked to get there
    /// now; a parked vCPU does it when it runs again.
    pub fn nmi(&self) {
        self.nmi_gen.fetch_add(1, Ordering::SeqCst);
        self.kick_all();
    }

    /// Every vCPU thread [`ThreadNice::lower`]ed until the guards are dropped (those that
    /// could not be are left out, said in the log): a guest that yields to its own
    /// migration on a host with no spare CPU.
    pub fn lower_priority(&self) -> Vec<ThreadNice> {
        // Not under the slots lock, which the dirty limiter's holds and the ring
        // harvester's flush wait on: each `lower` reads /proc and makes system calls.
        let threads: Vec<(libc::id_t, u32)> = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|s| (s.tid, s.index))
            .collect();
        threads
            .into_iter()
            .filter_map(|(tid, index)| ThreadNice::lower(tid, &format!("vCPU {index}")))
            .collect()
    }

    fn slot(&self, index: u32) -> Option<Arc<VcpuSlot>> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|s| s.index == index)
            .cloned()
    }

    /// Keeps vCPU `index` out of KVM_RUN until `until_us` ([`now_us`]); 0 lets it run.
    /// A later call replaces the deadline. A running vCPU is kicked out to take the nap.
    pub fn hold_vcpu(&self, index: u32, until_us: u64) {
        let Some(slot) = self.slot(index) else {
            return;
        };
        let before = slot.nap_until_us.swap(until_us, Ordering::SeqCst);
        if until_us > before {
            hypervisor::kick_thread(slot.thread);
        } else if until_us < before {
            // A shorter nap (or none): wake it to look again.
            let _f = self.lock();
            self.cv.notify_all();
        }
    }

    /// Kicks vCPUs `which` out of KVM_RUN (so the CPU's buffered dirty-log entries
    /// reach their rings); with `wait`, returns once each left KVM_RUN (or `wait` passed:
    /// a parked or napping vCPU is not in KVM_RUN anyway).
    pub fn flush(&self, which: &[u32], wait: Option<Duration>) {
        let slots: Vec<(Arc<VcpuSlot>, u64)> = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|s| which.contains(&s.index))
            .map(|s| (s.clone(), s.runs.load(Ordering::SeqCst)))
            .collect();
        for (s, _) in &slots {
            hypervisor::kick_thread(s.thread);
        }
        let Some(wait) = wait else {
            return;
        };
        let end = std::time::Instant::now() + wait;
        while std::time::Instant::now() < end
            && slots
                .iter()
                .any(|(s, runs)| s.runs.load(Ordering::SeqCst) == *runs)
        {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Sleeps the calling vCPU thread until its dirty-limit deadline, re-read as it goes
    /// (the limiter may move it); a pause or stop ends the nap at once, as for the
    /// throttle.
    fn nap_for_limit(&self, slot: &VcpuSlot) {
        let mut f = self.lock();
        loop {
            let until = slot.nap_until_us.load(Ordering::SeqCst);
            let now = now_us();
            if until <= now {
                // Served: later loops skip the clock (unless the limiter set a new one).
                let _ = slot.nap_until_us.compare_exchange(
                    until,
                    0,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
                return;
            }
            if f.pause || f.stop {
                return;
            }
            f = self
                .cv
                .wait_timeout(f, Duration::from_micros((until - now).min(20_000)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Ends every vCPU thread (they return from their loop).
    pub fn stop(&self) {
        let mut f = self.lock();
        f.stop = true;
        self.pending.store(true, Ordering::SeqCst);
        self.cv.notify_all();
        drop(f);
        self.kick_all();
    }

    /// Where each vCPU was when it last parked.
    pub fn snapshots(&self) -> Vec<VcpuSnapshot> {
        self.snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn record(&self, vcpu: &Vcpu) {
        let Ok((r, s)) = vcpu.regs() else {
            return;
        };
        self.record_regs(vcpu.index(), &r, &s);
    }

    /// Where the vCPU whose registers these are parked.
    fn record_regs(&self, index: u32, r: &kvm_bindings::kvm_regs, s: &kvm_bindings::kvm_sregs) {
        let snap = VcpuSnapshot {
            index,
            rip: r.rip,
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            gprs: [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ],
            rflags: r.rflags,
            selectors: [
                s.cs.selector,
                s.ss.selector,
                s.ds.selector,
                s.es.selector,
                s.fs.selector,
                s.gs.selector,
            ],
            fs_base: s.fs.base,
            gs_base: s.gs.base,
        };
        let mut all = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|x| x.index != snap.index);
        all.push(snap);
        all.sort_by_key(|x| x.index);
    }

    /// Called by a vCPU thread when `pending` is set: parks while paused, saving its
    /// state when asked. Returns false when the thread must end.
    fn checkpoint(&self, vcpu: &Vcpu, saved_gen: &mut u64, c: &ExitCounters) -> bool {
        let mut f = self.lock();
        if f.pause && !f.stop {
            c.parks.fetch_add(1, Ordering::Relaxed);
            f.parked += 1;
            // Asked to save, the pauser waits for the state, not the park: one wake-up
            // once it is saved instead of two (each ~20 µs of downtime on this host).
            if f.save_gen == *saved_gen {
                self.cv.notify_all();
            }
            while f.pause && !f.stop {
                if f.save_gen != *saved_gen {
                    let gen = f.save_gen;
                    *saved_gen = gen;
                    // Under the lock: a newer request resets the count under it too.
                    self.saves_started.fetch_add(1, Ordering::Release);
                    drop(f);
                    let s = vcpu
                        .save_state()
                        .map_err(|e| format!("vCPU {}: {e}", vcpu.index()));
                    if let Ok(s) = &s {
                        self.record_regs(s.index, &s.regs, &s.sregs);
                    }
                    f = self.lock();
                    f.saved.push((gen, s));
                    if f.save_gen == gen {
                        self.saves_done.fetch_add(1, Ordering::Release);
                    }
                    self.cv.notify_all();
                    continue;
                }
                f = self.cv.wait(f).unwrap_or_else(|p| p.into_inner());
            }
            f.parked -= 1;
        }
        !f.stop
    }
}

/// What a vCPU thread runs once started (see [`VcpuThread::start`]).
pub struct VcpuStart {
    pub vcpu: Vcpu,
    pub bus: Arc<PioBus>,
    pub mmio: Arc<MmioBus>,
    pub control: Arc<VcpuControl>,
    pub counters: Arc<ExitCounters>,
    pub events: Sender<VmEvent>,
}

/// A vCPU thread made ahead of its start, its seccomp filter installed: an incoming VM
/// makes them while its RAM arrives, so that starting it in the downtime hands each thread
/// its vCPU instead of creating the thread (0.1-0.3 ms a thread on this host). Dropped
/// unstarted, the thread ends.
pub struct VcpuThread {
    index: u32,
    start: std::sync::mpsc::SyncSender<VcpuStart>,
    /// In a mutex so that an incoming VM holding threads is `Sync` (it is only used by
    /// `start`, which owns the thread).
    ready: Mutex<std::sync::mpsc::Receiver<()>>,
    handle: JoinHandle<()>,
}

/// A vCPU thread handed its vCPU ([`VcpuThread::start`]), not yet known to be ready.
pub struct StartingVcpu {
    index: u32,
    ready: std::sync::mpsc::Receiver<()>,
    handle: JoinHandle<()>,
}

impl StartingVcpu {
    /// Waits until the thread can be kicked.
    pub fn ready(self) -> std::io::Result<JoinHandle<()>> {
        match self.ready.recv() {
            Ok(()) => Ok(self.handle),
            Err(_) => {
                let _ = self.handle.join();
                Err(std::io::Error::other(format!(
                    "the thread of vCPU {} ended",
                    self.index
                )))
            }
        }
    }

    /// Waits for the thread after the machine's `stop`: it sends its ready before it looks
    /// at the stop, so this returns once the thread has ended, however it ended.
    pub fn end(self) {
        if let Ok(t) = self.ready() {
            let _ = t.join();
        }
    }
}

impl VcpuThread {
    /// Creates the thread for vCPU `index`; it waits for [`VcpuThread::start`].
    pub fn new(index: u32) -> std::io::Result<VcpuThread> {
        let (start_tx, start_rx) = std::sync::mpsc::sync_channel::<VcpuStart>(1);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                ferry_seccomp::install_or_exit(ferry_seccomp::ThreadKind::Vcpu);
                let Ok(VcpuStart {
                    mut vcpu,
                    bus,
                    mmio,
                    control: ctl,
                    counters,
                    events,
                }) = start_rx.recv()
                else {
                    return;
                };
                // Woken by the thread that starts the VM, maybe onto its CPU and ahead of
                // it, while it has more to do first (a migration's destination sends
                // `Resumed` next): let it go on. (Marks in a build not kept saw this
                // thread take that CPU for 36 µs of an idle guest's downtime.)
                // SAFETY: no arguments, no memory touched.
                unsafe { libc::sched_yield() };
                vcpu.bind_to_current_thread();
                // SAFETY: pthread_self has no preconditions.
                let me = unsafe { libc::pthread_self() };
                ctl.threads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(me);
                let slot = Arc::new(VcpuSlot {
                    index: vcpu.index(),
                    thread: me,
                    tid: vm_migration::priority::current_tid(),
                    nap_until_us: AtomicU64::new(0),
                    runs: AtomicU64::new(0),
                });
                ctl.slots
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(slot.clone());
                let _ = ready_tx.send(());
                run_loop(&mut vcpu, &bus, &mmio, &ctl, &slot, &counters, &events);
            })?;
        Ok(VcpuThread {
            index,
            start: start_tx,
            ready: Mutex::new(ready_rx),
            handle,
        })
    }

    /// Hands the thread its vCPU; [`StartingVcpu::ready`] waits for it to take it.
    pub fn start(self, start: VcpuStart) -> std::io::Result<StartingVcpu> {
        if start.vcpu.index() != self.index {
            return Err(std::io::Error::other(format!(
                "vCPU {} handed to the thread made for vCPU {}",
                start.vcpu.index(),
                self.index
            )));
        }
        self.start.send(start).map_err(|_| {
            std::io::Error::other(format!("the thread of vCPU {} ended", self.index))
        })?;
        Ok(StartingVcpu {
            index: self.index,
            ready: self.ready.into_inner().unwrap_or_else(|p| p.into_inner()),
            handle: self.handle,
        })
    }
}

fn run_loop(
    vcpu: &mut Vcpu,
    bus: &PioBus,
    mmio: &MmioBus,
    ctl: &VcpuControl,
    slot: &VcpuSlot,
    c: &ExitCounters,
    events: &Sender<VmEvent>,
) {
    let index = vcpu.index();
    let mut saved_gen = 0;
    let mut throttle_seen = ctl.throttle_gen.load(Ordering::SeqCst);
    let mut nmi_seen = ctl.nmi_gen.load(Ordering::SeqCst);
    // The last exit handed an I/O or MMIO access to the VMM: KVM finishes it in the next
    // KVM_RUN.
    let mut access_pending = false;
    loop {
        let nmi = ctl.nmi_gen.load(Ordering::SeqCst);
        if nmi != nmi_seen {
            nmi_seen = nmi;
            if let Err(e) = vcpu.fd().nmi() {
                log::warn!("vCPU {index}: KVM_NMI failed: {e}");
            }
        }
        if slot.nap_until_us.load(Ordering::Relaxed) != 0 {
            ctl.nap_for_limit(slot);
        }
        if ctl.pending.load(Ordering::SeqCst) {
            ctl.nap_if_throttled(&mut throttle_seen);
            if ctl.pause_requested() && access_pending {
                // Parked now, the saved state would replay the access (a second read of
                // a port, on the destination): one KVM_RUN that finishes it and runs no
                // guest instruction first.
                vcpu.request_immediate_exit();
            } else {
                // A pause that saves the state records it from there (two ioctls fewer
                // in the downtime).
                if ctl.pause_requested() && !ctl.save_requested(saved_gen) {
                    ctl.record(vcpu);
                }
                if !ctl.checkpoint(vcpu, &mut saved_gen, c) {
                    return;
                }
            }
        }
        let ran = vcpu.run();
        slot.runs.fetch_add(1, Ordering::SeqCst);
        access_pending = matches!(
            ran,
            Ok(VcpuExit::IoIn(..)
                | VcpuExit::IoOut(..)
                | VcpuExit::MmioRead(..)
                | VcpuExit::MmioWrite(..))
        );
        let event = match ran {
            Ok(VcpuExit::IoOut(port, data)) => {
                c.io_out.fetch_add(1, Ordering::Relaxed);
                bus.write(port, data).map(|e| match e {
                    PlatformEvent::DebugExit(v) => VmEvent::DebugExit(v),
                    PlatformEvent::PowerOff => VmEvent::PowerOff,
                    PlatformEvent::Reset => VmEvent::Reset("i8042 reset".into()),
                })
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                c.io_in.fetch_add(1, Ordering::Relaxed);
                bus.read(port, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                c.mmio.fetch_add(1, Ordering::Relaxed);
                mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                c.mmio.fetch_add(1, Ordering::Relaxed);
                mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Hlt) => {
                c.hlt.fetch_add(1, Ordering::Relaxed);
                None
            }
            Ok(VcpuExit::DirtyRingFull) => {
                c.dirty_ring_full.fetch_add(1, Ordering::Relaxed);
                None
            }
            Ok(VcpuExit::Interrupted) => {
                c.interrupted.fetch_add(1, Ordering::Relaxed);
                None
            }
            Ok(VcpuExit::Shutdown) => Some(VmEvent::Reset(format!("vCPU {index}: triple fault"))),
            Ok(VcpuExit::SystemEvent(t)) => Some(match t {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::PowerOff,
                _ => VmEvent::Reset(format!("vCPU {index}: KVM system event {t}")),
            }),
            Ok(VcpuExit::Other(what)) => {
                c.other.fetch_add(1, Ordering::Relaxed);
                let rip = vcpu.fd().get_regs().map_or(0, |r| r.rip);
                Some(VmEvent::Failed(format!(
                    "vCPU {index}: unhandled exit {what} at rip {rip:#x}"
                )))
            }
            Err(e) => Some(VmEvent::Failed(format!("vCPU {index}: {e}"))),
        };
        if let Some(ev) = event {
            let _ = events.send(ev);
            // The VMM decides what happens next; this vCPU stops until it does.
            ctl.pending.store(true, Ordering::SeqCst);
            let mut f = ctl.lock();
            // Counted as parked, so a concurrent pause does not wait for this vCPU.
            f.parked += 1;
            f.dead += 1;
            ctl.cv.notify_all();
            while !f.stop {
                f = ctl.cv.wait(f).unwrap_or_else(|p| p.into_inner());
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_pause_ends_a_throttle_nap() {
        let ctl = Arc::new(VcpuControl::default());
        let mut seen = ctl.throttle_gen.load(Ordering::SeqCst);
        ctl.throttle_tick(Duration::from_secs(30));
        let start = Instant::now();
        let napper = {
            let ctl = ctl.clone();
            std::thread::spawn(move || {
                ctl.nap_if_throttled(&mut seen);
                Instant::now()
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        let paused_at = Instant::now();
        ctl.pause(0);
        let woke = napper.join().unwrap();
        // It napped until the pause, not the 30 s it was given. (Measured from this
        // thread: the napper may start late under load, so its own clock proves nothing.)
        assert!(
            woke >= paused_at && woke - start < Duration::from_secs(10),
            "woke {:?} after the start, the pause came at {:?}",
            woke - start,
            paused_at - start
        );
    }
}

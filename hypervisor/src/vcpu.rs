//! A vCPU: `KVM_RUN` with exits reduced to what the VMM handles, and a kick that gets a
//! vCPU out of `KVM_RUN` without a lost-wakeup window (signal + `immediate_exit`).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_regs, kvm_run, kvm_sregs, CpuId, KVM_EXIT_DIRTY_RING_FULL};
use kvm_ioctls::{SyncReg, VcpuExit as KvmExit, VcpuFd};

use crate::vm::Vm;
use crate::{HypervisorError, Result};

/// Why `KVM_RUN` returned, in the terms the VMM acts on.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    IoIn(u16, &'a mut [u8]),
    IoOut(u16, &'a [u8]),
    MmioRead(u64, &'a mut [u8]),
    MmioWrite(u64, &'a [u8]),
    Hlt,
    /// Triple fault or similar: the guest is dead (x86 resets here).
    Shutdown,
    /// `KVM_SYSTEM_EVENT` (shutdown/reset requested through the platform).
    SystemEvent(u32),
    /// The dirty ring reached its soft limit; it was harvested before this returned.
    DirtyRingFull,
    /// A kick (signal) or `immediate_exit` ended the run: look at the control flags.
    Interrupted,
    /// Anything else; the string says what.
    Other(String),
}

thread_local! {
    /// The `kvm_run` page of the vCPU this thread runs, for the kick signal handler.
    static KICK_TARGET: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {
    let run = KICK_TARGET.with(|t| t.get());
    if !run.is_null() {
        // SAFETY: the pointer was set by this very thread to its vCPU's kvm_run mapping,
        // which lives as long as the Vcpu the thread runs; a byte store is signal safe.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

/// Installs the kick handler (idempotent). Call once before starting vCPU threads.
pub fn install_kick_handler() -> Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler and no flags; SA_RESTART is left out
    // so KVM_RUN returns EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(HypervisorError::Ioctl {
                what: "sigaction(kick signal)",
                source: vmm_sys_util::errno::Error::last(),
            });
        }
    }
    Ok(())
}

/// Sends the kick signal to a vCPU thread. The thread's next or current `KVM_RUN` returns
/// [`VcpuExit::Interrupted`].
pub fn kick_thread(thread: libc::pthread_t) {
    // SAFETY: pthread_kill on a thread id obtained from a live JoinHandle; a dead thread
    // only yields ESRCH.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}

/// The registers KVM is asked to copy into `kvm_run` at every exit (KVM_CAP_SYNC_REGS):
/// the general and the special ones. Not the events: `KVM_GET_VCPU_EVENTS` also takes in
/// an NMI another vCPU sent since the exit, which a copy made at the exit would miss.
pub(crate) const SYNC_ON_EXIT: u64 = SyncReg::Register as u64 | SyncReg::SystemRegister as u64;

/// One vCPU, owned by the thread that runs it.
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    vm: Arc<Vm>,
    /// KVM copies the registers out at every exit ([`SYNC_ON_EXIT`]).
    sync_on_exit: bool,
    /// `kvm_run` holds this vCPU's registers as they are now: its last KVM_RUN ended with
    /// them copied out, and nothing set any state on it since. (Atomic only so that a
    /// machine holding its vCPUs is `Sync`: one thread uses a vCPU at a time.)
    synced: AtomicBool,
}

impl Vcpu {
    pub(crate) fn new(index: u32, mut fd: VcpuFd, vm: Arc<Vm>, sync_on_exit: bool) -> Self {
        if sync_on_exit {
            fd.set_sync_valid_reg(SyncReg::Register);
            fd.set_sync_valid_reg(SyncReg::SystemRegister);
        }
        Vcpu {
            index,
            fd,
            vm,
            sync_on_exit,
            synced: AtomicBool::new(false),
        }
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// The KVM vCPU itself. Anything may be set through it, so the registers KVM copied
    /// out at the last exit no longer count as this vCPU's own.
    pub fn fd(&mut self) -> &VcpuFd {
        self.synced.store(false, Ordering::Relaxed);
        &self.fd
    }

    /// The general and special registers: from `kvm_run` where KVM copied them out at
    /// the last exit and nothing changed them since, else by ioctl.
    pub fn regs(&self) -> Result<(kvm_regs, kvm_sregs)> {
        if let Some(r) = self.synced_regs() {
            return Ok(r);
        }
        let e = HypervisorError::ioctl;
        Ok((
            self.fd.get_regs().map_err(e("KVM_GET_REGS"))?,
            self.fd.get_sregs().map_err(e("KVM_GET_SREGS"))?,
        ))
    }

    /// Whether `kvm_run` holds this vCPU's registers as they are now (see [`Self::regs`]).
    pub fn regs_copied_out(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    fn synced_regs(&self) -> Option<(kvm_regs, kvm_sregs)> {
        self.synced.load(Ordering::Relaxed).then(|| {
            let s = self.fd.sync_regs();
            (s.regs, s.sregs)
        })
    }

    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// Saves this vCPU's state; the vCPU must be out of KVM_RUN (parked).
    pub fn save_state(&self) -> Result<crate::VcpuState> {
        // The copy is used once: KVM_GET_MP_STATE, read by the save, takes in an INIT or
        // SIPI another vCPU sent, which changes the registers (a second save reads them).
        let regs = self.regs()?;
        self.synced.store(false, Ordering::Relaxed);
        crate::state::save_vcpu(&self.fd, self.index, self.vm.msr_indices(), regs)
    }

    /// Restores state saved by [`Self::save_state`], before this vCPU first runs.
    pub fn restore_state(&self, s: &crate::VcpuState) -> Result<()> {
        self.synced.store(false, Ordering::Relaxed);
        crate::state::restore_vcpu(&self.fd, s)
    }

    /// Makes kicks sent to the calling thread end this vCPU's `KVM_RUN`. Call in the vCPU
    /// thread before it first looks at its control flags.
    pub fn bind_to_current_thread(&mut self) {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        KICK_TARGET.with(|t| t.set(run));
    }

    /// Makes the next `KVM_RUN` return at once ([`VcpuExit::Interrupted`]) without running
    /// a guest instruction, after KVM finished the access of the last I/O or MMIO exit.
    /// KVM completes such an access (an `IN`'s value into its register, the instruction
    /// skipped) only on the next `KVM_RUN`; state saved before that would replay the
    /// access wherever it is restored. A string access may first exit once more.
    pub fn request_immediate_exit(&mut self) {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        // SAFETY: `run` is this vCPU's kvm_run mapping, alive as long as self.fd; only this
        // thread (and its own kick handler, which stores the same value) writes the byte.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }

    /// Runs the vCPU until the next exit the VMM must see. A ring-full exit is handled
    /// here (harvest + reset, counted) and reported so callers may count or throttle.
    pub fn run(&mut self) -> Result<VcpuExit<'_>> {
        let index = self.index;
        let run: *mut kvm_run = self.fd.get_kvm_run();
        // What KVM's reset index was when this run began: a ring-full exit with nothing
        // to harvest is stale only if the ring was reset since.
        let reset_before_run = self.vm.ring_reset_index(index);
        // KVM copies the registers out on every return of KVM_RUN past its checks; the
        // copy is trusted after an exit or an EINTR (kicked, or `immediate_exit`), the
        // returns a save follows.
        let sync = self.sync_on_exit;
        let copied_out = |r: &std::result::Result<KvmExit<'_>, vmm_sys_util::errno::Error>| {
            sync && r
                .as_ref()
                .map_or_else(|e| e.errno() == libc::EINTR, |_| true)
        };
        if sync {
            // KVM only sets the bit of an interrupt it is injecting, into a copy that
            // stays from one exit to the next: cleared, so that a bit from an earlier exit
            // does not stay (KVM_GET_SREGS starts from zeros).
            self.fd.sync_regs_mut().sregs.interrupt_bitmap = [0; 4];
        }
        let ran = self.fd.run();
        self.synced.store(copied_out(&ran), Ordering::Relaxed);
        let exit = match ran {
            Ok(e) => e,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: `run` is this vCPU's kvm_run mapping, alive as long as self.fd;
                // the exit borrow of self.fd ended with the error.
                unsafe {
                    std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 0)
                };
                return Ok(VcpuExit::Interrupted);
            }
            Err(e) => {
                return Err(HypervisorError::Ioctl {
                    what: "KVM_RUN",
                    source: e,
                })
            }
        };
        Ok(match exit {
            KvmExit::IoIn(p, d) => VcpuExit::IoIn(p, d),
            KvmExit::IoOut(p, d) => VcpuExit::IoOut(p, d),
            KvmExit::MmioRead(a, d) => VcpuExit::MmioRead(a, d),
            KvmExit::MmioWrite(a, d) => VcpuExit::MmioWrite(a, d),
            KvmExit::Hlt => VcpuExit::Hlt,
            KvmExit::Shutdown => VcpuExit::Shutdown,
            KvmExit::SystemEvent(t, _) => VcpuExit::SystemEvent(t),
            KvmExit::Intr => VcpuExit::Interrupted,
            KvmExit::Unsupported(r) if r == KVM_EXIT_DIRTY_RING_FULL => {
                self.vm
                    .stats
                    .ring_full_exits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.vm.handle_ring_full(index, reset_before_run)?;
                VcpuExit::DirtyRingFull
            }
            KvmExit::FailEntry(reason, cpu) => VcpuExit::Other(format!(
                "KVM_EXIT_FAIL_ENTRY reason {reason:#x} on cpu {cpu}"
            )),
            KvmExit::InternalError => {
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                // union member KVM filled in.
                let sub = unsafe { (*run).__bindgen_anon_1.internal.suberror };
                VcpuExit::Other(format!("KVM_EXIT_INTERNAL_ERROR (suberror {sub})"))
            }
            other => VcpuExit::Other(format!("{other:?}")),
        })
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        // A kick arriving after the kvm_run page is unmapped must not write to it: forget
        // it first if this thread is the one bound to it.
        let run: *mut kvm_run = self.fd.get_kvm_run();
        KICK_TARGET.with(|t| {
            if t.get() == run {
                t.set(std::ptr::null_mut());
            }
        });
    }
}

/// Gives vCPU `index` KVM's supported CPUID with its own APIC id and the vCPU count.
pub(crate) fn configure_cpuid(fd: &VcpuFd, base: &CpuId, index: u32, count: u32) -> Result<()> {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC id, [23:16] logical processor count.
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | (count.min(255) << 16);
            }
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    fd.set_cpuid2(&cpuid)
        .map_err(HypervisorError::ioctl("KVM_SET_CPUID2"))
}

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WB: u64 = 6;

/// Sets the MSRs firmware would have set: MTRRs on with write-back as the default type
/// (with MTRRs off, all memory is uncached and a guest without firmware crawls), and
/// fast strings.
pub(crate) fn configure_msrs(fd: &VcpuFd) -> Result<()> {
    let entries = [
        kvm_bindings::kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_ENABLE | MTRR_TYPE_WB,
            ..Default::default()
        },
        kvm_bindings::kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        },
    ];
    let msrs = kvm_bindings::Msrs::from_entries(&entries).map_err(|_| {
        HypervisorError::ioctl("KVM_SET_MSRS")(vmm_sys_util::errno::Error::new(libc::E2BIG))
    })?;
    let n = fd
        .set_msrs(&msrs)
        .map_err(HypervisorError::ioctl("KVM_SET_MSRS"))?;
    if n != entries.len() {
        log::warn!("KVM accepted only {n} of {} boot MSRs", entries.len());
    }
    Ok(())
}

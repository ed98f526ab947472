//! The VMM behind the API: at most one VM, its lifecycle state machine, and the watcher
//! that turns guest events into state changes.
//!
//! Everything sits behind one mutex that is only ever held for short moments: booting a
//! machine, tearing one down (joining vCPU threads) and migrating run outside it, marked
//! by an [`Operation`] so that conflicting lifecycle requests answer 405 meanwhile while
//! `vm.info`, `vm.counters` and the migration endpoints keep answering.
//!
//! The machine is held as an `Arc<Machine>` ([`Machine`] is `Sync`): a migration takes a
//! clone with [`Vmm::machine`] and works on it without the lock. Running or Paused is read
//! from the machine itself, so a pause made by the migration engine shows in `vm.info`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::migration::MigrationHandler;
use super::ApiError;
use crate::config::VmConfig;
use crate::events;
use crate::vcpu::VmEvent;
use crate::vm::Machine;

/// cloud-hypervisor's VM states (`BreakPoint` aside).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Configured by `vm.create`, never booted.
    Created,
    Running,
    Paused,
    /// Shut down by `vm.shutdown` or because the guest ended; `vm.boot` starts it again.
    Shutdown,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// `vm.counters`: counter groups, each a map of counter name to value (cloud-hypervisor's
/// shape: device id -> counter -> u64).
pub type Counters = BTreeMap<String, BTreeMap<String, u64>>;

/// The counters of a machine, read now.
pub fn machine_counters(m: &Machine) -> Counters {
    let group = |pairs: &[(&str, u64)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect::<BTreeMap<_, _>>()
    };
    let r = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let e = &m.exit_counters;
    let mut c = Counters::new();
    c.insert(
        "vcpu_exits".into(),
        group(&[
            ("io_in", r(&e.io_in)),
            ("io_out", r(&e.io_out)),
            ("mmio", r(&e.mmio)),
            ("hlt", r(&e.hlt)),
            ("dirty_ring_full", r(&e.dirty_ring_full)),
            ("interrupted", r(&e.interrupted)),
            ("other", r(&e.other)),
            ("parks", r(&e.parks)),
        ]),
    );
    if let Some(s) = &m.serial_counters {
        c.insert(
            "serial".into(),
            group(&[
                ("out_bytes", r(&s.out_bytes)),
                ("lost_bytes", r(&s.lost_bytes)),
            ]),
        );
    }
    let d = &m.hypervisor().stats;
    c.insert(
        "dirty_tracking".into(),
        group(&[
            ("ring_harvests", r(&d.ring_harvests)),
            ("ring_entries", r(&d.ring_entries)),
            ("ring_full_exits", r(&d.ring_full_exits)),
            ("ring_overflows", r(&d.ring_overflows)),
            ("ring_reset_retries", r(&d.ring_reset_retries)),
            ("ring_retaken", r(&d.ring_retaken)),
            ("ring_skipped", r(&d.ring_skipped)),
            ("ring_steps", r(&d.ring_steps)),
            ("bitmap_reads", r(&d.bitmap_reads)),
        ]),
    );
    c
}

/// `vm.info`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmInfo {
    pub config: VmConfig,
    pub state: VmState,
    pub memory_actual_size: u64,
}

/// `vmm.ping`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmmPing {
    pub build_version: String,
    pub version: String,
    pub pid: u32,
    pub features: Vec<String>,
}

/// The VM, created or not yet booted, running, paused or shut down.
pub struct Vm {
    /// Validated, defaults filled in.
    pub config: VmConfig,
    /// Present while Running or Paused (and not being rebooted).
    machine: Option<Arc<Machine>>,
    /// The state without a machine: Created (never booted) or Shutdown.
    idle_state: VmState,
    /// Counters of the last machine, kept when it ended.
    pub last_counters: Option<Counters>,
}

impl Vm {
    fn new(config: VmConfig, machine: Option<Arc<Machine>>) -> Vm {
        Vm {
            config,
            machine,
            idle_state: VmState::Created,
            last_counters: None,
        }
    }

    /// Running or Paused (from the machine), else Created or Shutdown.
    pub fn state(&self) -> VmState {
        match &self.machine {
            Some(m) if m.is_paused() => VmState::Paused,
            Some(_) => VmState::Running,
            None => self.idle_state,
        }
    }

    /// The running or paused machine.
    pub fn machine(&self) -> Option<&Arc<Machine>> {
        self.machine.as_ref()
    }

    /// Takes the machine out, keeping its counters: the VM is Shutdown. The machine stops
    /// (vCPU threads joined) when its last `Arc` is dropped: drop it outside the lock.
    pub fn take_machine(&mut self) -> Option<Arc<Machine>> {
        let m = self.machine.take();
        if let Some(m) = &m {
            self.last_counters = Some(machine_counters(m));
            self.idle_state = VmState::Shutdown;
        }
        m
    }
}

/// What the mutex guards.
pub struct Slot {
    pub vm: Option<Vm>,
    /// The long operation in progress (`vm.boot`, `vm.reboot`, a migration), if any.
    busy: Option<&'static str>,
}

impl Slot {
    fn not_busy(&self, action: &'static str) -> Result<(), ApiError> {
        match self.busy {
            Some(busy) => Err(ApiError::Busy { action, busy }),
            None => Ok(()),
        }
    }

    fn vm_mut(&mut self) -> Result<&mut Vm, ApiError> {
        self.vm.as_mut().ok_or(ApiError::NoVm)
    }
}

/// The VMM: one optional VM and the migration handler.
pub struct Vmm {
    slot: Mutex<Slot>,
    migration: Box<dyn MigrationHandler>,
    exit: Mutex<Option<i32>>,
    exit_cv: Condvar,
}

/// A long operation in progress; lifecycle requests answer 405 until it is dropped.
pub struct Operation<'a> {
    vmm: &'a Vmm,
}

impl Drop for Operation<'_> {
    fn drop(&mut self) {
        self.vmm.lock().busy = None;
    }
}

/// How often the watcher looks for guest events.
const WATCH_PERIOD: Duration = Duration::from_millis(10);

fn wrong_state(action: &'static str, state: VmState) -> ApiError {
    ApiError::WrongState { action, state }
}

impl Vmm {
    pub fn new(migration: Box<dyn MigrationHandler>) -> Arc<Vmm> {
        Arc::new(Vmm {
            slot: Mutex::new(Slot {
                vm: None,
                busy: None,
            }),
            migration,
            exit: Mutex::new(None),
            exit_cv: Condvar::new(),
        })
    }

    pub fn migration(&self) -> &dyn MigrationHandler {
        self.migration.as_ref()
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the VM (None when there is none) under the lock: keep it short.
    pub fn with_vm<R>(&self, f: impl FnOnce(Option<&mut Vm>) -> R) -> R {
        f(self.lock().vm.as_mut())
    }

    /// The running (or paused) machine, to use without holding the lock (a migration).
    pub fn machine(&self, action: &'static str) -> Result<Arc<Machine>, ApiError> {
        let slot = self.lock();
        let vm = slot.vm.as_ref().ok_or(ApiError::NoVm)?;
        vm.machine
            .clone()
            .ok_or_else(|| wrong_state(action, vm.state()))
    }

    /// Marks the start of a long operation if `check` accepts the VM as it is now
    /// (None: no VM). Fails with [`ApiError::Busy`] while another one runs.
    pub fn begin(
        &self,
        action: &'static str,
        check: impl FnOnce(Option<&Vm>) -> Result<(), ApiError>,
    ) -> Result<Operation<'_>, ApiError> {
        let mut slot = self.lock();
        slot.not_busy(action)?;
        check(slot.vm.as_ref())?;
        slot.busy = Some(action);
        Ok(Operation { vmm: self })
    }

    /// Installs a machine that runs (or is paused) already, a migrated VM arriving,
    /// replacing any VM.
    pub fn install(&self, config: VmConfig, machine: Arc<Machine>) {
        let old = self.lock().vm.replace(Vm::new(config, Some(machine)));
        drop(old);
    }

    /// The VM's state, None without a VM.
    pub fn state(&self) -> Option<VmState> {
        self.lock().vm.as_ref().map(Vm::state)
    }

    pub fn ping(&self) -> VmmPing {
        VmmPing {
            build_version: concat!("v", env!("CARGO_PKG_VERSION")).to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            features: vec!["kvm".into()],
        }
    }

    /// `vm.create`: `config` must be validated already.
    pub fn create(&self, config: VmConfig) -> Result<(), ApiError> {
        let mut slot = self.lock();
        slot.not_busy("vm.create")?;
        if let Some(vm) = &slot.vm {
            return Err(ApiError::VmExists {
                action: "vm.create",
                state: vm.state(),
            });
        }
        slot.vm = Some(Vm::new(config, None));
        Ok(())
    }

    /// Boots `config` outside the lock and installs the machine (Running); on failure the
    /// VM stays as it is (Created or Shutdown).
    fn boot_machine(&self, action: &'static str, config: VmConfig) -> Result<(), ApiError> {
        let result = Machine::boot(config);
        let mut slot = self.lock();
        let vm = slot.vm_mut()?;
        match result {
            Ok(m) => {
                vm.machine = Some(Arc::new(m));
                vm.last_counters = None;
                Ok(())
            }
            Err(e) => Err(ApiError::Failed {
                action,
                reason: super::describe(&e),
            }),
        }
    }

    /// `vm.boot`: Created or Shutdown -> Running.
    pub fn boot(&self) -> Result<(), ApiError> {
        let mut config = None;
        let op = self.begin("vm.boot", |vm| {
            let vm = vm.ok_or(ApiError::NoVm)?;
            match vm.state() {
                VmState::Created | VmState::Shutdown => {
                    config = Some(vm.config.clone());
                    Ok(())
                }
                s => Err(wrong_state("vm.boot", s)),
            }
        })?;
        let config = config.expect("set by the check");
        events::emit("vm", "booting", &[]);
        let r = self.boot_machine("vm.boot", config);
        if r.is_ok() {
            events::emit("vm", "booted", &[]);
        }
        drop(op);
        r
    }

    /// `vm.pause`: Running -> Paused (every vCPU parked outside KVM_RUN).
    pub fn pause(&self) -> Result<(), ApiError> {
        let mut slot = self.lock();
        slot.not_busy("vm.pause")?;
        let vm = slot.vm_mut()?;
        match (vm.state(), &vm.machine) {
            (VmState::Running, Some(m)) => {
                events::emit("vm", "pausing", &[]);
                m.pause();
                events::emit("vm", "paused", &[]);
                Ok(())
            }
            (s, _) => Err(wrong_state("vm.pause", s)),
        }
    }

    /// `vm.resume`: Paused -> Running.
    pub fn resume(&self) -> Result<(), ApiError> {
        let mut slot = self.lock();
        slot.not_busy("vm.resume")?;
        let vm = slot.vm_mut()?;
        match (vm.state(), &vm.machine) {
            (s @ VmState::Paused, Some(_)) if self.migration.postcopy_paused() => {
                Err(ApiError::NotWhileRunning {
                    action: "vm.resume",
                    state: s,
                    why: "a postcopy migration lost its link (migration-info says \
                          postcopy-paused): the VM's pages are split between the source and \
                          the destination, so neither copy may run alone",
                })
            }
            (VmState::Paused, Some(m)) => {
                events::emit("vm", "resuming", &[]);
                m.resume();
                events::emit("vm", "resumed", &[]);
                Ok(())
            }
            (s, _) => Err(wrong_state("vm.resume", s)),
        }
    }

    /// `vm.nmi`: an NMI to every vCPU of a Running or Paused VM (taken on resume).
    pub fn nmi(&self) -> Result<(), ApiError> {
        let mut slot = self.lock();
        slot.not_busy("vm.nmi")?;
        let vm = slot.vm_mut()?;
        match (vm.state(), &vm.machine) {
            (VmState::Running | VmState::Paused, Some(m)) => {
                m.nmi();
                Ok(())
            }
            (s, _) => Err(wrong_state("vm.nmi", s)),
        }
    }

    /// Changes the configuration of a VM that is not running (Created or Shutdown):
    /// `edit` works on a copy, which must then validate before it replaces the old one.
    /// A bad request is a 400 naming the problem whatever the VM's state; a good one on a
    /// running or paused VM is a 405 with `why_not`.
    pub fn edit_config(
        &self,
        action: &'static str,
        why_not: &'static str,
        edit: impl FnOnce(&mut VmConfig) -> Result<(), ApiError>,
    ) -> Result<(), ApiError> {
        let mut slot = self.lock();
        slot.not_busy(action)?;
        let vm = slot.vm_mut()?;
        let mut config = vm.config.clone();
        edit(&mut config)?;
        config
            .validate()
            .map_err(|e| ApiError::BadRequest(format!("{action}: {e}")))?;
        match vm.state() {
            VmState::Created | VmState::Shutdown => {
                vm.config = config;
                Ok(())
            }
            state => Err(ApiError::NotWhileRunning {
                action,
                state,
                why: why_not,
            }),
        }
    }

    /// `vm.power-button`: the ACPI power button, pressed (the guest decides what follows;
    /// a paused VM's guest sees it when it resumes).
    pub fn power_button(&self) -> Result<(), ApiError> {
        let mut slot = self.lock();
        slot.not_busy("vm.power-button")?;
        let vm = slot.vm_mut()?;
        match (vm.state(), &vm.machine) {
            (VmState::Running | VmState::Paused, Some(m)) => {
                m.power_button();
                Ok(())
            }
            (s, _) => Err(wrong_state("vm.power-button", s)),
        }
    }

    /// `vm.shutdown`: Running or Paused -> Shutdown (vCPU threads stopped, memory freed).
    pub fn shutdown(&self) -> Result<(), ApiError> {
        let machine = {
            let mut slot = self.lock();
            slot.not_busy("vm.shutdown")?;
            let vm = slot.vm_mut()?;
            match vm.state() {
                VmState::Running | VmState::Paused => vm.take_machine(),
                s => return Err(wrong_state("vm.shutdown", s)),
            }
        };
        drop(machine);
        events::emit("vm", "shutdown", &[]);
        Ok(())
    }

    /// `vm.reboot`: Running or Paused -> a fresh machine from the same config, Running.
    pub fn reboot(&self) -> Result<(), ApiError> {
        let mut taken = None;
        let op = self.begin("vm.reboot", |vm| {
            let vm = vm.ok_or(ApiError::NoVm)?;
            match vm.state() {
                VmState::Running | VmState::Paused => Ok(()),
                s => Err(wrong_state("vm.reboot", s)),
            }
        })?;
        // Shutdown while the old machine stops and the new one boots; stays so on failure.
        let config = self.with_vm(|vm| {
            let vm = vm.expect("checked by begin, kept by the operation");
            taken = vm.take_machine();
            vm.config.clone()
        });
        events::emit("vm", "rebooting", &[]);
        drop(taken);
        let r = self.boot_machine("vm.reboot", config);
        if r.is_ok() {
            events::emit("vm", "rebooted", &[]);
        }
        drop(op);
        r
    }

    /// `vm.delete`: forgets the VM whatever its state.
    pub fn delete(&self) -> Result<(), ApiError> {
        let vm = {
            let mut slot = self.lock();
            slot.not_busy("vm.delete")?;
            // No VM is not an error: cloud-hypervisor answers 204 (cleanup scripts rely on it).
            let Some(vm) = slot.vm.take() else {
                return Ok(());
            };
            vm
        };
        drop(vm);
        events::emit("vm", "deleted", &[]);
        Ok(())
    }

    /// `vmm.shutdown`: stops and forgets the VM whatever is in progress; the caller then
    /// ends the process (after answering).
    pub fn shutdown_vmm(&self) {
        let vm = self.lock().vm.take();
        drop(vm);
        events::emit("vmm", "shutdown", &[]);
    }

    pub fn info(&self) -> Result<VmInfo, ApiError> {
        let slot = self.lock();
        let vm = slot.vm.as_ref().ok_or(ApiError::NoVm)?;
        Ok(VmInfo {
            config: vm.config.clone(),
            state: vm.state(),
            memory_actual_size: vm.config.memory.size,
        })
    }

    /// Counters of the machine, or of the last one when the VM is shut down.
    pub fn counters(&self) -> Result<Counters, ApiError> {
        let slot = self.lock();
        let vm = slot.vm.as_ref().ok_or(ApiError::NoVm)?;
        match (&vm.machine, &vm.last_counters) {
            (Some(m), _) => Ok(machine_counters(m)),
            (None, Some(c)) => Ok(c.clone()),
            (None, None) => Err(wrong_state("vm.counters", vm.state())),
        }
    }

    /// Asks [`Vmm::run`] to return `code`.
    pub fn request_exit(&self, code: i32) {
        *self.exit.lock().unwrap_or_else(|p| p.into_inner()) = Some(code);
        self.exit_cv.notify_all();
    }

    /// Watches the guest until the process should end: returns the exit status of a
    /// guest debug-exit or the code given to [`Vmm::request_exit`]. Any other end of the
    /// guest (power-off, reset, vCPU failure) shuts the VM down (state Shutdown).
    pub fn run(&self) -> i32 {
        loop {
            {
                let exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(code) = *exit {
                    return code;
                }
                let (exit, _) = self
                    .exit_cv
                    .wait_timeout(exit, WATCH_PERIOD)
                    .unwrap_or_else(|p| p.into_inner());
                if let Some(code) = *exit {
                    return code;
                }
            }
            if let Some(code) = self.poll_guest() {
                return code;
            }
        }
    }

    /// Handles one pending guest event, if any; Some(status) when the process must end.
    fn poll_guest(&self) -> Option<i32> {
        let (event, machine) = {
            let mut slot = self.lock();
            let vm = slot.vm.as_mut()?;
            let event = vm.machine.as_ref()?.wait_event(Some(Duration::ZERO))?;
            if let VmEvent::DebugExit(_) = event {
                (event, None)
            } else {
                (event, vm.take_machine())
            }
        };
        drop(machine);
        match event {
            VmEvent::DebugExit(status) => {
                log::info!("guest debug-exit with status {status}: ending the VMM");
                Some(i32::from(status))
            }
            VmEvent::Failed(why) => {
                log::error!("VM failed, now shut down: {why}");
                events::emit("vm", "shutdown", &[("reason", "failed"), ("error", &why)]);
                None
            }
            other => {
                log::info!("guest ended ({other:?}): VM shut down");
                match &other {
                    VmEvent::PowerOff => events::emit("vm", "shutdown", &[("reason", "power-off")]),
                    VmEvent::Reset(why) => {
                        events::emit("vm", "shutdown", &[("reason", "reset"), ("detail", why)])
                    }
                    _ => events::emit("vm", "shutdown", &[]),
                }
                None
            }
        }
    }
}

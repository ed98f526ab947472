//! A running machine: guest RAM, the KVM VM built in the order dirty tracking requires,
//! the legacy devices on the port bus, and the vCPU threads.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::pci::{PciBarWindow, PciConfigIo, PciEcam, CONFIG_IO_LEN, CONFIG_IO_PORT};
use devices::{
    AcpiPm, AcpiPmState, DebugExit, MmioBus, PioBus, Serial, SerialCounters, ACPI_PM1A_EVT_PORT,
    ACPI_PM_PORTS, COM1_IRQ, COM1_PORT, DEBUG_EXIT_PORT, I8042, I8042_PORT,
};
use hypervisor::{DirtyTracking, MemorySlot, SyncKind, VmBuilder};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::boot::layout::{PCI_ECAM_SIZE, PCI_ECAM_START};
use crate::config::{ConsoleMode, VmConfig};
use crate::dirty::{self, RegionDirty};
use crate::dirty_rate::RingWatch;
use crate::memory::GuestMemoryMmap;
use crate::pci_devices::{PciDeviceState, PciDevices, BAR_WINDOW_SIZE, BAR_WINDOW_START};
use crate::throttle::VcpuThrottle;
use crate::vcpu::{self, ExitCounters, VcpuControl, VmEvent};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::HypervisorError),
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
    #[error("cannot allocate {size} bytes of guest memory: {reason}")]
    Memory { size: u64, reason: String },
    #[error("cannot open serial output file {path}: {source}")]
    SerialFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("machine state: {0}")]
    State(String),
    #[error(transparent)]
    Devices(#[from] crate::pci_devices::PciDevicesError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, VmError>;

/// Guest RAM with one region per entry of the platform's RAM layout: anonymous memory,
/// or with `shared` one memfd holding every region back to back (what `MemFDs` hands over).
///
/// `huge_pages` asks for transparent huge pages on anonymous RAM (fewer faults while a
/// guest fills it). Not for a migration's destination as a whole: there the VMM faults in
/// every received page on the migration's critical path, a first pass writes pages
/// scattered over RAM, each then taking a whole 2 MiB page that on a nested host may have
/// to come back from the outer hypervisor; so measured, the 150 MiB `dirty` guest's
/// migration took 2-3× as long in two sets of runs out of three, the 8 GiB one's up to
/// 1.8× (`docs/benchmarks/first-touch.md`). The destination's prefault helper asks for
/// them where the first pass left whole 2 MiB for later.
pub fn create_memory(size: u64, shared: bool, huge_pages: bool) -> Result<GuestMemoryMmap> {
    let ranges = crate::boot::layout::ram_regions(size);
    let err = |reason: String| VmError::Memory { size, reason };
    if !shared {
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| err(e.to_string()))?;
        if huge_pages {
            crate::memory::advise_huge_pages(&mem);
        }
        return Ok(mem);
    }
    let file =
        Arc::new(crate::memory::memfd("ferry-guest-ram", size).map_err(|e| err(e.to_string()))?);
    let mut offset = 0u64;
    let with_files: Vec<_> = ranges
        .iter()
        .map(|&(gpa, len)| {
            let f = vm_memory::FileOffset::from_arc(file.clone(), offset);
            offset += len as u64;
            (gpa, len, Some(f))
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(&with_files).map_err(|e| err(e.to_string()))
}

/// The RAM layout `(gpa, size)` for `size` bytes of guest RAM.
fn create_layout(size: u64) -> Vec<(u64, u64)> {
    crate::boot::layout::ram_regions(size)
        .iter()
        .map(|(a, l)| (a.0, *l as u64))
        .collect()
}

/// Guest RAM mapped from a migration source's own files (`MemFDs`): the same pages.
pub fn memory_from_files(
    files: Vec<(vm_migration::protocol::MemoryFd, std::os::fd::OwnedFd)>,
) -> Result<GuestMemoryMmap> {
    // The sizes come from the peer: their sum may not fit (then nothing is mapped).
    let size = files
        .iter()
        .try_fold(0u64, |sum, (f, _)| sum.checked_add(f.size))
        .ok_or_else(|| VmError::Memory {
            size: u64::MAX,
            reason: format!(
                "the sizes of the {} memory files add up past 2^64 bytes",
                files.len()
            ),
        })?;
    let mut ranges = Vec::with_capacity(files.len());
    for (f, fd) in files {
        let file = std::fs::File::from(fd);
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if f.file_offset
            .checked_add(f.size)
            .is_none_or(|end| end > len)
        {
            return Err(VmError::Memory {
                size,
                reason: format!(
                    "the file for gpa {:#x} holds {len} bytes, not {:#x} at offset {:#x}",
                    f.gpa, f.size, f.file_offset
                ),
            });
        }
        let len = usize::try_from(f.size).map_err(|_| VmError::Memory {
            size,
            reason: format!(
                "range of {:#x} bytes at gpa {:#x} is too large",
                f.size, f.gpa
            ),
        })?;
        ranges.push((
            GuestAddress(f.gpa),
            len,
            Some(vm_memory::FileOffset::new(file, f.file_offset)),
        ));
    }
    GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(|e| VmError::Memory {
        size,
        reason: e.to_string(),
    })
}

fn serial_sink(cfg: &VmConfig) -> Result<Option<Box<dyn Write + Send + Sync>>> {
    Ok(match cfg.serial.mode {
        // Pty and Socket are refused by VmConfig::validate.
        ConsoleMode::Off | ConsoleMode::Pty | ConsoleMode::Socket => None,
        ConsoleMode::Null => Some(Box::new(std::io::sink())),
        ConsoleMode::Tty => Some(Box::new(std::io::stdout())),
        ConsoleMode::File => {
            let path = cfg.serial.file.clone().unwrap_or_default();
            // Append: on one machine one file holds the whole life of a migrated VM.
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| VmError::SerialFile {
                    path: path.display().to_string(),
                    source,
                })?;
            Some(Box::new(f))
        }
    })
}

/// The machine's state apart from guest RAM, as plain data (migration's stop-and-copy).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    /// Bumped whenever the layout of this struct changes incompatibly.
    pub version: u32,
    pub vcpus: Vec<hypervisor::VcpuState>,
    pub vm: hypervisor::VmState,
    pub serial: Option<devices::SerialSnapshot>,
    pub pm_control: u16,
    /// PM1 event status and enable (the power button); absent from older states: 0.
    #[serde(default)]
    pub pm_status: u16,
    #[serde(default)]
    pub pm_enable: u16,
    /// The PCI functions (virtio disks and rng), in slot order.
    pub devices: Vec<PciDeviceState>,
    /// The virtio-iommu's table (versioned on its own), when the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub viommu: Option<devices::viommu::ViommuState>,
    /// The vfio-user devices' migration data, in slot order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_devices: Vec<crate::user_devices::UserDeviceState>,
    /// The VFIO devices' functions and migration data, in slot order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vfio_devices: Vec<crate::vfio_devices::VfioDeviceState>,
}

/// The TSC's MSR (left out of a rehearsed load: see [`IncomingMachine::fresh_state`]).
const MSR_IA32_TSC: u32 = 0x10;

/// Current [`MachineState::version`] (2: PCI devices).
pub const MACHINE_STATE_VERSION: u32 = 2;

/// How a [`MachineState`] is written out. The reader tells them apart by the first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateEncoding {
    /// JSON: snapshots (`state.json`, read by people and tools), and older sources.
    Json,
    /// [`BINARY_STATE_MAGIC`], then MessagePack with named fields. The migration wire:
    /// KVM's register blocks are byte strings here, where JSON spells each byte as a
    /// number; on the idle 4 GiB guest JSON cost ~0.1 ms to write on the source and
    /// ~0.25 ms to parse on the destination, both inside the downtime.
    Binary,
}

/// How deep a binary state may nest (the struct itself: ~6).
const MAX_STATE_DEPTH: usize = 32;

/// Opens a [`StateEncoding::Binary`] state ("Ferry machine state", encoding 1). JSON
/// starts with `{`, so neither is taken for the other.
pub const BINARY_STATE_MAGIC: [u8; 4] = *b"FMS\x01";

impl MachineState {
    pub fn encode(&self, encoding: StateEncoding) -> std::result::Result<Vec<u8>, String> {
        match encoding {
            StateEncoding::Json => {
                serde_json::to_vec(self).map_err(|e| format!("machine state: {e}"))
            }
            StateEncoding::Binary => {
                let mut out = BINARY_STATE_MAGIC.to_vec();
                // Named fields: `#[serde(default)]` and skipped fields work as in JSON.
                rmp_serde::encode::write_named(&mut out, self)
                    .map_err(|e| format!("machine state: {e}"))?;
                Ok(out)
            }
        }
    }

    /// The state of a machine without devices, its serial port and power management
    /// as reset.
    fn without_devices(vcpus: Vec<hypervisor::VcpuState>, vm: hypervisor::VmState) -> Self {
        MachineState {
            version: MACHINE_STATE_VERSION,
            vcpus,
            vm,
            serial: None,
            pm_control: 0,
            pm_status: 0,
            pm_enable: 0,
            devices: Vec::new(),
            viommu: None,
            user_devices: Vec::new(),
            vfio_devices: Vec::new(),
        }
    }

    /// A state of `vcpus` vCPUs with every register zero and no devices: the shape of a
    /// real one, to run its encoding once ahead of the pause (see `prepare_pause`).
    pub fn blank(vcpus: u32) -> MachineState {
        let vcpu = |index| hypervisor::VcpuState {
            index,
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Box::default(),
            xcrs: Some(Default::default()),
            lapic: Default::default(),
            msrs: vec![Default::default(); 32],
            events: Default::default(),
            debugregs: Default::default(),
            mp_state: Default::default(),
        };
        let vm = hypervisor::VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        };
        Self::without_devices((0..vcpus).map(vcpu).collect(), vm)
    }

    /// Reads either encoding (untrusted bytes: an error, never a panic).
    pub fn decode(bytes: &[u8]) -> std::result::Result<MachineState, String> {
        match bytes.strip_prefix(&BINARY_STATE_MAGIC[..]) {
            Some(rest) => {
                let bad = |e: String| format!("machine state (binary, {} bytes): {e}", bytes.len());
                let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(rest));
                // Deep enough for this struct; a hostile blob nests no deeper (rmp's
                // default, 1024, recurses that far on the receiving thread's stack).
                de.set_max_depth(MAX_STATE_DEPTH);
                let state =
                    serde::Deserialize::deserialize(&mut de).map_err(|e| bad(e.to_string()))?;
                match rest.len() as u64 - de.position() {
                    0 => Ok(state),
                    n => Err(bad(format!("{n} bytes after the state"))),
                }
            }
            None if bytes.starts_with(b"FMS") => Err(match bytes.get(3) {
                Some(v) => format!(
                    "machine state: binary encoding {v} is not known here (this Ferry reads {})",
                    BINARY_STATE_MAGIC[3]
                ),
                None => "machine state: 3 bytes, a binary header cut short".to_string(),
            }),
            None => serde_json::from_slice(bytes)
                .map_err(|e| format!("machine state (JSON, {} bytes): {e}", bytes.len())),
        }
    }
}

/// A [`MachineState`] whose KVM part an [`IncomingMachine`] loaded (`load`), to start that
/// machine with (`start_loaded`).
pub struct LoadedState {
    state: MachineState,
    /// False where `load` left the vCPUs' registers for `start_loaded` (PAE paging).
    vcpus_loaded: bool,
}

/// 32-bit paging with PAE (CR0.PG, CR4.PAE, not EFER.LMA): setting such a vCPU's
/// registers makes KVM read its page-directory pointers from guest RAM at CR3.
fn pae_paging(s: &kvm_bindings::kvm_sregs) -> bool {
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LMA: u64 = 1 << 10;
    s.cr0 & CR0_PG != 0 && s.cr4 & CR4_PAE != 0 && s.efer & EFER_LMA == 0
}

/// What a migration's destination restores on its PCI bus: the virtio functions, the
/// vIOMMU, the vfio-user devices, the VFIO devices.
type DevicesState<'a> = (
    &'a [PciDeviceState],
    Option<&'a devices::viommu::ViommuState>,
    &'a [crate::user_devices::UserDeviceState],
    &'a [crate::vfio_devices::VfioDeviceState],
);

/// A machine put together but whose vCPUs have not run yet.
/// Field order is drop order: the KVM VM goes before the RAM it points into.
struct Parts {
    config: VmConfig,
    /// Where the serial port writes, opened with the VM rather than at its start: a
    /// migration's destination starts the VM in the downtime (the open of a file took
    /// 17-25 µs of it here, once 190), and a file it cannot open then fails the
    /// migration before the source pauses, not after.
    serial: Option<Box<dyn Write + Send + Sync>>,
    vcpus: Vec<hypervisor::Vcpu>,
    /// One thread per vCPU, made with the VM and waiting for its vCPU.
    vcpu_threads: Vec<vcpu::VcpuThread>,
    hv: Arc<hypervisor::Vm>,
    mem: GuestMemoryMmap,
}

/// A VM whose vCPUs run on their own threads.
pub struct Machine {
    pub config: VmConfig,
    hv: Arc<hypervisor::Vm>,
    control: Arc<VcpuControl>,
    /// Auto-converge's hold on the vCPUs (stopped before them, in Drop).
    throttle: VcpuThrottle,
    /// Dirty logging for rate measurements and the per-vCPU dirty limit, and the
    /// limiter (stopped before the vCPUs, in Drop).
    ring_watch: RingWatch,
    /// vCPU threads handed their vCPU and not yet seen to take it
    /// ([`Machine::confirm_vcpus`]).
    starting: Mutex<Vec<vcpu::StartingVcpu>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    events: Mutex<Receiver<VmEvent>>,
    pub exit_counters: Arc<ExitCounters>,
    pub serial_counters: Option<Arc<SerialCounters>>,
    serial: Option<Arc<Mutex<Serial>>>,
    pm: Arc<Mutex<AcpiPm>>,
    /// PCI bus 0 and the virtio devices.
    pci: PciDevices,
    paused: AtomicBool,
    /// Test-only seam: the device log is dropped at every collection.
    drop_logs: dirty::DropLogs,
    /// Test-only seam: `pause` leaves the devices running; they stop only when the state
    /// is saved, 50 ms after the final collection (the wrong order, which loses pages).
    pause_devices_late: bool,
    dirty_sources: dirty::DirtySources,
    /// Last field: dropped after the KVM VM whose memslots point into it.
    mem: GuestMemoryMmap,
}

/// A machine built to receive a migration: RAM and vCPUs exist, nothing runs until
/// [`IncomingMachine::start`] restores the state.
pub struct IncomingMachine {
    parts: Parts,
}

impl IncomingMachine {
    /// Guest RAM, to write received pages into.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.parts.mem
    }

    pub fn config(&self) -> &VmConfig {
        &self.parts.config
    }

    /// Starts the received machine from `state` ([`IncomingMachine::load`], then
    /// [`IncomingMachine::start_loaded`]). `paused`: its vCPUs park before they first run
    /// and its devices wait (`Machine::resume` starts both). Its vCPU threads are handed
    /// their vCPUs; [`Machine::confirm_vcpus`] waits for them.
    pub fn start(self, state: MachineState, paused: bool) -> Result<Machine> {
        let loaded = self.load(state)?;
        self.start_loaded(loaded, paused)
    }

    /// This machine's own state as built (before any state was loaded), in the wire's
    /// encoding: what [`IncomingMachine::rehearse_load`] loads. Without the TSC: KVM
    /// takes a TSC written from here within a second of where the last one written has
    /// got to as an attempt to keep vCPUs in step, and keeps its offset; after a
    /// rehearsal's write, the real load's TSC could be swallowed that way.
    pub fn fresh_state(&self) -> Result<Vec<u8>> {
        let vcpus = self
            .parts
            .vcpus
            .iter()
            .map(|v| {
                v.save_state().map(|mut s| {
                    s.msrs.retain(|m| m.index != MSR_IA32_TSC);
                    s
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        MachineState::without_devices(vcpus, self.parts.hv.save_state()?)
            .encode(StateEncoding::Binary)
            .map_err(VmError::State)
    }

    /// Decodes and loads `fresh` ([`IncomingMachine::fresh_state`]): what
    /// [`IncomingMachine::load`] does in a migration's downtime, run ahead so that the
    /// real load finds that code and memory warm. Never after the real load: it would
    /// undo it.
    pub fn rehearse_load(&self, fresh: &[u8]) -> Result<()> {
        let decoded = MachineState::decode(fresh).map_err(VmError::State)?;
        self.load(decoded).map(drop)
    }

    /// Loads the KVM part of `state`, the VM-wide state then each vCPU (from the calling
    /// thread), while the machine waits: no vCPU runs and no device exists yet, so guest
    /// RAM may still be written meanwhile. A vCPU in 32-bit PAE paging is the exception:
    /// KVM reads its page-directory pointers from guest RAM when its registers are set,
    /// so those wait for [`IncomingMachine::start_loaded`].
    pub fn load(&self, state: MachineState) -> Result<LoadedState> {
        self.check_state(&state)?;
        self.parts.hv.restore_state(&state.vm)?;
        let vcpus_loaded = !state.vcpus.iter().any(|v| pae_paging(&v.sregs));
        if vcpus_loaded {
            self.load_vcpus(&state)?;
        } else {
            log::info!("a vCPU uses PAE paging: its registers are set once all RAM is here");
        }
        Ok(LoadedState {
            state,
            vcpus_loaded,
        })
    }

    /// Starts the machine [`IncomingMachine::load`] loaded `loaded` into: the vCPUs'
    /// registers are set before any device exists (a restored device may serve its queues
    /// and interrupt at once), then the devices, then the vCPU threads.
    pub fn start_loaded(self, loaded: LoadedState, paused: bool) -> Result<Machine> {
        let LoadedState {
            state,
            vcpus_loaded,
        } = loaded;
        if !vcpus_loaded {
            self.load_vcpus(&state)?;
        }
        self.start_with(state, paused)
    }

    fn load_vcpus(&self, state: &MachineState) -> Result<()> {
        for (v, s) in self.parts.vcpus.iter().zip(&state.vcpus) {
            v.restore_state(s)?;
        }
        Ok(())
    }

    fn check_state(&self, state: &MachineState) -> Result<()> {
        if state.version != MACHINE_STATE_VERSION {
            return Err(VmError::State(format!(
                "machine state version {} is not {MACHINE_STATE_VERSION}",
                state.version
            )));
        }
        if state.vcpus.len() != self.parts.vcpus.len() {
            return Err(VmError::State(format!(
                "state has {} vCPUs, this VM {}",
                state.vcpus.len(),
                self.parts.vcpus.len()
            )));
        }
        Ok(())
    }

    /// The devices from `state`, then the vCPU threads (their state loaded already).
    fn start_with(self, state: MachineState, paused: bool) -> Result<Machine> {
        // The pages received went through the VMM's own writes, so its log holds them;
        // it is not cleared here (~0.2 ms of downtime for 4 GiB, first touches of its
        // pages): nothing reads it before `start_dirty_log`, which forgets it.
        Machine::start(
            self.parts,
            state.serial.as_ref(),
            AcpiPmState {
                control: state.pm_control,
                status: state.pm_status,
                enable: state.pm_enable,
            },
            Some((
                &state.devices,
                state.viommu.as_ref(),
                &state.user_devices,
                &state.vfio_devices,
            )),
            paused,
        )
    }
}

impl Machine {
    /// Builds the VM: dirty tracking first, then memslots, then vCPUs (KVM's order).
    fn build(mut config: VmConfig, mem: Option<GuestMemoryMmap>) -> Result<Parts> {
        config.validate()?;
        let serial = serial_sink(&config)?;
        let ncpus = config.cpus.boot_vcpus;
        let mem = match mem {
            Some(m) => m,
            None => create_memory(config.memory.size, config.shared_memory(), true)?,
        };

        let builder = VmBuilder::new()?;
        let caps = builder.dirty_caps();
        let tracked = match config.dirty_tracking.ring_entries {
            0 => {
                log::info!("dirty tracking: bitmap (rings turned off)");
                builder.use_dirty_bitmap()?
            }
            n if caps.ring.is_none() => {
                log::warn!("dirty tracking: bitmap (KVM has no dirty ring; {n} entries asked)");
                builder.use_dirty_bitmap()?
            }
            // The default may exceed what this KVM allows: then take its largest.
            n if n == crate::config::DEFAULT_RING_ENTRIES => {
                let max = caps.ring.map_or(n, |r| r.1);
                builder.enable_dirty_ring(n.min(max))?
            }
            n => builder.enable_dirty_ring(n)?,
        };
        match tracked.tracking() {
            DirtyTracking::Ring {
                entries,
                flavor,
                backup_bitmap,
            } => log::info!(
                "dirty tracking: ring of {entries} entries per vCPU ({flavor:?}; KVM max {}), backup bitmap {}",
                caps.ring.map_or(0, |r| r.1),
                if backup_bitmap { "on" } else { "not advertised" }
            ),
            DirtyTracking::Bitmap { manual_protect } => log::info!(
                "dirty tracking: bitmap, {}",
                if manual_protect { "get/clear split" } else { "get clears" }
            ),
        }
        let slots = mem
            .iter()
            .map(|r| MemorySlot {
                guest_phys_addr: r.start_addr().0,
                size: r.len(),
                host_addr: r.as_ptr() as u64,
            })
            .collect();
        // SAFETY: the regions are owned by `mem`, which the Machine keeps for as long as
        // the KVM VM (`hv`) lives: `hv` is dropped before `mem` (field order; vCPU
        // threads hold `hv` clones and are joined in Drop first).
        let with_mem = unsafe { tracked.add_memory(slots)? };
        let (hv, vcpus) = with_mem.create_vcpus(ncpus)?;
        hypervisor::install_kick_handler()?;
        let vcpu_threads = vcpus
            .iter()
            .map(|v| vcpu::VcpuThread::new(v.index()))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|source| VmError::Io {
                what: "spawning a vCPU thread",
                source,
            })?;

        Ok(Parts {
            config,
            serial,
            mem,
            hv,
            vcpus,
            vcpu_threads,
        })
    }

    /// Builds the VM and boots its kernel: the kernel and ACPI tables are written and the
    /// boot vCPU set up before any vCPU runs.
    pub fn boot(config: VmConfig) -> Result<Machine> {
        let kernel = config
            .payload
            .kernel
            .clone()
            .ok_or(crate::config::ConfigError::NoKernel)?;
        let mut parts = Self::build(config, None)?;
        let c = &parts.config;
        // The virtio-iommu and its endpoints, where PciDevices will put them.
        let viot = crate::pci_devices::viot_layout(c)
            .map(|(iommu, endpoints)| crate::boot::acpi::Viot::new(iommu, endpoints))
            .transpose()
            .map_err(|e| VmError::State(format!("ACPI VIOT: {e}")))?;
        let entry = crate::boot::load_kernel_with_viot(
            &parts.mem,
            &kernel,
            c.payload.cmdline.as_deref().unwrap_or(""),
            c.payload.initramfs.as_deref(),
            c.cpus.boot_vcpus,
            viot.as_ref(),
        )?;
        // What the loader wrote is boot state, not guest activity.
        dirty::reset_vmm_log(&parts.mem);
        entry.configure_vcpu(parts.vcpus[0].fd())?;
        log::info!(
            "booting {} with {} vCPU(s), {} MiB",
            kernel.display(),
            c.cpus.boot_vcpus,
            c.memory.size >> 20
        );
        let machine = Self::start(parts, None, AcpiPmState::default(), None, false)?;
        machine.confirm_vcpus()?;
        Ok(machine)
    }

    /// Builds a VM from a migration source's configuration, to receive its RAM and state.
    pub fn incoming(mut config: VmConfig) -> Result<IncomingMachine> {
        // A bad configuration is refused as such, before any memory is made for it.
        config.validate()?;
        let mem = create_memory(config.memory.size, config.shared_memory(), false)?;
        let parts = Self::build(config, Some(mem))?;
        Ok(IncomingMachine { parts })
    }

    /// Builds a VM on a source's RAM files (`MemFDs`): its memory is in place already.
    pub fn incoming_on(config: VmConfig, mem: GuestMemoryMmap) -> Result<IncomingMachine> {
        let layout = |m: &GuestMemoryMmap| -> Vec<(u64, u64)> {
            m.iter().map(|r| (r.start_addr().0, r.len())).collect()
        };
        let expected = create_layout(config.memory.size);
        if layout(&mem) != expected {
            return Err(VmError::Memory {
                size: config.memory.size,
                reason: format!(
                    "the files cover {:x?}, but this configuration's RAM is {expected:x?}",
                    layout(&mem)
                ),
            });
        }
        let parts = Self::build(config, Some(mem))?;
        Ok(IncomingMachine { parts })
    }

    fn start(
        p: Parts,
        serial_state: Option<&devices::SerialSnapshot>,
        pm: AcpiPmState,
        devices_state: Option<DevicesState<'_>>,
        paused: bool,
    ) -> Result<Machine> {
        let mut bus = PioBus::default();
        let mut serial_counters = None;
        let mut serial = None;
        if let Some(sink) = p.serial {
            let line_hv = p.hv.clone();
            let irq = devices::IrqLine(Box::new(move || {
                // A pulse: COM1's pin is edge-triggered.
                line_hv
                    .set_irq_line(COM1_IRQ, true)
                    .and_then(|()| line_hv.set_irq_line(COM1_IRQ, false))
                    .map_err(|e| std::io::Error::other(format!("COM1 interrupt: {e}")))
            }));
            let dev = match serial_state {
                Some(s) => Serial::from_snapshot(irq, sink, s).map_err(VmError::State)?,
                None => Serial::new(irq, sink),
            };
            serial_counters = Some(dev.counters());
            let dev = Arc::new(Mutex::new(dev));
            bus.insert(COM1_PORT, 8, dev.clone());
            serial = Some(dev);
        }
        let sci_hv = p.hv.clone();
        let sci: devices::SciLine = Box::new(move |level| {
            if let Err(e) = sci_hv.set_irq_line(crate::boot::acpi::SCI_IRQ.into(), level) {
                log::error!("ACPI SCI (GSI {}): {e}", crate::boot::acpi::SCI_IRQ);
            }
        });
        let pm = Arc::new(Mutex::new(AcpiPm::new(pm, sci)));
        bus.insert(I8042_PORT, 5, Arc::new(Mutex::new(I8042)));
        bus.insert(DEBUG_EXIT_PORT, 4, Arc::new(Mutex::new(DebugExit)));
        bus.insert(ACPI_PM1A_EVT_PORT, ACPI_PM_PORTS, pm.clone());
        // PCI bus 0, reached through 0xCF8/0xCFC and ECAM, its BARs in the window below.
        let mut pci = PciDevices::new(&p.config, &p.hv, &p.mem)?;
        if let Some((states, viommu, user, vfio)) = devices_state {
            pci.restore(states, viommu)?;
            pci.restore_user(user)?;
            pci.restore_vfio(vfio)?;
        }
        bus.insert(
            CONFIG_IO_PORT,
            CONFIG_IO_LEN,
            Arc::new(Mutex::new(PciConfigIo::new(pci.bus().clone()))),
        );
        let mut mmio = MmioBus::default();
        mmio.insert(
            PCI_ECAM_START,
            PCI_ECAM_SIZE,
            Arc::new(Mutex::new(PciEcam::new(pci.bus().clone()))),
        );
        mmio.insert(
            BAR_WINDOW_START,
            BAR_WINDOW_SIZE,
            Arc::new(Mutex::new(PciBarWindow::new(
                pci.bus().clone(),
                BAR_WINDOW_START,
            ))),
        );
        let drop_device_log = std::env::var_os("FERRY_TEST_DROP_DEVICE_LOG").is_some();
        let pause_devices_late = std::env::var_os("FERRY_TEST_PAUSE_DEVICES_LATE").is_some();
        if pause_devices_late {
            log::warn!(
                "FERRY_TEST_PAUSE_DEVICES_LATE is set: devices keep writing guest RAM until \
                 after the final dirty collection (a test seam; pages will be lost)"
            );
        }
        let drop_viommu_log = std::env::var_os("FERRY_TEST_DROP_VIOMMU_LOG").is_some();
        if drop_viommu_log {
            log::warn!(
                "FERRY_TEST_DROP_VIOMMU_LOG is set: DMA through the virtio-iommu is NOT \
                 migrated (a test seam; pages will be lost)"
            );
        }
        if drop_device_log {
            log::warn!(
                "FERRY_TEST_DROP_DEVICE_LOG is set: device writes to guest RAM are NOT \
                 migrated (a test seam; pages will be lost)"
            );
        }
        let bus = Arc::new(bus);
        let mmio = Arc::new(mmio);
        if paused {
            // As `Machine::pause` leaves them, so that `resume` undoes exactly that.
            pci.pause();
        }

        let control = Arc::new(if paused {
            VcpuControl::parked_at_start()
        } else {
            VcpuControl::default()
        });
        let exit_counters = Arc::new(ExitCounters::default());
        let (tx, events) = channel();
        // Every thread is handed its vCPU; none is waited for here (`confirm_vcpus`).
        let mut starting = Vec::new();
        let mut failed = None;
        for (v, t) in p.vcpus.into_iter().zip(p.vcpu_threads) {
            match t.start(vcpu::VcpuStart {
                vcpu: v,
                bus: bus.clone(),
                mmio: mmio.clone(),
                control: control.clone(),
                counters: exit_counters.clone(),
                events: tx.clone(),
            }) {
                Ok(s) => starting.push(s),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(source) = failed {
            // No half-started machine: the threads that did start end here.
            control.stop();
            starting.into_iter().for_each(vcpu::StartingVcpu::end);
            return Err(VmError::Io {
                what: "starting a vCPU thread",
                source,
            });
        }
        let ring_watch = RingWatch::new(p.hv.clone(), control.clone(), p.config.cpus.boot_vcpus);
        Ok(Machine {
            config: p.config,
            hv: p.hv,
            throttle: VcpuThrottle::new(control.clone()),
            ring_watch,
            control,
            starting: Mutex::new(starting),
            threads: Mutex::default(),
            events: Mutex::new(events),
            exit_counters,
            serial_counters,
            serial,
            pm,
            pci,
            paused: AtomicBool::new(paused),
            drop_logs: dirty::DropLogs {
                devices: drop_device_log,
                viommu: drop_viommu_log,
            },
            pause_devices_late,
            dirty_sources: Default::default(),
            mem: p.mem,
        })
    }

    /// Waits until every vCPU thread took its vCPU (it can be kicked from then on); an
    /// error when one ended instead. [`Machine::start`] only hands them over, so that a
    /// migration destination can tell the source its VM runs without waiting for these
    /// threads to be scheduled: on a host whose CPUs the guest's busy vCPUs then hold,
    /// that wait took 1.6-6.4 ms of the downtime (2 GiB `verify` guest, 2 vCPUs, 2
    /// cores). Those threads wait for nothing but their vCPU, so only a thread that
    /// panicked at its very start fails here. Until then a kick or a dirty-limit hold
    /// skips a thread not yet registered (it checks for a pause before its first
    /// KVM_RUN): confirm before anything else can reach the machine.
    pub fn confirm_vcpus(&self) -> Result<()> {
        let starting =
            std::mem::take(&mut *self.starting.lock().unwrap_or_else(|p| p.into_inner()));
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        let mut failed = None;
        for s in starting {
            match s.ready() {
                Ok(t) => threads.push(t),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        match failed {
            // The machine is dropped by the caller, which ends the threads that started.
            Some(source) => Err(VmError::Io {
                what: "starting a vCPU thread",
                source,
            }),
            None => Ok(()),
        }
    }

    /// The vCPU threads at a lower priority until the guards are dropped: see
    /// [`vcpu::VcpuControl::lower_priority`].
    pub fn lower_vcpu_priority(&self) -> Vec<vm_migration::priority::ThreadNice> {
        self.control.lower_priority()
    }

    /// Pauses the vCPUs (if running) and saves the machine's state apart from RAM. The
    /// machine stays paused.
    pub fn save_state(&self) -> Result<MachineState> {
        // Paused from here on, whether or not the save works: `resume` undoes it.
        self.paused.store(true, Ordering::SeqCst);
        // Without devices nothing but the vCPUs (from their own exits), the in-kernel PIT
        // and the power button (its level SCI, raised now lands in either state as it
        // could before; `AcpiPm` raises it again where it starts) changes the VM-wide
        // state (see `pause_and_save`): it is saved as soon as the vCPUs are out of
        // KVM_RUN, beside their own saves. With devices, once these are paused below.
        let quiet = !self.pause_devices_late && !self.pci.has_devices();
        let (vcpus, vm) = self
            .control
            .pause_and_save(self.config.cpus.boot_vcpus, || {
                quiet.then(|| self.hv.save_state())
            })
            .map_err(VmError::State)?;
        if self.pause_devices_late {
            // The seam's wrong order: the device write held since the pause lands now,
            // after the final collection, with time for more.
            self.pci.release_dma();
            std::thread::sleep(Duration::from_millis(50));
        }
        self.pci.pause();
        let pm = self.pm.lock().unwrap_or_else(|p| p.into_inner()).state();
        let vm = match vm {
            Some(saved) => saved?,
            None => self.hv.save_state()?,
        };
        Ok(MachineState {
            version: MACHINE_STATE_VERSION,
            vcpus,
            vm,
            serial: self
                .serial
                .as_ref()
                .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).snapshot()),
            pm_control: pm.control,
            pm_status: pm.status,
            pm_enable: pm.enable,
            devices: self.pci.state(),
            viommu: self.pci.viommu_state(),
            user_devices: self.pci.user_states().map_err(VmError::State)?,
            vfio_devices: self.pci.vfio_states().map_err(VmError::State)?,
        })
    }

    /// Pauses the machine for good (a migration's switch-over) and saves its state: what
    /// [`Machine::save_state`] returns, final from here on (nothing in it changes while
    /// the last pages are collected). A machine with devices parks its vCPUs, lets the
    /// devices finish the requests in flight (their completion interrupts reach the
    /// vCPUs' local APICs), then has the vCPUs save: saved before, a level interrupt raised
    /// meanwhile would be pending in the IOAPIC's state but in no vCPU's, and stay stuck
    /// on the destination. Without devices each vCPU saves as it parks (one wake-up
    /// instead of two, ~0.2 ms of downtime on 2 vCPUs here): what else raises interrupts
    /// does so synchronously from a vCPU's own exit (COM1, through KVM_IRQ_LINE), or is
    /// the in-kernel PIT, whose tick may fall between the vCPUs' save and the VM-wide
    /// one whichever way they are ordered.
    pub fn pause_and_save(&self) -> Result<MachineState> {
        if self.pci.has_devices() {
            self.pause();
        }
        self.save_state()
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// A test seam that stops devices late is on (`FERRY_TEST_PAUSE_DEVICES_LATE`, or a
    /// vfio-user device's [`crate::user_devices::STOP_LATE_ENV`]): devices write until
    /// `save_state`, so the state is not final at the pause.
    pub fn pauses_devices_late(&self) -> bool {
        self.pause_devices_late || self.pci.user_devices_stop_late()
    }

    pub fn hypervisor(&self) -> &Arc<hypervisor::Vm> {
        &self.hv
    }

    /// Parks every vCPU outside KVM_RUN (kicked, so the CPU's buffered dirty entries are
    /// in the rings).
    /// Then the devices finish the requests they are serving and take no more: from here
    /// on nothing writes guest RAM, so a dirty collection after this is the last word.
    pub fn pause(&self) {
        if !self.paused.swap(true, Ordering::SeqCst) {
            if self.pause_devices_late {
                // The seam pauses while a device write is in flight, and keeps it from
                // landing before the final collection.
                self.pci.hold_dma(Duration::from_secs(5));
            }
            self.control.pause(self.config.cpus.boot_vcpus);
            if !self.pause_devices_late {
                self.pci.pause();
            }
        }
    }

    /// Postcopy lost its source: every vCPU parks at its next exit, those waiting for a
    /// missing page stay waiting (see [`vcpu::VcpuControl::request_pause`]); the machine
    /// counts as paused from now on.
    pub fn pause_for_postcopy(&self) {
        self.paused.store(true, Ordering::SeqCst);
        self.control.request_pause();
    }

    /// Undoes [`Machine::pause_for_postcopy`] once the source is back.
    pub fn resume_after_postcopy(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.control.resume();
    }

    /// Presses the ACPI fixed-feature power button (`vm.power-button`): the guest gets an
    /// SCI if it enabled the event; a paused VM's guest sees it on resume.
    pub fn power_button(&self) {
        self.pm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .press_power_button();
    }

    /// Injects an NMI into every vCPU (`vm.nmi`); a paused VM takes it on resume.
    pub fn nmi(&self) {
        self.control.nmi();
    }

    pub fn resume(&self) {
        if self.paused.swap(false, Ordering::SeqCst) {
            // Devices first: they serve what the vCPUs queued before the pause.
            self.pci.resume();
            self.control.resume();
        }
    }

    /// Holds the vCPUs back for `percent`% of their time (auto-converge); 0 ends it.
    pub fn set_throttle(&self, percent: u8) -> Result<()> {
        self.throttle.set(percent).map_err(|source| VmError::Io {
            what: "starting the vCPU throttle thread",
            source,
        })?;
        log::info!("vCPU throttle: {}%", self.throttle.percent());
        Ok(())
    }

    /// Where each vCPU was when it last parked (after a `pause`).
    pub fn vcpu_snapshots(&self) -> Vec<vcpu::VcpuSnapshot> {
        self.control.snapshots()
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Writes guest RAM and the vCPUs' registers (as they last parked) to an ELF core
    /// file at `path` (see [`crate::coredump`]). Pause the machine first: the vCPUs of a
    /// running one would change memory while it is read.
    pub fn coredump(
        &self,
        path: &std::path::Path,
    ) -> std::result::Result<crate::coredump::CoreSummary, crate::coredump::CoredumpError> {
        crate::coredump::write_core_file(path, &self.mem, &self.vcpu_snapshots())
    }

    /// Starts dirty logging in KVM and forgets the VMM's own log.
    pub fn start_dirty_log(&self) -> Result<()> {
        self.ring_watch
            .migration_starts(|| self.hv.start_dirty_log())?;
        dirty::reset_vmm_log(&self.mem);
        self.pci.set_dirty_tracking(true);
        self.dirty_sources.reset();
        Ok(())
    }

    /// Stops dirty logging in KVM (unless a dirty-rate measurement or a dirty limit still
    /// needs it) and the vIOMMU's tracking rules.
    pub fn stop_dirty_log(&self) -> Result<()> {
        self.pci.set_dirty_tracking(false);
        Ok(self.ring_watch.migration_ends()?)
    }

    /// Dirty-rate measurement and the per-vCPU dirty limit on this machine's rings.
    pub fn ring_watch(&self) -> &RingWatch {
        &self.ring_watch
    }

    /// Pages dirtied since the last collection, by anyone, as GPA ranges per region.
    pub fn collect_dirty(&self, kind: SyncKind) -> Result<Vec<RegionDirty>> {
        // DESIGN.md's order: the DMA trackers first (at the final pass the devices are
        // stopped, so this is their last word), then KVM's collection.
        let all_ram = || -> Vec<(u64, u64)> {
            self.mem
                .iter()
                .map(|r| (r.start_addr().0, r.len()))
                .collect()
        };
        let pages = |r: &[(u64, u64)]| -> u64 { r.iter().map(|&(_, l)| l.div_ceil(4096)).sum() };
        // vfio-user devices' own logs.
        let (mut user, everything) = self
            .pci
            .harvest_user_devices()
            .map_err(|e| VmError::State(format!("vfio-user device DMA log: {e}")))?;
        self.dirty_sources
            .user_devices
            .fetch_add(pages(&user), Ordering::Relaxed);
        if everything {
            log::warn!(
                "a vfio-user device reported a write it could not place: all of RAM is dirty"
            );
            user = all_ram();
        }
        // VFIO devices: their DMA logs or their IOMMU domains' dirty bits.
        let (mut vfio, everything) = self
            .pci
            .harvest_vfio_devices()
            .map_err(|e| VmError::State(format!("VFIO device dirty pages: {e}")))?;
        self.dirty_sources
            .vfio_devices
            .fetch_add(pages(&vfio), Ordering::Relaxed);
        if everything {
            log::warn!("a VFIO device reported a write it could not place: all of RAM is dirty");
            vfio = all_ram();
        }
        // Untrackable DMA makes its footprint dirty first, into the DMA log read below.
        self.pci.harvest_untrackable();
        let mut regions = dirty::collect(
            &self.hv,
            &self.mem,
            self.pci.dma_log(),
            kind,
            self.drop_logs,
            &self.dirty_sources,
        )?;
        dirty::add_ranges(&mut regions, &self.mem, &user);
        dirty::add_ranges(&mut regions, &self.mem, &vfio);
        Ok(regions)
    }

    /// Ahead of the final dirty collection, the guest still running: see
    /// `hypervisor::Vm::warm_dirty_rings`.
    pub fn prepare_final_collection(&self) {
        self.hv.warm_dirty_rings();
    }

    /// Pages each source reported dirty since the migration's tracking started.
    pub fn dirty_sources(&self) -> &dirty::DirtySources {
        &self.dirty_sources
    }

    /// Pages the vIOMMU's footprint rules made dirty (0 without a vIOMMU).
    pub fn viommu_footprint_pages(&self) -> u64 {
        self.pci.viommu_table().map_or(0, |t| t.footprint_pages())
    }

    /// The virtio-iommu's BDF and its endpoints', for the ACPI VIOT table.
    pub fn viot(&self) -> Option<(u16, Vec<u16>)> {
        self.pci.viot()
    }

    /// Waits for the next event that ends the VM, up to `timeout` (None: forever).
    pub fn wait_event(&self, timeout: Option<Duration>) -> Option<VmEvent> {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        match timeout {
            None => events.recv().ok(),
            Some(t) => events.recv_timeout(t).ok(),
        }
    }

    /// Writes `data` at `gpa` through the VMM (logged as a VMM write).
    pub fn write_guest(&self, gpa: u64, data: &[u8]) -> std::result::Result<(), String> {
        use vm_memory::Bytes;
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| format!("write of {} bytes at {gpa:#x}: {e}", data.len()))
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.throttle.set(0);
        self.ring_watch.shut_down();
        self.control.stop();
        let starting = std::mem::take(self.starting.get_mut().unwrap_or_else(|p| p.into_inner()));
        starting.into_iter().for_each(vcpu::StartingVcpu::end);
        for t in self
            .threads
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
    }
}

/// Exit status of the `ferry` process for a VM event.
pub fn exit_status(ev: &VmEvent) -> i32 {
    match ev {
        VmEvent::DebugExit(v) => i32::from(*v),
        VmEvent::PowerOff => 0,
        VmEvent::Reset(_) => 0,
        VmEvent::Failed(_) => 1,
    }
}

#[cfg(test)]
mod tests {
    /// The API and a migration thread share one machine.
    #[test]
    fn machine_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<super::Machine>();
    }

    /// A state from the wire that is not one: an error naming the encoding, no panic.
    #[test]
    fn bad_machine_states_are_errors_naming_their_encoding() {
        use super::{MachineState, BINARY_STATE_MAGIC};
        let bin = |rest: &[u8]| [&BINARY_STATE_MAGIC[..], rest].concat();
        for (bytes, says) in [
            (bin(b""), "binary, 4 bytes"),
            (bin(&[0x81, 0xa1, b'x', 0x01]), "binary"),
            (bin(&[0xc1; 64]), "binary"),
            (b"FMS\x02{}".to_vec(), "binary encoding 2 is not known here"),
            (b"FMS".to_vec(), "cut short"),
            (bin(&[0x91; 4096]), "binary"),
            (b"{\"version\": 2}".to_vec(), "JSON, 14 bytes"),
            (Vec::new(), "JSON, 0 bytes"),
        ] {
            let e = MachineState::decode(&bytes).expect_err("refused");
            assert!(e.contains(says), "{bytes:x?}: {e}");
        }
    }

    /// Found by the `memory_files` fuzz target: sizes a peer sends could overflow the sum.
    #[test]
    fn memory_files_whose_sizes_overflow_are_refused() {
        use vm_migration::protocol::MemoryFd;
        let file = |size| {
            let f = unnamed_file(0x1000);
            (
                MemoryFd {
                    gpa: 0,
                    size,
                    file_offset: 0,
                },
                f,
            )
        };
        let e = super::memory_from_files(vec![file(u64::MAX - 0xfff), file(0x2000)])
            .expect_err("refused");
        assert!(e.to_string().contains("add up past 2^64"), "{e}");
        // Each one alone is refused for not fitting its file, naming it.
        let e = super::memory_from_files(vec![file(0x2000)]).expect_err("refused");
        assert!(e.to_string().contains("holds 4096 bytes"), "{e}");
    }

    /// A file of `len` bytes with no name left behind.
    fn unnamed_file(len: u64) -> std::os::fd::OwnedFd {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        f.set_len(len).unwrap();
        f.into()
    }
}

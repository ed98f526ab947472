//! A running machine: guest RAM, the KVM VM built in the order dirty tracking requires,
//! the legacy devices on the port bus, and the vCPU threads.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::{
    AcpiPmControl, DebugExit, PioBus, Serial, SerialCounters, ACPI_PM1A_CNT_PORT, COM1_IRQ,
    COM1_PORT, DEBUG_EXIT_PORT, I8042, I8042_PORT,
};
use hypervisor::{DirtyTracking, MemorySlot, SyncKind, VmBuilder};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{ConsoleMode, VmConfig};
use crate::dirty::{self, RegionDirty};
use crate::memory::GuestMemoryMmap;
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
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, VmError>;

/// Guest RAM with one region per entry of the platform's RAM layout.
pub fn create_memory(size: u64) -> Result<GuestMemoryMmap> {
    let ranges = crate::boot::layout::ram_regions(size);
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory {
        size,
        reason: e.to_string(),
    })
}

fn serial_sink(cfg: &VmConfig) -> Result<Option<Box<dyn Write + Send>>> {
    Ok(match cfg.serial.mode {
        ConsoleMode::Off => None,
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

/// A VM whose vCPUs run on their own threads.
pub struct Machine {
    pub config: VmConfig,
    hv: Arc<hypervisor::Vm>,
    control: Arc<VcpuControl>,
    threads: Vec<JoinHandle<()>>,
    events: Receiver<VmEvent>,
    pub exit_counters: Arc<ExitCounters>,
    pub serial_counters: Option<Arc<SerialCounters>>,
    paused: bool,
    /// Last field: dropped after the KVM VM whose memslots point into it.
    mem: GuestMemoryMmap,
}

impl Machine {
    /// Builds the VM and boots it: dirty tracking first, then memslots, then vCPUs; the
    /// kernel and ACPI tables are written before any vCPU runs.
    pub fn boot(mut config: VmConfig) -> Result<Machine> {
        config.validate()?;
        let kernel = config
            .payload
            .kernel
            .clone()
            .ok_or(crate::config::ConfigError::NoKernel)?;
        let ncpus = config.cpus.boot_vcpus;
        let mem = create_memory(config.memory.size)?;

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
        // the KVM VM (`hv`) lives: `hv` is dropped before `mem` (field order; vCPU threads hold `hv` clones and and vCPU
        // are joined in Drop first).
        let with_mem = unsafe { tracked.add_memory(slots)? };

        let entry = crate::boot::load_kernel(
            &mem,
            &kernel,
            config.payload.cmdline.as_deref().unwrap_or(""),
            config.payload.initramfs.as_deref(),
            ncpus,
        )?;
        // What the loader wrote is boot state, not guest activity.
        dirty::reset_vmm_log(&mem);

        let (hv, vcpus) = with_mem.create_vcpus(ncpus)?;
        hypervisor::install_kick_handler()?;

        let mut bus = PioBus::default();
        let mut serial_counters = None;
        if let Some(sink) = serial_sink(&config)? {
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Io {
                what: "eventfd for COM1",
                source,
            })?;
            hv.fd()
                .register_irqfd(&irq, COM1_IRQ)
                .map_err(|e| VmError::Io {
                    what: "KVM_IRQFD for COM1",
                    source: e.into(),
                })?;
            let serial = Serial::new(irq, sink);
            serial_counters = Some(serial.counters());
            bus.insert(COM1_PORT, 8, Arc::new(Mutex::new(serial)));
        }
        bus.insert(I8042_PORT, 5, Arc::new(Mutex::new(I8042)));
        bus.insert(DEBUG_EXIT_PORT, 4, Arc::new(Mutex::new(DebugExit)));
        bus.insert(
            ACPI_PM1A_CNT_PORT,
            2,
            Arc::new(Mutex::new(AcpiPmControl::default())),
        );
        let bus = Arc::new(bus);

        let boot_vcpu = &vcpus[0];
        entry.configure_vcpu(boot_vcpu.fd())?;

        let control = Arc::new(VcpuControl::default());
        let exit_counters = Arc::new(ExitCounters::default());
        let (tx, events) = channel();
        let mut threads = Vec::new();
        for v in vcpus {
            threads.push(
                vcpu::spawn(
                    v,
                    bus.clone(),
                    control.clone(),
                    exit_counters.clone(),
                    tx.clone(),
                )
                .map_err(|source| VmError::Io {
                    what: "spawning a vCPU thread",
                    source,
                })?,
            );
        }
        log::info!(
            "booted {} with {} vCPU(s), {} MiB",
            kernel.display(),
            ncpus,
            config.memory.size >> 20
        );
        Ok(Machine {
            config,
            hv,
            control,
            threads,
            events,
            exit_counters,
            serial_counters,
            paused: false,
            mem,
        })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn hypervisor(&self) -> &Arc<hypervisor::Vm> {
        &self.hv
    }

    /// Parks every vCPU outside KVM_RUN (kicked, so the CPU's buffered dirty entries are
    /// in the rings).
    pub fn pause(&mut self) {
        if !self.paused {
            self.control.pause(self.config.cpus.boot_vcpus);
            self.paused = true;
        }
    }

    pub fn resume(&mut self) {
        if self.paused {
            self.control.resume();
            self.paused = false;
        }
    }

    /// Where each vCPU was when it last parked (after a `pause`).
    pub fn vcpu_snapshots(&self) -> Vec<vcpu::VcpuSnapshot> {
        self.control.snapshots()
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Starts dirty logging in KVM and forgets the VMM's own log.
    pub fn start_dirty_log(&self) -> Result<()> {
        self.hv.start_dirty_log()?;
        dirty::reset_vmm_log(&self.mem);
        Ok(())
    }

    /// Pages dirtied since the last collection, by anyone, as GPA ranges per region.
    pub fn collect_dirty(&self, kind: SyncKind) -> Result<Vec<RegionDirty>> {
        Ok(dirty::collect(&self.hv, &self.mem, kind)?)
    }

    /// Waits for the next event that ends the VM, up to `timeout` (None: forever).
    pub fn wait_event(&self, timeout: Option<Duration>) -> Option<VmEvent> {
        match timeout {
            None => self.events.recv().ok(),
            Some(t) => self.events.recv_timeout(t).ok(),
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
        self.control.stop();
        for t in self.threads.drain(..) {
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

//! The machine's PCI devices: bus 0 with its host bridge and one virtio-pci function per
//! configured disk and rng, each with its memory BAR placed in the MMIO window below ECAM
//! (`vm-allocator`), its queue notifications as KVM ioeventfds, and its MSI-X vectors as
//! KVM MSI routes with one irqfd each. The same configuration always gives the same
//! slots and BAR addresses, so a migration's destination rebuilds the bus the source had
//! and then takes each function's state.

use std::sync::{Arc, Mutex};

use devices::guest_ram::{DmaHold, GuestRam};
use devices::pci::{MsixEffect, PciBus, PciDevice};
use devices::viommu::{IommuEndpoint, IommuTable, ViommuState, VirtioIommu};
use devices::virtio::{InterruptSink, VirtioDevice, VirtioPciDevice, VirtioPciState};
use vm_allocator::{AddressAllocator, AllocPolicy};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::layout::{MMIO_HOLE_START, PCI_ECAM_START};
use crate::config::VmConfig;
use crate::memory::GuestMemoryMmap;
use crate::outside_dma::{self, OutsideDmaDevice};
use crate::user_devices::{UserDevice, UserDeviceState};
use crate::vfio_devices::{KvmVfioInterrupts, VfioDevice, VfioDeviceState};

/// The guest-physical window memory BARs are placed in (up to the ECAM region).
pub const BAR_WINDOW_START: u64 = MMIO_HOLE_START;
pub const BAR_WINDOW_SIZE: u64 = PCI_ECAM_START - MMIO_HOLE_START;
/// IOAPIC pins 16-23 carry INTx, by slot (drivers that do not enable MSI-X).
const FIRST_INTX_GSI: u32 = 16;

/// The IOAPIC pin slot `slot`'s INTA is wired to (the DSDT's `_PRT` says the same).
pub fn intx_gsi(slot: u8) -> u32 {
    FIRST_INTX_GSI + u32::from(slot) % 8
}

#[derive(Debug, thiserror::Error)]
pub enum PciDevicesError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{id}: {what}: {reason}")]
    Setup {
        id: String,
        what: &'static str,
        reason: String,
    },
    #[error("device state for '{id}' (slot {slot}): {reason}")]
    Restore {
        id: String,
        slot: u8,
        reason: String,
    },
}

type Result<T> = std::result::Result<T, PciDevicesError>;
/// A device model, shared by its transport and its queue worker.
type SharedModel = Arc<Mutex<dyn VirtioDevice>>;

/// One virtio function as migrated, with the name and slot that identify it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct PciDeviceState {
    pub id: String,
    pub slot: u8,
    pub state: VirtioPciState,
}

struct VirtioFunction {
    id: String,
    slot: u8,
    dev: Arc<Mutex<VirtioPciDevice>>,
    /// Where the notify ioeventfds are registered (BAR 0's address then).
    ioevents_at: u64,
}

/// The virtio-iommu of a VM that has one.
struct Viommu {
    table: Arc<IommuTable>,
    /// Guest RAM with the DMA log: what the devices behind the vIOMMU write.
    dma_ram: GuestRam,
    bdf: u16,
    endpoints: Vec<u16>,
}

/// The endpoint ID of the function in `slot` of bus 0: its BDF.
pub fn bdf(slot: u8) -> u16 {
    u16::from(slot) << 3
}

/// Where the vIOMMU and the devices behind it sit, from the configuration alone (the
/// ACPI tables are written before the devices are made): the vIOMMU's BDF and its
/// endpoints' BDFs. Slots follow `models`' order: the disks, the rng, the vIOMMU last.
/// The vfio-user devices follow the vIOMMU, then the VFIO devices.
pub fn viot_layout(config: &VmConfig) -> Option<(u16, Vec<u16>)> {
    if !config.viommu_needed() {
        return None;
    }
    let behind: Vec<bool> = config
        .disks
        .iter()
        .map(|d| d.iommu)
        .chain(config.rng.iter().map(|r| r.iommu))
        .collect();
    let viommu_slot = behind.len() as u8 + 1;
    let mut endpoints: Vec<u16> = behind
        .iter()
        .enumerate()
        .filter(|(_, b)| **b)
        .map(|(i, _)| bdf(i as u8 + 1))
        .collect();
    endpoints.extend(
        config
            .user_devices
            .iter()
            .enumerate()
            .filter(|(_, u)| u.iommu)
            .map(|(i, _)| bdf(viommu_slot + 1 + i as u8)),
    );
    let first_vfio = viommu_slot + 1 + config.user_devices.len() as u8;
    endpoints.extend(
        config
            .devices
            .iter()
            .enumerate()
            .filter(|(_, d)| d.iommu)
            .map(|(i, _)| bdf(first_vfio + i as u8)),
    );
    Some((bdf(viommu_slot), endpoints))
}

/// Bus 0 and the virtio functions on it.
pub struct PciDevices {
    bus: Arc<PciBus>,
    functions: Vec<VirtioFunction>,
    hv: Arc<hypervisor::Vm>,
    /// Test seam (`FERRY_TEST_PAUSE_DEVICES_LATE`): holds device writes across the final
    /// dirty collection.
    dma_hold: Option<Arc<DmaHold>>,
    viommu: Option<Viommu>,
    /// vfio-user devices, after the virtio functions.
    user: Vec<UserDevice>,
    /// VFIO devices, after the vfio-user ones.
    vfio: Vec<VfioDevice>,
}

/// Interrupts of one function: MSI-X vectors through KVM routes and irqfds, INTx
/// through an IOAPIC pin.
struct KvmInterrupts {
    id: String,
    hv: Arc<hypervisor::Vm>,
    /// Per vector: its GSI and the irqfd that raises it.
    vectors: Vec<(u32, EventFd)>,
    intx_gsi: u32,
}

impl InterruptSink for KvmInterrupts {
    fn msix(&self, effect: MsixEffect) {
        match effect {
            MsixEffect::Route { vector, message } => {
                let Some((gsi, _)) = self.vectors.get(usize::from(vector)) else {
                    return;
                };
                if let Err(e) = self.hv.set_msi_route(*gsi, message.address, message.data) {
                    log::error!("{}: MSI-X vector {vector}: {e}", self.id);
                }
            }
            MsixEffect::Send { vector, .. } => {
                if let Some((_, fd)) = self.vectors.get(usize::from(vector)) {
                    if let Err(e) = fd.write(1) {
                        log::error!("{}: MSI-X vector {vector} irqfd: {e}", self.id);
                    }
                }
            }
        }
    }

    fn intx(&self, level: bool) {
        if let Err(e) = self.hv.set_irq_line(self.intx_gsi, level) {
            log::error!("{}: INTx on GSI {}: {e}", self.id, self.intx_gsi);
        }
    }
}

/// The device models the configuration asks for, with the names that identify them in
/// logs and in the migration stream: `disk0`, `disk1`, ... (or the disk's own id), `rng`.
/// Each configured device: its id, its model, and whether it sits behind the vIOMMU.
fn models(config: &VmConfig) -> Result<Vec<(String, SharedModel, bool)>> {
    let mut out: Vec<(String, SharedModel, bool)> = Vec::new();
    for (i, d) in config.disks.iter().enumerate() {
        let id = d.id.clone().unwrap_or_else(|| format!("disk{i}"));
        let file = d.open()?;
        // The id is the disk's serial number in the guest when it fits (20 bytes).
        let serial = (id.len() <= devices::virtio::ID_BYTES).then_some(id.as_str());
        let block = devices::virtio::Block::new(file, d.readonly, serial).map_err(|e| {
            PciDevicesError::Setup {
                id: id.clone(),
                what: "virtio-blk",
                reason: e.to_string(),
            }
        })?;
        log::info!(
            "{id}: virtio-blk on {} ({} sectors{})",
            d.path.display(),
            block.capacity(),
            if d.readonly { ", read-only" } else { "" }
        );
        out.push((id, Arc::new(Mutex::new(block)), d.iommu));
    }
    if let Some(r) = &config.rng {
        let file = r.open()?;
        log::info!("rng: virtio-rng from {}", r.src.display());
        out.push((
            "rng".to_string(),
            Arc::new(Mutex::new(devices::virtio::Rng::new(file))),
            r.iommu,
        ));
    }
    Ok(out)
}

/// The slot after `taken` functions besides the host bridge, if bus 0 has one left.
fn slot_after(taken: usize) -> Option<u8> {
    u8::try_from(taken + 1)
        .ok()
        .filter(|s| usize::from(*s) < devices::pci::SLOTS)
}

/// Makes the device in `slot` an endpoint of the vIOMMU (`viommu`, which the VM must have):
/// its endpoint ID and the table to tell it of its mappings through.
fn viommu_endpoint(
    viommu: Option<&mut Viommu>,
    id: &str,
    slot: u8,
) -> std::result::Result<(u32, Arc<IommuTable>), String> {
    let v = viommu.ok_or("iommu=on but the VM has no virtio-iommu")?;
    let endpoint = bdf(slot);
    v.endpoints.push(endpoint);
    log::info!("{id}: behind the virtio-iommu as endpoint {endpoint:#06x}");
    Ok((u32::from(endpoint), v.table.clone()))
}

/// Places each of `declared` (BAR index, size) in the BAR window (4 KiB at least, so a
/// BAR never shares a page) and tells the function; their addresses, in order.
fn place_bars(
    bars: &mut AddressAllocator,
    f: &mut dyn PciDevice,
    declared: &[(usize, u64)],
) -> std::result::Result<Vec<(usize, u64)>, String> {
    let mut placed = Vec::with_capacity(declared.len());
    for &(index, size) in declared {
        let size = size.max(4096);
        let range = bars
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map_err(|e| format!("no room for BAR {index} of {size:#x} bytes: {e:?}"))?;
        f.config_mut()
            .set_bar_address(index, range.start())
            .map_err(|e| e.to_string())?;
        placed.push((index, range.start()));
    }
    Ok(placed)
}

/// A device of another kind's restore error, as the PCI devices' own.
fn restore_error((id, slot, reason): (String, u8, String)) -> PciDevicesError {
    PciDevicesError::Restore { id, slot, reason }
}

impl PciDevices {
    /// Builds bus 0 with a function per configured device.
    pub fn new(
        config: &VmConfig,
        hv: &Arc<hypervisor::Vm>,
        mem: &GuestMemoryMmap,
    ) -> Result<PciDevices> {
        let mut bus = PciBus::default();
        let mut bars = AddressAllocator::new(BAR_WINDOW_START, BAR_WINDOW_SIZE).map_err(|e| {
            PciDevicesError::Setup {
                id: "pci".into(),
                what: "BAR window",
                reason: format!("{e:?}"),
            }
        })?;
        let mut next_gsi = hypervisor::FIRST_MSI_GSI;
        let mut ram = GuestRam::new(mem.clone());
        if let Some(us) = std::env::var("FERRY_TEST_DMA_DELAY_US")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            log::warn!("FERRY_TEST_DMA_DELAY_US={us}: every device write into the guest waits {us} µs (a test seam)");
            ram = ram.with_dma_delay(std::time::Duration::from_micros(us));
        }
        let mut dma_hold = None;
        if std::env::var_os("FERRY_TEST_PAUSE_DEVICES_LATE").is_some() {
            let hold = Arc::new(DmaHold::default());
            ram = ram.with_dma_hold(hold.clone());
            dma_hold = Some(hold);
        }
        if std::env::var_os("FERRY_BENCH_NO_DEVICE_LOG").is_some() {
            log::warn!("FERRY_BENCH_NO_DEVICE_LOG is set: no device write into the guest is dirty-logged (a benchmark seam; a migration would lose them)");
            ram = ram.without_log();
        }
        let mut viommu = config.viommu_needed().then(|| {
            let table = Arc::new(IommuTable::new());
            let dma_ram = ram.with_own_log();
            let marker = dma_ram.clone();
            table.set_gpa_marker(Box::new(move |gpa, len| marker.mark_gpa_range(gpa, len)));
            Viommu {
                table,
                dma_ram,
                bdf: 0,
                endpoints: Vec::new(),
            }
        });
        let mut all = models(config)?;
        if let Some(v) = &viommu {
            // Last, so the other devices keep the slots they have without it.
            let model: SharedModel = Arc::new(Mutex::new(VirtioIommu::new(v.table.clone())));
            all.push(("viommu".to_string(), model, false));
        }
        let mut functions = Vec::new();
        for (id, model, behind_iommu) in all {
            let setup = |what: &'static str, reason: String| PciDevicesError::Setup {
                id: id.clone(),
                what,
                reason,
            };
            let vectors = model
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .queue_max_sizes()
                .len()
                + 1;
            let mut irqfds = Vec::with_capacity(vectors);
            for _ in 0..vectors {
                let fd = EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|e| setup("MSI-X irqfd", e.to_string()))?;
                hv.register_irqfd(&fd, next_gsi)
                    .map_err(|e| setup("MSI-X irqfd", e.to_string()))?;
                irqfds.push((next_gsi, fd));
                next_gsi += 1;
            }
            // Slots in configuration order after the host bridge (the same on a
            // migration's destination); INTx follows the slot.
            let slot = u8::try_from(functions.len() + 1)
                .map_err(|_| setup("PCI slot", "bus 0 is full".into()))?;
            let intx_gsi = intx_gsi(slot);
            let sink = Arc::new(KvmInterrupts {
                id: id.clone(),
                hv: hv.clone(),
                vectors: irqfds,
                intx_gsi,
            });
            let device_ram = match viommu.as_mut() {
                Some(v) if behind_iommu => {
                    let endpoint = bdf(slot);
                    v.table.add_endpoint(u32::from(endpoint), true);
                    v.endpoints.push(endpoint);
                    log::info!("{id}: behind the virtio-iommu as endpoint {endpoint:#06x}");
                    v.dma_ram.behind_iommu(IommuEndpoint {
                        id: u32::from(endpoint),
                        table: v.table.clone(),
                    })
                }
                Some(v) if id == "viommu" => {
                    v.bdf = bdf(slot);
                    ram.clone()
                }
                _ => ram.clone(),
            };
            let mut dev = VirtioPciDevice::new(id.clone(), model, device_ram, sink)
                .map_err(|e| setup("virtio-pci", e.to_string()))?;
            let size = dev
                .config()
                .bars()
                .next()
                .map(|b| b.size)
                .ok_or_else(|| setup("BAR 0", "the function has no BAR".into()))?;
            let range = bars
                .allocate(size, size, AllocPolicy::FirstMatch)
                .map_err(|e| setup("BAR 0", format!("no room for {size:#x} bytes: {e:?}")))?;
            let bar = range.start();
            dev.config_mut()
                .set_bar_address(devices::virtio::BAR, bar)
                .map_err(|e| setup("BAR 0", e.to_string()))?;
            // As firmware leaves it: memory decoding on; the interrupt line register
            // names the INTx GSI.
            dev.config_mut().set_bytes(0x04, &[0x02]);
            dev.config_mut().set_bytes(0x3c, &[intx_gsi as u8]);
            for (offset, fd) in dev.notifiers() {
                hv.register_mmio_ioevent(fd, bar + offset)
                    .map_err(|e| setup("notify ioeventfd", e.to_string()))?;
            }
            let dev = Arc::new(Mutex::new(dev));
            bus.add_at(slot, dev.clone())
                .map_err(|e| setup("PCI slot", e.to_string()))?;
            log::info!("{id}: PCI 00:{slot:02x}.0, BAR 0 at {bar:#x}, INTx GSI {intx_gsi}");
            functions.push(VirtioFunction {
                id,
                slot,
                dev,
                ioevents_at: bar,
            });
        }
        let mut user = Vec::new();
        for (i, u) in config.user_devices.iter().enumerate() {
            let id = u.id.clone().unwrap_or_else(|| format!("user{i}"));
            let setup = |what: &'static str, reason: String| PciDevicesError::Setup {
                id: id.clone(),
                what,
                reason,
            };
            let slot = slot_after(functions.len() + user.len())
                .ok_or_else(|| setup("PCI slot", "bus 0 is full".into()))?;
            let mut dev = UserDevice::connect(id.clone(), slot, u, mem)
                .map_err(|e| setup("vfio-user", e.reason.clone()))?;
            {
                let mut f = dev.function.lock().unwrap_or_else(|p| p.into_inner());
                let declared = f.bars().to_vec();
                for (index, at) in
                    place_bars(&mut bars, &mut *f, &declared).map_err(|e| setup("BAR", e))?
                {
                    log::info!(
                        "{id}: vfio-user device on {}, PCI 00:{slot:02x}.0, BAR {index} at {:#x}",
                        u.socket.display(),
                        at
                    );
                }
                // As firmware leaves it: memory decoding on.
                f.config_mut().set_bytes(0x04, &[0x02]);
            }
            bus.add_at(slot, dev.function.clone())
                .map_err(|e| setup("PCI slot", e.to_string()))?;
            if u.iommu {
                let (endpoint, table) =
                    viommu_endpoint(viommu.as_mut(), &id, slot).map_err(|e| setup("vIOMMU", e))?;
                dev.behind_iommu(endpoint, table);
            }
            user.push(dev);
        }
        let mut vfio = Vec::new();
        for (i, d) in config.devices.iter().enumerate() {
            let id = d.id.clone().unwrap_or_else(|| format!("vfio{i}"));
            let setup = |what: &'static str, reason: String| PciDevicesError::Setup {
                id: id.clone(),
                what,
                reason,
            };
            let slot = slot_after(functions.len() + user.len() + vfio.len())
                .ok_or_else(|| setup("PCI slot", "bus 0 is full".into()))?;
            let mut dev = VfioDevice::open(id.clone(), slot, d, mem)
                .map_err(|e| setup("VFIO", format!("{}: {}", e.path.display(), e.reason)))?;
            {
                let mut f = dev.function.lock().unwrap_or_else(|p| p.into_inner());
                let declared = f.bars().to_vec();
                for (index, at) in
                    place_bars(&mut bars, &mut *f, &declared).map_err(|e| setup("BAR", e))?
                {
                    log::info!(
                        "{id}: VFIO device {}, PCI 00:{slot:02x}.0, BAR {index} at {:#x}",
                        d.path.display(),
                        at
                    );
                }
                let vectors = f.msix_vectors();
                let irqs = KvmVfioInterrupts::new(&id, hv, vectors, &mut next_gsi)
                    .map_err(|e| setup("MSI-X irqfd", e))?;
                f.set_interrupts(Arc::new(irqs));
                // As firmware leaves it: memory decoding on (the device is told too).
                f.write_config(0x04, &[0x02, 0x00]);
            }
            bus.add_at(slot, dev.function.clone())
                .map_err(|e| setup("PCI slot", e.to_string()))?;
            if d.iommu {
                let (endpoint, table) =
                    viommu_endpoint(viommu.as_mut(), &id, slot).map_err(|e| setup("vIOMMU", e))?;
                dev.behind_iommu(endpoint, table);
            }
            vfio.push(dev);
        }
        let made = viommu.as_ref().map(|v| (v.bdf, v.endpoints.clone()));
        if made != viot_layout(config) {
            // The ACPI VIOT table was written from viot_layout: it must describe this bus.
            return Err(PciDevicesError::Setup {
                id: "viommu".into(),
                what: "ACPI VIOT",
                reason: format!(
                    "the table describes {:x?}, the bus has {made:x?}",
                    viot_layout(config)
                ),
            });
        }
        Ok(PciDevices {
            bus: Arc::new(bus),
            functions,
            hv: hv.clone(),
            dma_hold,
            viommu,
            user,
            vfio,
        })
    }

    /// What the vfio-user devices wrote since the last harvest (see
    /// [`outside_dma::harvest_all`]).
    pub fn harvest_user_devices(&self) -> std::result::Result<(Vec<(u64, u64)>, bool), String> {
        outside_dma::harvest_all(&self.user)
    }

    /// What the VFIO devices wrote since the last harvest.
    pub fn harvest_vfio_devices(&self) -> std::result::Result<(Vec<(u64, u64)>, bool), String> {
        outside_dma::harvest_all(&self.vfio)
    }

    /// Whether any function can raise an interrupt of its own (a virtio, vfio-user or VFIO
    /// device; the vIOMMU only answers requests).
    pub fn has_devices(&self) -> bool {
        !(self.functions.is_empty() && self.user.is_empty() && self.vfio.is_empty())
    }

    /// A vfio-user device runs the test seam that stops it only when its state is saved.
    pub fn user_devices_stop_late(&self) -> bool {
        self.user.iter().any(UserDevice::stops_late)
    }

    /// The vfio-user devices' states (after [`Self::pause`]).
    pub fn user_states(&self) -> std::result::Result<Vec<UserDeviceState>, String> {
        outside_dma::save_all(&self.user)
    }

    /// The VFIO devices' states (after [`Self::pause`]).
    pub fn vfio_states(&self) -> std::result::Result<Vec<VfioDeviceState>, String> {
        outside_dma::save_all(&self.vfio)
    }

    /// Gives each vfio-user device its source's state, in order, and runs it.
    pub fn restore_user(&self, states: &[UserDeviceState]) -> Result<()> {
        outside_dma::restore_all(&self.user, states, "vfio-user devices").map_err(restore_error)
    }

    /// Gives each VFIO device its source's state, in order, and runs it.
    pub fn restore_vfio(&self, states: &[VfioDeviceState]) -> Result<()> {
        outside_dma::restore_all(&self.vfio, states, "VFIO devices").map_err(restore_error)
    }

    /// The vIOMMU's table, if the VM has one.
    pub fn viommu_table(&self) -> Option<&Arc<IommuTable>> {
        self.viommu.as_ref().map(|v| &v.table)
    }

    /// The log of what devices behind the vIOMMU wrote (guest-physical), if any.
    pub fn dma_log(&self) -> Option<&GuestMemoryMmap> {
        self.viommu.as_ref().map(|v| v.dma_ram.logged_memory())
    }

    /// The vIOMMU's BDF and its endpoints' BDFs (what [`viot_layout`] said they would be).
    pub fn viot(&self) -> Option<(u16, Vec<u16>)> {
        self.viommu.as_ref().map(|v| (v.bdf, v.endpoints.clone()))
    }

    /// A migration starts or stops tracking dirty pages: the vIOMMU's rules apply while
    /// it does, and the DMA log starts empty.
    pub fn set_dirty_tracking(&self, on: bool) {
        let what = if on {
            "DMA dirty tracking on"
        } else {
            "DMA dirty tracking off"
        };
        outside_dma::each_logged(&self.user, what, |d| d.set_tracking(on));
        outside_dma::each_logged(&self.vfio, what, |d| d.set_tracking(on));
        if let Some(v) = &self.viommu {
            v.table.set_migration_tracking(on);
            if on {
                crate::dirty::reset_vmm_log(v.dma_ram.logged_memory());
            }
        }
    }

    /// Before each harvest of the DMA log: the devices that cannot report their writes
    /// make their whole mapped range dirty (DESIGN.md rule 4).
    pub fn harvest_untrackable(&self) {
        if let Some(v) = &self.viommu {
            v.table.harvest_untrackable();
            if v.table.untrackable_in_bypass() {
                for r in v.dma_ram.logged_memory().iter() {
                    v.dma_ram.mark_gpa_range(r.start_addr().0, r.len());
                }
            }
        }
    }

    /// The vIOMMU's state (pause first).
    pub fn viommu_state(&self) -> Option<ViommuState> {
        let mut state = self.viommu.as_ref().map(|v| v.table.state())?;
        if std::env::var_os("FERRY_TEST_DROP_NESTED_DIRTY").is_some() {
            let mut dropped = 0u64;
            for d in &mut state.domains {
                if let Some(bits) = &mut d.dirty {
                    dropped += bits
                        .chunks
                        .iter()
                        .flat_map(|(_, words)| words)
                        .map(|w| u64::from(w.count_ones()))
                        .sum::<u64>();
                    bits.chunks.clear();
                }
            }
            // The count tells a test whether there was anything to lose: a stop right
            // after the guest read (and cleared) its bitmap leaves nothing unread.
            log::warn!(
                "FERRY_TEST_DROP_NESTED_DIRTY is set: {dropped} dirty bits the guest has not \
                 read are not migrated (a test seam; the guest will miss them)"
            );
        }
        Some(state)
    }

    /// Test seam: holds the next device write into the guest, and every later one, until
    /// [`Self::release_dma`]; waits (at most `timeout`) until one is held.
    pub fn hold_dma(&self, timeout: std::time::Duration) {
        if let Some(h) = &self.dma_hold {
            if h.close_and_wait_held(timeout) {
                log::warn!("test seam: a device write into the guest is held");
            } else {
                log::warn!("test seam: no device write came within {timeout:?} to hold");
            }
        }
    }

    /// Test seam: lets the writes [`Self::hold_dma`] held go.
    pub fn release_dma(&self) {
        if let Some(h) = &self.dma_hold {
            h.open();
        }
    }

    pub fn bus(&self) -> &Arc<PciBus> {
        &self.bus
    }

    fn each(&self, f: impl Fn(&VirtioPciDevice)) {
        for func in &self.functions {
            f(&func.dev.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }

    /// Every device finishes the request it is serving and takes no more: after this,
    /// no device writes guest RAM until [`Self::resume`].
    pub fn pause(&self) {
        self.each(VirtioPciDevice::pause);
        // A device that cannot be stopped fails the migration at its last harvest
        // (vfio-user) or when its state is saved (VFIO).
        outside_dma::each_logged(&self.user, "stopping the device", |d| d.pause());
        outside_dma::each_logged(&self.vfio, "stopping the device", |d| d.pause());
    }

    pub fn resume(&self) {
        outside_dma::each_logged(&self.vfio, "running the device again", |d| d.resume());
        outside_dma::each_logged(&self.user, "running the device again", |d| d.resume());
        self.each(VirtioPciDevice::resume);
    }

    /// Every function's state (pause first).
    pub fn state(&self) -> Vec<PciDeviceState> {
        self.functions
            .iter()
            .map(|f| PciDeviceState {
                id: f.id.clone(),
                slot: f.slot,
                state: f.dev.lock().unwrap_or_else(|p| p.into_inner()).state(),
            })
            .collect()
    }

    /// Takes the source's device states: the same devices in the same slots, or an error
    /// naming the first that differs.
    pub fn restore(
        &mut self,
        states: &[PciDeviceState],
        viommu: Option<&ViommuState>,
    ) -> Result<()> {
        // The table first: a device that starts serving on restore translates through it.
        match (&self.viommu, viommu) {
            (Some(v), Some(state)) => {
                v.table
                    .restore(state)
                    .map_err(|reason| PciDevicesError::Restore {
                        id: "viommu".into(),
                        slot: (v.bdf >> 3) as u8,
                        reason,
                    })?;
                // Devices in other processes get their domains' mappings again.
                v.table.replay_externals();
            }
            (None, None) => {}
            (mine, _) => {
                return Err(PciDevicesError::Restore {
                    id: "viommu".into(),
                    slot: 0,
                    reason: format!(
                        "the source {} a virtio-iommu and this configuration {}",
                        if viommu.is_some() { "has" } else { "has no" },
                        if mine.is_some() {
                            "makes one"
                        } else {
                            "makes none"
                        }
                    ),
                })
            }
        }
        let ours: Vec<(&str, u8)> = self
            .functions
            .iter()
            .map(|f| (f.id.as_str(), f.slot))
            .collect();
        let theirs: Vec<(&str, u8)> = states.iter().map(|s| (s.id.as_str(), s.slot)).collect();
        if ours != theirs {
            return Err(PciDevicesError::Restore {
                id: "pci".into(),
                slot: 0,
                reason: format!(
                    "the source has devices {theirs:?}, this configuration makes {ours:?}"
                ),
            });
        }
        for (f, s) in self.functions.iter_mut().zip(states) {
            let mut dev = f.dev.lock().unwrap_or_else(|p| p.into_inner());
            dev.restore(&s.state)
                .map_err(|e| PciDevicesError::Restore {
                    id: f.id.clone(),
                    slot: f.slot,
                    reason: e.to_string(),
                })?;
            // The guest may have moved the BAR on the source: notifications follow it.
            let bar = dev
                .config()
                .bars()
                .next()
                .map(|b| b.address)
                .unwrap_or(f.ioevents_at);
            if bar != f.ioevents_at {
                for (offset, fd) in dev.notifiers() {
                    let _ = self.hv.unregister_mmio_ioevent(fd, f.ioevents_at + offset);
                    self.hv
                        .register_mmio_ioevent(fd, bar + offset)
                        .map_err(|e| PciDevicesError::Restore {
                            id: f.id.clone(),
                            slot: f.slot,
                            reason: format!("notify ioeventfd at {bar:#x}: {e}"),
                        })?;
                }
                f.ioevents_at = bar;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_device, parse_user_device, RngConfig};

    #[test]
    fn viot_layout_puts_vfio_endpoints_after_the_vfio_user_ones() {
        let config = VmConfig {
            rng: Some(RngConfig {
                src: "/dev/urandom".into(),
                iommu: true,
            }),
            user_devices: vec![
                parse_user_device("socket=/a,iommu=on").unwrap(),
                parse_user_device("socket=/b").unwrap(),
            ],
            devices: vec![
                parse_device("path=/sys/x").unwrap(),
                parse_device("path=/sys/y,iommu=on").unwrap(),
            ],
            ..Default::default()
        };
        // rng in slot 1, the vIOMMU in 2, vfio-user in 3 and 4, VFIO in 5 and 6.
        assert_eq!(
            viot_layout(&config),
            Some((bdf(2), vec![bdf(1), bdf(3), bdf(6)]))
        );
        let no_iommu = VmConfig {
            devices: vec![parse_device("path=/sys/x").unwrap()],
            ..Default::default()
        };
        assert_eq!(viot_layout(&no_iommu), None);
    }
}

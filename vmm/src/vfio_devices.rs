//! VFIO devices: host PCI functions bound to vfio-pci, passed through to the guest.
//!
//! Opening (from the sysfs directory the configuration names): through iommufd when
//! `/dev/iommu` exists and the device has a VFIO cdev (`vfio-dev/vfioN`), else through a
//! type1 container with the device's IOMMU group. Either way the IOMMU backend sits under
//! a [`DmaTracker`]: without the virtio-iommu all guest RAM is mapped for the device at its
//! guest-physical addresses (IOVA = GPA); behind it the device's IOVA space follows the
//! guest's MAP/UNMAP through the table's [`ExternalEndpoint`] hooks, as vfio-user devices'
//! do.
//!
//! Dirty pages the device writes by DMA, read at every harvest of a migration: the
//! device's own DMA log when it has one (and is not behind the vIOMMU, whose mappings the
//! fixed logging ranges could not follow), else the IOMMU domain's tracking (iommufd HWPT,
//! type1 dirty pages) through the tracker, else the tracker's rule 4 (all mapped dirty).
//!
//! Migration (VFIO migration v2): RUNNING → STOP when the VM pauses, STOP → STOP_COPY with
//! the data fd read into the state, → STOP; the destination's device goes STOP → RESUMING,
//! takes the data, → STOP → RUNNING. A device without migration support cannot be stopped
//! or saved: a migration of its VM fails naming it.
//!
//! Interrupts: MSI-X only. Each vector has a KVM irqfd on its own GSI (routed as the guest
//! programs the vector) and a parking eventfd the device signals while the vector is
//! masked; unmasking delivers what was parked.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use devices::pci::MsiMessage;
use devices::vfio::{
    group_device_fd, KernelDevice, VfioFunctionState, VfioInterrupts, VfioOps, VfioPciFunction,
};
use devices::viommu::{ExternalEndpoint, IommuTable};
use vfio_dirty::device_log::{DeviceLog, MigState, Migration};
use vfio_dirty::iommufd::IommufdBackend;
use vfio_dirty::type1::{Type1Backend, DEFAULT_PAGE_SIZE};
use vfio_dirty::{
    DirtyBitmap, DmaTracker, Harvest, Identity, IovaTranslator, PolicyError, Range, Scope,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::config::DeviceConfig;
use crate::memory::GuestMemoryMmap;
use crate::outside_dma::{EndpointMappings, OneMapping, OutsideDmaDevice};

/// Most migration data a device may give (a NIC's state is kilobytes; GPUs are not
/// expected here).
const MAX_STATE_BYTES: u64 = 256 << 20;
/// The granule Ferry tracks DMA at.
const PAGE: u64 = 4096;

/// A VFIO device's state as migrated.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VfioDeviceState {
    pub id: String,
    pub slot: u8,
    /// Ferry's side of the PCI function (header, MSI-X).
    pub function: VfioFunctionState,
    /// What the device gave in STOP_COPY, for its peer to take in RESUMING.
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("VFIO device {id} ({}): {reason}", .path.display())]
pub struct VfioDeviceError {
    pub id: String,
    pub path: PathBuf,
    pub reason: String,
}

/// How the host reaches the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Its VFIO cdev, bound to an iommufd.
    Iommufd { cdev: PathBuf },
    /// Its IOMMU group, in a type1 container.
    Type1 { group: PathBuf },
}

fn exists(p: &Path) -> bool {
    p.symlink_metadata().is_ok()
}

/// The device's PCI address and how to open it, from its sysfs directory `path`, with the
/// device nodes under `dev` (`/dev` but in tests). The error says what is missing.
pub fn discover(path: &Path, dev: &Path) -> Result<(String, Route), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot use the path: {e}"))?;
    if !meta.is_dir() || !exists(&path.join("config")) {
        return Err("is not a PCI device's sysfs directory (no config file in it)".into());
    }
    let real = std::fs::canonicalize(path).map_err(|e| format!("cannot resolve it: {e}"))?;
    let name = real
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("has no PCI address as its last component")?
        .to_string();
    if exists(&dev.join("iommu")) {
        let cdev = std::fs::read_dir(path.join("vfio-dev"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name())
            .find(|n| n.to_string_lossy().starts_with("vfio"))
            .map(|n| dev.join("vfio/devices").join(n));
        if let Some(cdev) = cdev.filter(|c| exists(c)) {
            return Ok((name, Route::Iommufd { cdev }));
        }
    }
    let container = dev.join("vfio/vfio");
    if !exists(&container) {
        return Err(format!(
            "{} is missing: VFIO is not available on this host",
            container.display()
        ));
    }
    let group = std::fs::read_link(path.join("iommu_group"))
        .map_err(|_| "has no iommu_group: not bound to vfio-pci?".to_string())?;
    let group_id = group
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("its iommu_group link names no group")?
        .to_string();
    match std::fs::read_link(path.join("driver")) {
        Ok(d) => {
            let driver = d.file_name().map(|n| n.to_string_lossy().into_owned());
            if driver.as_deref() != Some("vfio-pci") {
                return Err(format!(
                    "is bound to {}, not vfio-pci",
                    driver.unwrap_or_default()
                ));
            }
        }
        Err(_) => return Err("is bound to no driver: bind it to vfio-pci".into()),
    }
    let node = dev.join("vfio").join(&group_id);
    if !exists(&node) {
        return Err(format!(
            "{} (its IOMMU group) is missing: not bound to vfio-pci?",
            node.display()
        ));
    }
    Ok((name, Route::Type1 { group: node }))
}

fn open_rw(p: &Path) -> Result<OwnedFd, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .map(OwnedFd::from)
        .map_err(|e| format!("opening {}: {e}", p.display()))
}

/// Guest-physical → host address of the guest RAM region holding it.
type Hva = Box<dyn Fn(u64, u64) -> Option<u64> + Send>;

fn gpa_to_hva(mem: &GuestMemoryMmap) -> Hva {
    let regions: Vec<(u64, u64, u64)> = mem
        .iter()
        .filter_map(|r| {
            let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
            Some((r.start_addr().0, r.len(), host as u64))
        })
        .collect();
    Box::new(move |gpa, len| {
        regions.iter().find_map(|&(start, size, host)| {
            (gpa >= start && gpa.checked_add(len)? <= start + size).then(|| host + (gpa - start))
        })
    })
}

/// The tracker over whichever backend opened the device.
enum Tracker {
    Iommufd(DmaTracker<IommufdBackend<Hva>>),
    Type1(DmaTracker<Type1Backend<Hva>>),
}

macro_rules! each {
    ($t:expr, $x:ident => $body:expr) => {
        match $t {
            Tracker::Iommufd($x) => $body,
            Tracker::Type1($x) => $body,
        }
    };
}

impl Tracker {
    fn map(&mut self, iova: u64, len: u64, gpa: u64) -> Result<(), PolicyError> {
        each!(self, t => t.map(iova, len, gpa))
    }

    /// Unmaps, and (type1) the bits the unmap itself returned, as IOVA ranges.
    fn unmap(
        &mut self,
        iova: u64,
        len: u64,
        xlate: &dyn IovaTranslator,
    ) -> Result<Vec<Range>, PolicyError> {
        match self {
            Tracker::Iommufd(t) => t.unmap(iova, len, xlate).map(|_| Vec::new()),
            Tracker::Type1(t) => {
                t.unmap(iova, len, xlate)?;
                Ok(t.backend_mut().take_unmap_dirty())
            }
        }
    }

    fn start(&mut self) {
        each!(self, t => t.start())
    }

    fn stop(&mut self) -> Result<(), PolicyError> {
        each!(self, t => t.stop())
    }

    fn is_tracking(&self) -> bool {
        each!(self, t => t.is_tracking())
    }

    fn harvest(&mut self, xlate: &dyn IovaTranslator) -> Result<Harvest, PolicyError> {
        each!(self, t => t.harvest(xlate))
    }
}

/// The tracker and what unmaps found dirty since the last harvest (guest-physical).
struct Dma {
    tracker: Tracker,
    unmapped_dirty: Vec<Range>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Hooks {
    id: String,
    dma: Arc<Mutex<Dma>>,
}

impl ExternalEndpoint for Hooks {
    /// Read-only mappings are mapped read-write in the host IOMMU too (the backends map
    /// both ways); they are tracked like the others, so nothing the device writes is lost.
    fn map(&self, iova: u64, len: u64, gpa: u64, _writable: bool) {
        if let Err(e) = lock(&self.dma).tracker.map(iova, len, gpa) {
            // The device will fault on this range (an IOMMU fault on the host).
            log::warn!(
                "{}: mapping iova {iova:#x} (+{len:#x}) to gpa {gpa:#x} for the device: {e}",
                self.id
            );
        }
    }

    fn unmap(&self, iova: u64, len: u64, gpa: u64, _writable: bool) {
        let xlate = OneMapping { iova, gpa, len };
        let mut dma = lock(&self.dma);
        match dma.tracker.unmap(iova, len, &xlate) {
            Ok(iovas) => {
                for r in iovas {
                    match xlate.translate(r.start, r.length) {
                        Some(gpas) => dma.unmapped_dirty.extend(gpas),
                        None => dma.unmapped_dirty.push(Range {
                            start: gpa,
                            length: len,
                        }),
                    }
                }
            }
            Err(e) => log::warn!(
                "{}: unmapping iova {iova:#x} (+{len:#x}) from the device: {e}",
                self.id
            ),
        }
    }
}

/// MSI-X vectors of a VFIO function as KVM sees them.
pub struct KvmVfioInterrupts {
    id: String,
    hv: Arc<hypervisor::Vm>,
    /// Per vector: its GSI, its irqfd, its parking eventfd.
    vectors: Vec<(u32, EventFd, EventFd)>,
}

impl KvmVfioInterrupts {
    /// `vectors` irqfds registered on GSIs from `*next_gsi` on (advanced past them).
    pub fn new(
        id: &str,
        hv: &Arc<hypervisor::Vm>,
        vectors: u16,
        next_gsi: &mut u32,
    ) -> Result<Self, String> {
        let mut out = Vec::with_capacity(usize::from(vectors));
        for _ in 0..vectors {
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
            let parked = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
            hv.register_irqfd(&irqfd, *next_gsi)
                .map_err(|e| format!("irqfd on GSI {}: {e}", *next_gsi))?;
            out.push((*next_gsi, irqfd, parked));
            *next_gsi += 1;
        }
        Ok(KvmVfioInterrupts {
            id: id.to_string(),
            hv: hv.clone(),
            vectors: out,
        })
    }
}

impl VfioInterrupts for KvmVfioInterrupts {
    fn eventfd(&self, vector: u16, deliver: bool) -> RawFd {
        self.vectors
            .get(usize::from(vector))
            .map_or(-1, |(_, irqfd, parked)| {
                if deliver {
                    irqfd.as_raw_fd()
                } else {
                    parked.as_raw_fd()
                }
            })
    }

    fn route(&self, vector: u16, message: MsiMessage) {
        let Some((gsi, _, _)) = self.vectors.get(usize::from(vector)) else {
            return;
        };
        if let Err(e) = self.hv.set_msi_route(*gsi, message.address, message.data) {
            log::error!("{}: MSI-X vector {vector}: {e}", self.id);
        }
    }

    fn unparked(&self, vector: u16) {
        let Some((_, irqfd, parked)) = self.vectors.get(usize::from(vector)) else {
            return;
        };
        // A signal while masked is the vector's pending bit: it goes out now.
        if matches!(parked.read(), Ok(n) if n > 0) {
            if let Err(e) = irqfd.write(1) {
                log::error!("{}: MSI-X vector {vector} irqfd: {e}", self.id);
            }
        }
    }
}

/// The device's DMA log over guest RAM, while a migration uses it.
struct Logging {
    log: DeviceLog<OwnedFd>,
    /// The ranges logged (guest RAM, IOVA = GPA) and the granule the device chose.
    ranges: Vec<Range>,
    granule: Option<u64>,
}

/// One VFIO device of the VM.
pub struct VfioDevice {
    pub id: String,
    pub slot: u8,
    pub path: PathBuf,
    pub function: Arc<Mutex<VfioPciFunction>>,
    device: Arc<KernelDevice>,
    dma: Arc<Mutex<Dma>>,
    /// The device's own DMA log, when it has one and its DMA is not behind the vIOMMU.
    logging: Mutex<Option<Logging>>,
    /// Migration v2, when the device offers it.
    migration: Mutex<Option<Migration<OwnedFd>>>,
    /// Its endpoint in the vIOMMU's table, when behind it.
    endpoint: Option<(u32, Arc<IommuTable>)>,
}

impl VfioDevice {
    /// Opens the device `cfg.path` names, reads its PCI function, and (not behind the
    /// vIOMMU) maps all guest RAM for its DMA at guest-physical addresses.
    pub fn open(
        id: String,
        slot: u8,
        cfg: &DeviceConfig,
        mem: &GuestMemoryMmap,
    ) -> Result<VfioDevice, VfioDeviceError> {
        let err = |reason: String| VfioDeviceError {
            id: id.clone(),
            path: cfg.path.clone(),
            reason,
        };
        let (name, route) = discover(&cfg.path, Path::new("/dev")).map_err(err)?;
        let hva = gpa_to_hva(mem);
        let (mut tracker, device_fd) = match &route {
            Route::Iommufd { cdev } => {
                let mut b = IommufdBackend::open(hva).map_err(|e| err(e.to_string()))?;
                let fd = open_rw(cdev).map_err(err)?;
                let mine = fd.try_clone().map_err(|e| err(e.to_string()))?;
                b.add_device(0, fd)
                    .map_err(|e| err(format!("{}: {e}", cdev.display())))?;
                let mut t = DmaTracker::new(b, PAGE);
                let scope = t.add_device(0).map_err(|e| err(e.to_string()))?;
                log_scope(&id, scope);
                (Tracker::Iommufd(t), mine)
            }
            Route::Type1 { group } => {
                let mut b = Type1Backend::open(hva).map_err(|e| err(e.to_string()))?;
                let fd = open_rw(group).map_err(err)?;
                let mine = fd.try_clone().map_err(|e| err(e.to_string()))?;
                b.add_group(0, fd).map_err(|e| {
                    err(format!(
                        "{}: {e} (is every device of the group bound to vfio-pci?)",
                        group.display()
                    ))
                })?;
                let mut t = DmaTracker::new(b, DEFAULT_PAGE_SIZE);
                let scope = t.add_device(0).map_err(|e| err(e.to_string()))?;
                log_scope(&id, scope);
                let dev = group_device_fd(mine.as_fd(), &name).map_err(|e| err(e.to_string()))?;
                (Tracker::Type1(t), dev)
            }
        };
        let fd_for = |what: &str| {
            device_fd
                .try_clone()
                .map_err(|e| err(format!("duplicating the device fd for {what}: {e}")))
        };
        let log_fd = fd_for("DMA logging")?;
        let mig_fd = fd_for("migration")?;
        let device =
            Arc::new(KernelDevice::new(device_fd).map_err(|e| err(format!("{name}: {e}")))?);
        if let Err(e) = device.reset() {
            log::warn!("{id}: {name}: no reset before use: {e}");
        }
        let function = VfioPciFunction::new(
            cfg.path.display().to_string(),
            device.clone() as Arc<dyn VfioOps>,
        )
        .map_err(|e| err(e.to_string()))?;
        if !cfg.iommu {
            for r in mem.iter() {
                let gpa = r.start_addr().0;
                tracker
                    .map(gpa, r.len(), gpa)
                    .map_err(|e| err(format!("mapping guest RAM at {gpa:#x}: {e}")))?;
            }
        }
        let log = DeviceLog::new(log_fd);
        let logging = match log.supported() {
            Ok(true) if !cfg.iommu => {
                log::info!("{id}: the device logs its own DMA writes");
                Some(Logging {
                    log,
                    ranges: mem
                        .iter()
                        .map(|r| Range {
                            start: r.start_addr().0,
                            length: r.len(),
                        })
                        .collect(),
                    granule: None,
                })
            }
            Ok(_) => None,
            Err(e) => {
                log::warn!("{id}: asking for device DMA logging: {e}");
                None
            }
        };
        let migration = match Migration::new(mig_fd) {
            Ok(m) => Some(m),
            Err(e) => {
                log::warn!(
                    "{id}: {name} has no VFIO migration support ({e}): its VM cannot migrate"
                );
                None
            }
        };
        log::info!(
            "{id}: VFIO device {name} through {}",
            match route {
                Route::Iommufd { .. } => "iommufd",
                Route::Type1 { .. } => "a type1 container",
            }
        );
        Ok(VfioDevice {
            id,
            slot,
            path: cfg.path.clone(),
            function: Arc::new(Mutex::new(function)),
            device,
            dma: Arc::new(Mutex::new(Dma {
                tracker,
                unmapped_dirty: Vec::new(),
            })),
            logging: Mutex::new(logging),
            migration: Mutex::new(migration),
            endpoint: None,
        })
    }

    /// The device's config header as the device itself has it (64 bytes).
    pub fn device_header(&self) -> Result<[u8; 64], String> {
        let mut h = [0u8; 64];
        self.device
            .region_read(devices::vfio::CONFIG_REGION, 0, &mut h)
            .map_err(|e| e.to_string())?;
        Ok(h)
    }

    /// Puts the device behind the vIOMMU as `endpoint`: from now on its IOVA space follows
    /// the guest's mappings of its domain.
    pub fn behind_iommu(&mut self, endpoint: u32, table: Arc<IommuTable>) {
        table.add_external_endpoint(
            endpoint,
            Arc::new(Hooks {
                id: self.id.clone(),
                dma: self.dma.clone(),
            }),
        );
        self.endpoint = Some((endpoint, table));
    }

    /// A migration starts or stops tracking.
    pub fn set_tracking(&self, on: bool) -> Result<(), String> {
        let mut logging = lock(&self.logging);
        if let Some(l) = logging.as_mut() {
            if on {
                match l.log.start(PAGE, &l.ranges) {
                    Ok(g) => {
                        l.granule = Some(g);
                        return Ok(());
                    }
                    Err(e) => {
                        log::warn!(
                            "{}: device DMA logging refused ({e}): the IOMMU's tracking \
                             is used instead",
                            self.id
                        );
                        l.granule = None;
                    }
                }
            } else if l.granule.take().is_some() {
                return l.log.stop().map_err(|e| e.to_string());
            }
        }
        drop(logging);
        let mut dma = lock(&self.dma);
        if on {
            dma.unmapped_dirty.clear();
            dma.tracker.start();
            Ok(())
        } else if dma.tracker.is_tracking() {
            dma.tracker.stop().map_err(|e| e.to_string())
        } else {
            Ok(())
        }
    }

    /// What the device wrote since the last harvest, guest-physical.
    pub fn harvest(&self) -> Result<Harvest, String> {
        if let Some(l) = lock(&self.logging).as_mut() {
            if let Some(granule) = l.granule {
                return Ok(self.report_log(l, granule));
            }
        }
        if !lock(&self.dma).tracker.is_tracking() {
            // No migration tracks: the device's writes are nobody's business.
            return Ok(Harvest::default());
        }
        let mut h = match &self.endpoint {
            Some((ep, table)) => {
                // The table's lock first, then the tracker's: the order the vIOMMU's
                // MAP/UNMAP take them in.
                let t = table.read();
                let xlate = EndpointMappings {
                    tables: &t,
                    endpoint: *ep,
                };
                lock(&self.dma).tracker.harvest(&xlate)
            }
            None => lock(&self.dma).tracker.harvest(&Identity),
        }
        .map_err(|e| e.to_string())?;
        h.ranges
            .extend(std::mem::take(&mut lock(&self.dma).unmapped_dirty));
        for e in &h.errors {
            log::warn!(
                "{}: reading the device's dirty pages: {e} (taken as dirty)",
                self.id
            );
        }
        Ok(h)
    }

    /// The device's DMA log, range by range; a range whose report fails is all dirty (the
    /// log is corrupt then, says the UAPI).
    fn report_log(&self, l: &mut Logging, granule: u64) -> Harvest {
        let mut h = Harvest::default();
        let mut bm = DirtyBitmap::default();
        for r in &l.ranges {
            let read = bm
                .prepare(r.start, r.length, granule.max(PAGE))
                .map_err(|e| e.to_string())
                .and_then(|()| l.log.report(&mut bm).map_err(|e| e.to_string()));
            match read {
                Ok(()) => h.ranges.extend(
                    bm.runs()
                        .into_iter()
                        .map(|(start, length)| Range { start, length }),
                ),
                Err(e) => {
                    log::warn!(
                        "{}: DMA log of {:#x} (+{:#x}): {e} (taken as dirty)",
                        self.id,
                        r.start,
                        r.length
                    );
                    h.ranges.push(*r);
                }
            }
        }
        h
    }

    fn step(&self, path: &[MigState]) -> Result<Vec<OwnedFd>, String> {
        let mut m = lock(&self.migration);
        let m = m.as_mut().ok_or_else(|| {
            format!(
                "{} has no VFIO migration support: it cannot be stopped or saved",
                self.path.display()
            )
        })?;
        let mut fds = Vec::new();
        for &s in path {
            if let Some(fd) = m.step(s).map_err(|e| format!("-> {s:?}: {e}"))? {
                fds.push(fd);
            }
        }
        Ok(fds)
    }

    fn state(&self) -> Option<MigState> {
        lock(&self.migration).as_ref().map(|m| m.state())
    }

    /// Stops the device's DMA (the VM is paused).
    pub fn pause(&self) -> Result<(), String> {
        match self.state() {
            Some(MigState::Running) => self.step(&[MigState::Stop]).map(drop),
            Some(_) => Ok(()),
            None => self.step(&[]).map(drop),
        }
    }

    /// Lets the device run again, from wherever the migration left it.
    pub fn resume(&self) -> Result<(), String> {
        match self.state() {
            None | Some(MigState::Running) => Ok(()),
            Some(MigState::Stop) => self.step(&[MigState::Running]).map(drop),
            Some(_) => self.step(&[MigState::Stop, MigState::Running]).map(drop),
        }
    }

    /// The device's migration data and Ferry's function state (the device is stopped,
    /// and left in STOP).
    pub fn save(&self) -> Result<VfioDeviceState, String> {
        self.pause()?;
        let fd = self
            .step(&[MigState::StopCopy])?
            .pop()
            .ok_or("STOP_COPY gave no data fd")?;
        let mut data = Vec::new();
        File::from(fd)
            .take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut data)
            .map_err(|e| format!("reading the device's migration data: {e}"))?;
        if data.len() as u64 > MAX_STATE_BYTES {
            return Err(format!(
                "the device gave more than {MAX_STATE_BYTES} bytes of migration data"
            ));
        }
        self.step(&[MigState::Stop])?;
        Ok(VfioDeviceState {
            id: self.id.clone(),
            slot: self.slot,
            function: lock(&self.function).state(),
            data,
        })
    }

    /// Gives the device its source's state (left in STOP; [`Self::resume`] runs it).
    pub fn restore(&self, s: &VfioDeviceState) -> Result<(), String> {
        if self.state() == Some(MigState::Running) {
            self.step(&[MigState::Stop])?;
        }
        let fd = self
            .step(&[MigState::Resuming])?
            .pop()
            .ok_or("RESUMING gave no data fd")?;
        File::from(fd)
            .write_all(&s.data)
            .map_err(|e| format!("writing the migration data to the device: {e}"))?;
        self.step(&[MigState::Stop])?;
        lock(&self.function)
            .restore(&s.function)
            .map_err(|e| e.to_string())
    }
}

impl OutsideDmaDevice for VfioDevice {
    type State = VfioDeviceState;

    fn id(&self) -> &str {
        &self.id
    }

    fn slot(&self) -> u8 {
        self.slot
    }

    fn state_names(s: &VfioDeviceState) -> (&str, u8) {
        (&s.id, s.slot)
    }

    fn set_tracking(&self, on: bool) -> Result<(), String> {
        VfioDevice::set_tracking(self, on)
    }

    fn harvest(&self) -> Result<Harvest, String> {
        VfioDevice::harvest(self)
    }

    fn pause(&self) -> Result<(), String> {
        VfioDevice::pause(self)
    }

    fn resume(&self) -> Result<(), String> {
        VfioDevice::resume(self)
    }

    fn save(&self) -> Result<VfioDeviceState, String> {
        VfioDevice::save(self)
    }

    fn restore(&self, s: &VfioDeviceState) -> Result<(), String> {
        VfioDevice::restore(self, s)
    }
}

fn log_scope(id: &str, scope: Scope) {
    match scope {
        Scope::Tracked(_) => log::info!("{id}: its IOMMU domain tracks the pages it writes"),
        Scope::Unknown(_) => log::warn!(
            "{id}: its IOMMU domain cannot track the pages it writes: without device DMA \
             logging, everything mapped for it is dirty at every harvest of a migration"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Tree(PathBuf);

    impl Tree {
        fn new(tag: &str) -> Tree {
            let p =
                std::env::temp_dir().join(format!("ferry-vfio-sysfs-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(p.join("sys/0000:01:00.0")).unwrap();
            std::fs::write(p.join("sys/0000:01:00.0/config"), [0u8; 64]).unwrap();
            std::fs::create_dir_all(p.join("dev/vfio")).unwrap();
            Tree(p)
        }
        fn dev(&self) -> PathBuf {
            self.0.join("sys/0000:01:00.0")
        }
        fn touch(&self, rel: &str) {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"").unwrap();
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn discovery_says_what_is_missing() {
        let t = Tree::new("missing");
        let d = t.0.join("dev");
        let e = discover(&t.0.join("sys/0000:00:1f.7"), &d).unwrap_err();
        assert!(e.contains("cannot use the path"), "{e}");
        let e = discover(&t.0.join("sys"), &d).unwrap_err();
        assert!(e.contains("not a PCI device"), "{e}");
        let e = discover(&t.dev(), &d).unwrap_err();
        assert!(
            e.ends_with("dev/vfio/vfio is missing: VFIO is not available on this host"),
            "{e}"
        );
        t.touch("dev/vfio/vfio");
        let e = discover(&t.dev(), &d).unwrap_err();
        assert_eq!(e, "has no iommu_group: not bound to vfio-pci?");
        symlink("../../kernel/iommu_groups/7", t.dev().join("iommu_group")).unwrap();
        let e = discover(&t.dev(), &d).unwrap_err();
        assert!(e.contains("no driver"), "{e}");
        symlink("../../bus/pci/drivers/e1000e", t.dev().join("driver")).unwrap();
        let e = discover(&t.dev(), &d).unwrap_err();
        assert_eq!(e, "is bound to e1000e, not vfio-pci");
        std::fs::remove_file(t.dev().join("driver")).unwrap();
        symlink("../../bus/pci/drivers/vfio-pci", t.dev().join("driver")).unwrap();
        let e = discover(&t.dev(), &d).unwrap_err();
        assert!(e.contains("dev/vfio/7 (its IOMMU group) is missing"), "{e}");
        t.touch("dev/vfio/7");
        assert_eq!(
            discover(&t.dev(), &d).unwrap(),
            (
                "0000:01:00.0".to_string(),
                Route::Type1 {
                    group: d.join("vfio/7")
                }
            )
        );
    }

    #[test]
    fn discovery_prefers_the_iommufd_cdev() {
        let t = Tree::new("cdev");
        let d = t.0.join("dev");
        std::fs::create_dir_all(t.dev().join("vfio-dev/vfio3")).unwrap();
        // /dev/iommu without the cdev node: type1 (here: missing container).
        t.touch("dev/iommu");
        assert!(discover(&t.dev(), &d).unwrap_err().contains("vfio/vfio"));
        t.touch("dev/vfio/devices/vfio3");
        assert_eq!(
            discover(&t.dev(), &d).unwrap().1,
            Route::Iommufd {
                cdev: d.join("vfio/devices/vfio3")
            }
        );
    }
}

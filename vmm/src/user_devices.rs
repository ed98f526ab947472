//! vfio-user devices: PCI functions served by other processes over UNIX sockets, doing DMA
//! into guest RAM shared with them by file descriptor.
//!
//! Ferry sees none of their DMA, so each device logs its own writes and Ferry reads the
//! log through a [`DmaTracker`] (the same rules as hardware trackers): at every harvest of
//! a migration, before a mapping goes (the vIOMMU's UNMAP, an endpoint leaving its domain)
//! and once more after the device is stopped, before stop-and-copy's last collection.
//! Behind the virtio-iommu the device is given the guest's mappings as they come and go
//! (IOVA → the RAM file at the GPA's offset) and its bits are translated through the
//! vIOMMU's table under the table's lock, so no bit lands on a mapping that changed.
//!
//! Migration: the device's state leaves over MIG_DATA_READ in STOP_COPY and arrives at the
//! destination's own device process over MIG_DATA_WRITE in RESUMING.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use devices::user_device::UserPciFunction;
use devices::viommu::{ExternalEndpoint, IommuTable};
use vfio_dirty::uapi::{
    VFIO_DEVICE_STATE_RESUMING, VFIO_DEVICE_STATE_RUNNING, VFIO_DEVICE_STATE_STOP,
    VFIO_DEVICE_STATE_STOP_COPY,
};
use vfio_dirty::vfio_user::client::Client;
use vfio_dirty::vfio_user::log::{GuestRamFiles, UserDeviceLog};
use vfio_dirty::vfio_user::wire::{DMA_MAP_READ, MAX_DATA_BYTES};
use vfio_dirty::{DmaTracker, Harvest, Identity, Scope};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::config::UserDeviceConfig;
use crate::memory::GuestMemoryMmap;
use crate::outside_dma::{EndpointMappings, OneMapping, OutsideDmaDevice};

/// How long Ferry waits for any one answer from a device process.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most migration data a device may send (its state is small; more is a broken device).
const MAX_STATE_BYTES: usize = 16 << 20;

/// A device's state as migrated.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct UserDeviceState {
    pub id: String,
    pub slot: u8,
    /// What the device gave in STOP_COPY, for its peer to take in RESUMING.
    pub data: Vec<u8>,
}

/// Guest RAM regions as files (the memfd behind shared RAM): (gpa, size, fd, offset). The
/// fds are borrowed from the machine's guest memory, which outlives its devices.
struct RamFiles(Vec<(u64, u64, RawFd, u64)>);

impl GuestRamFiles for RamFiles {
    fn file_of(&self, gpa: u64, length: u64) -> Option<(RawFd, u64)> {
        self.0.iter().find_map(|&(start, len, fd, off)| {
            (gpa >= start && gpa.checked_add(length)? <= start + len)
                .then(|| (fd, off + (gpa - start)))
        })
    }
}

/// The tracker and the read-only mappings (which the device cannot dirty, so they are
/// not tracked).
struct Dma {
    tracker: DmaTracker<UserDeviceLog>,
    read_only: Vec<(u64, u64)>,
    /// Set when the device may hold a mapping the vIOMMU no longer has (an unmap it did
    /// not take, or a map over one it still holds): it may write pages nobody tracks, so
    /// no harvest can be trusted from then on.
    desync: Option<String>,
}

struct Hooks {
    id: String,
    client: Arc<Mutex<Client>>,
    dma: Arc<Mutex<Dma>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ExternalEndpoint for Hooks {
    fn map(&self, iova: u64, len: u64, gpa: u64, writable: bool) {
        let mut dma = lock(&self.dma);
        let r = if writable {
            match dma.tracker.map(iova, len, gpa) {
                Err(e @ vfio_dirty::PolicyError::Overlap { .. }) => {
                    dma.desync = Some(format!("a stale mapping at iova {iova:#x}: {e}"));
                    Err(e.to_string())
                }
                r => r.map_err(|e| e.to_string()),
            }
        } else {
            // Read-only: not tracked. The file is looked up as the tracker would.
            let ram_fd = dma.tracker.backend().ram_file(gpa, len);
            match ram_fd {
                Some((fd, off)) => lock(&self.client)
                    .dma_map(iova, len, fd, off, DMA_MAP_READ)
                    .map(|()| dma.read_only.push((iova, len)))
                    .map_err(|e| e.to_string()),
                None => Err(format!("no guest RAM file behind gpa {gpa:#x}")),
            }
        };
        if let Err(e) = r {
            // Nothing was mapped: the device faults on this range (a job there ends
            // STATUS_UNMAPPED); it cannot write pages nobody tracks.
            log::warn!(
                "{}: mapping iova {iova:#x} (+{len:#x}) to gpa {gpa:#x} for the device: {e}",
                self.id
            );
        }
    }

    fn unmap(&self, iova: u64, len: u64, gpa: u64, writable: bool) {
        let mut dma = lock(&self.dma);
        let r = if writable {
            let xlate = OneMapping { iova, gpa, len };
            dma.tracker
                .unmap(iova, len, &xlate)
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            dma.read_only.retain(|&(a, l)| (a, l) != (iova, len));
            lock(&self.client)
                .dma_unmap(iova, len)
                .map_err(|e| e.to_string())
        };
        if let Err(e) = r {
            log::error!(
                "{}: unmapping iova {iova:#x} (+{len:#x}) from the device: {e}; a migration \
                 cannot vouch for its writes from now on",
                self.id
            );
            dma.desync = Some(format!("unmapping iova {iova:#x} (+{len:#x}) failed: {e}"));
        }
    }
}

/// Checks that a device process answers on `cfg.socket` (a migration's destination does,
/// before any RAM moves, so a missing device fails the migration at once).
pub fn probe(cfg: &UserDeviceConfig) -> Result<(), String> {
    let c = Client::connect(&cfg.socket, ANSWER_TIMEOUT).map_err(|e| e.to_string())?;
    c.shutdown();
    Ok(())
}

/// One vfio-user device of the VM.
pub struct UserDevice {
    pub id: String,
    pub slot: u8,
    pub function: Arc<Mutex<UserPciFunction>>,
    client: Arc<Mutex<Client>>,
    dma: Arc<Mutex<Dma>>,
    /// Its endpoint in the vIOMMU's table, when behind it.
    endpoint: Option<(u32, Arc<IommuTable>)>,
    /// Why the last pause could not stop it: a harvest then cannot be the last word.
    stop_failed: Mutex<Option<String>>,
    /// Test seam (`FERRY_TEST_STOP_USER_DEVICES_LATE`): the pause leaves the device
    /// running, so it is stopped only when its state is saved, after the final harvest.
    stop_late: bool,
}

/// The test seam that stops vfio-user devices after the final harvest (the wrong order).
pub const STOP_LATE_ENV: &str = "FERRY_TEST_STOP_USER_DEVICES_LATE";

#[derive(Debug, thiserror::Error)]
#[error("user device {id} ({socket}): {reason}")]
pub struct UserDeviceError {
    pub id: String,
    pub socket: String,
    pub reason: String,
}

impl UserDevice {
    /// Connects to the device process, reads its PCI function, and (not behind the
    /// vIOMMU) maps all guest RAM for it at its guest-physical addresses.
    pub fn connect(
        id: String,
        slot: u8,
        cfg: &UserDeviceConfig,
        mem: &GuestMemoryMmap,
    ) -> Result<UserDevice, UserDeviceError> {
        let err = |reason: String| UserDeviceError {
            id: id.clone(),
            socket: cfg.socket.display().to_string(),
            reason,
        };
        let client =
            Client::connect(&cfg.socket, ANSWER_TIMEOUT).map_err(|e| err(e.to_string()))?;
        let client = Arc::new(Mutex::new(client));
        let function = UserPciFunction::new(client.clone()).map_err(|e| err(e.to_string()))?;
        let mut files = Vec::new();
        for r in mem.iter() {
            let f = r.file_offset().ok_or_else(|| {
                err(format!(
                    "guest RAM at {:#x} is not shared memory",
                    r.start_addr().0
                ))
            })?;
            files.push((r.start_addr().0, r.len(), f.file().as_raw_fd(), f.start()));
        }
        let log = UserDeviceLog::new(client.clone(), Box::new(RamFiles(files)));
        let mut tracker = DmaTracker::new(log, 4096);
        let scope = tracker.add_device(0).map_err(|e| err(e.to_string()))?;
        match scope {
            Scope::Tracked(_) => log::info!("{id}: the device logs its own DMA writes"),
            Scope::Unknown(_) => log::warn!(
                "{id}: the device cannot log its DMA writes: everything mapped for it is \
                 dirty at every harvest of a migration"
            ),
        }
        if !cfg.iommu {
            for r in mem.iter() {
                let gpa = r.start_addr().0;
                tracker
                    .map(gpa, r.len(), gpa)
                    .map_err(|e| err(format!("mapping guest RAM at {gpa:#x}: {e}")))?;
            }
        }
        Ok(UserDevice {
            id,
            slot,
            function: Arc::new(Mutex::new(function)),
            client,
            dma: Arc::new(Mutex::new(Dma {
                tracker,
                read_only: Vec::new(),
                desync: None,
            })),
            endpoint: None,
            stop_failed: Mutex::new(None),
            stop_late: {
                let on = std::env::var_os(STOP_LATE_ENV).is_some();
                if on {
                    log::warn!(
                        "{STOP_LATE_ENV} is set: vfio-user devices are stopped only after the \
                         final harvest (a test seam; a migration then loses what they write \
                         in between)"
                    );
                }
                on
            },
        })
    }

    /// The [`STOP_LATE_ENV`] seam is on for this device.
    pub fn stops_late(&self) -> bool {
        self.stop_late
    }

    /// Puts the device behind the vIOMMU as `endpoint`: from now on it is told of its
    /// domain's mappings.
    pub fn behind_iommu(&mut self, endpoint: u32, table: Arc<IommuTable>) {
        table.add_external_endpoint(
            endpoint,
            Arc::new(Hooks {
                id: self.id.clone(),
                client: self.client.clone(),
                dma: self.dma.clone(),
            }),
        );
        self.endpoint = Some((endpoint, table));
    }

    fn client(&self) -> MutexGuard<'_, Client> {
        lock(&self.client)
    }
}

impl OutsideDmaDevice for UserDevice {
    type State = UserDeviceState;

    fn id(&self) -> &str {
        &self.id
    }

    fn slot(&self) -> u8 {
        self.slot
    }

    fn state_names(s: &UserDeviceState) -> (&str, u8) {
        (&s.id, s.slot)
    }

    fn set_tracking(&self, on: bool) -> Result<(), String> {
        let mut dma = lock(&self.dma);
        if on {
            // A start the device refuses makes its ranges dirty at every harvest (rule 4);
            // the first harvest says why.
            dma.tracker.start();
            Ok(())
        } else {
            dma.tracker.stop().map_err(|e| e.to_string())
        }
    }

    /// What the device wrote since the last harvest, guest-physical.
    fn harvest(&self) -> Result<Harvest, String> {
        if !lock(&self.dma).tracker.is_tracking() {
            // No migration tracks: the device's writes are nobody's business.
            return Ok(Harvest::default());
        }
        if let Some(why) = &lock(&self.dma).desync {
            return Err(format!("its mappings and the vIOMMU's disagree: {why}"));
        }
        if let Some(why) = &*lock(&self.stop_failed) {
            // It may still be writing after this harvest: nothing it says is final.
            return Err(format!("the device could not be stopped: {why}"));
        }
        let h = match &self.endpoint {
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
        for e in &h.errors {
            log::warn!(
                "{}: reading the device's DMA log: {e} (taken as dirty)",
                self.id
            );
        }
        Ok(h)
    }

    /// Stops the device's DMA (the VM is paused).
    fn pause(&self) -> Result<(), String> {
        if self.stop_late {
            return Ok(());
        }
        let r = self
            .client()
            .set_state(VFIO_DEVICE_STATE_STOP)
            .map_err(|e| e.to_string());
        *lock(&self.stop_failed) = r.as_ref().err().cloned();
        r
    }

    /// Lets the device run again, from wherever the migration left it.
    fn resume(&self) -> Result<(), String> {
        *lock(&self.stop_failed) = None;
        let mut c = self.client();
        let state = c.state().map_err(|e| e.to_string())?;
        if state != VFIO_DEVICE_STATE_RUNNING {
            if state != VFIO_DEVICE_STATE_STOP {
                c.set_state(VFIO_DEVICE_STATE_STOP)
                    .map_err(|e| e.to_string())?;
            }
            c.set_state(VFIO_DEVICE_STATE_RUNNING)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The device's migration data (the device is stopped, and left in STOP).
    fn save(&self) -> Result<UserDeviceState, String> {
        let mut c = self.client();
        c.set_state(VFIO_DEVICE_STATE_STOP_COPY)
            .map_err(|e| e.to_string())?;
        let mut data = Vec::new();
        loop {
            let part = c.mig_data_read(MAX_DATA_BYTES).map_err(|e| e.to_string())?;
            if part.is_empty() {
                break;
            }
            data.extend_from_slice(&part);
            if data.len() > MAX_STATE_BYTES {
                return Err(format!(
                    "the device sent more than {MAX_STATE_BYTES} bytes of state"
                ));
            }
        }
        c.set_state(VFIO_DEVICE_STATE_STOP)
            .map_err(|e| e.to_string())?;
        Ok(UserDeviceState {
            id: self.id.clone(),
            slot: self.slot,
            data,
        })
    }

    /// Gives the device its source's state (left in STOP; [`Self::resume`] runs it).
    fn restore(&self, s: &UserDeviceState) -> Result<(), String> {
        let mut c = self.client();
        c.set_state(VFIO_DEVICE_STATE_STOP)
            .map_err(|e| e.to_string())?;
        c.set_state(VFIO_DEVICE_STATE_RESUMING)
            .map_err(|e| e.to_string())?;
        c.mig_data_write(&s.data).map_err(|e| e.to_string())?;
        c.set_state(VFIO_DEVICE_STATE_STOP)
            .map_err(|e| e.to_string())
    }
}

//! The virtio-pci transport (virtio 1.2 §4.1): one PCI function whose BAR 0 holds the
//! common configuration, the ISR, the device-specific configuration, the notification
//! area and the MSI-X table and pending bits, each announced by a vendor-specific
//! capability. The device behind it only sees [`VirtioDevice`] calls; interrupts leave
//! through an [`InterruptSink`] (KVM routes and irqfds in the VMM, a recorder in tests).

use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::common_config::{
    CommonConfig, CommonConfigError, CommonConfigState, StatusChange, COMMON_CONFIG_SIZE,
};
use super::device::VirtioDevice;
use super::interrupt::{InterruptSink, VirtioInterrupt};
use super::state::QueueState;
use super::worker::QueueWorker;
use crate::guest_ram::GuestRam;
use crate::pci::{
    BarKind, Msix, MsixError, MsixState, PciConfig, PciConfigError, PciConfigState, PciDevice,
    PciIds, COMMAND_INTX_DISABLE, MSIX_CAP_ID,
};

pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern virtio-pci device ids are 0x1040 plus the virtio device type.
const DEVICE_ID_BASE: u16 = 0x1040;
const VENDOR_CAP_ID: u8 = 0x09;
/// Offset of the command register in configuration space.
const PCI_COMMAND: usize = 0x04;

const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// BAR 0, one 4 KiB page per structure (so each can be mapped on its own).
pub const BAR: usize = 0;
const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
const BAR_SIZE: u64 = 0x8000;
/// Vectors fit in the 8 KiB between the table and the PBA.
const MAX_VECTORS: u16 = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / 16) as u16;

/// Why a transport could not be built (VMM bugs).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Common(#[from] CommonConfigError),
    #[error(transparent)]
    Config(#[from] PciConfigError),
    #[error(transparent)]
    Msix(#[from] MsixError),
    #[error("{queues} queues need {queues} + 1 MSI-X vectors, more than the {MAX_VECTORS} the BAR holds")]
    TooManyQueues { queues: usize },
    #[error("eventfd for {what}: {source}")]
    EventFd {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Why a migrated state was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("virtio-pci state version {found} (expected {VIRTIO_PCI_STATE_VERSION})")]
    Version { found: u32 },
    #[error("{name}: the state is for virtio device type {found}, this is type {expected}")]
    DeviceType {
        name: String,
        found: u16,
        expected: u16,
    },
    #[error("{name}: {why}")]
    Mismatch { name: String, why: String },
    #[error("{name}: cannot start the queue worker: {source}")]
    Worker {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

const DEVICE_NEEDS_RESET: u8 = 64;
/// Feature bit: the used/available event index mechanism.
const VIRTIO_RING_F_EVENT_IDX: u64 = 29;

/// Version of [`VirtioPciState`] (2: the device configuration).
pub const VIRTIO_PCI_STATE_VERSION: u32 = 2;

/// One virtio-pci function as migrated.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VirtioPciState {
    pub version: u32,
    pub device_type: u16,
    pub pci: PciConfigState,
    pub msix: MsixState,
    pub common: CommonConfigState,
    pub isr: u8,
    /// The queues the device was serving (index, where it stood), when DRIVER_OK.
    pub running: Option<Vec<(u16, QueueState)>>,
    /// The device-specific configuration as the driver read it (a disk's capacity, ...):
    /// the destination's device must show the same, or the driver would be misled.
    pub device_config: Vec<u8>,
}

/// Bytes of device configuration compared across a migration (virtio-blk's is 60).
const DEVICE_CONFIG_COMPARED: usize = 64;

/// One virtio device on PCI.
pub struct VirtioPciDevice {
    name: String,
    device: Arc<Mutex<dyn VirtioDevice>>,
    device_type: u16,
    config: PciConfig,
    common: CommonConfig,
    msix_cap: usize,
    interrupt: Arc<VirtioInterrupt>,
    /// One per queue, written by KVM (ioeventfd) or by a notify exit.
    notifiers: Vec<EventFd>,
    ram: GuestRam,
    worker: Option<QueueWorker>,
}

impl VirtioPciDevice {
    pub fn new(
        name: String,
        device: Arc<Mutex<dyn VirtioDevice>>,
        ram: GuestRam,
        interrupts: Arc<dyn InterruptSink>,
    ) -> Result<Self, TransportError> {
        let (device_type, class, sizes, features) = {
            let d = device.lock().unwrap_or_else(|p| p.into_inner());
            (
                d.device_type(),
                d.pci_class(),
                d.queue_max_sizes(),
                d.features(),
            )
        };
        let vectors = u16::try_from(sizes.len() + 1)
            .ok()
            .filter(|&v| v <= MAX_VECTORS)
            .ok_or(TransportError::TooManyQueues {
                queues: sizes.len(),
            })?;
        // Behind the vIOMMU the driver must give IOVAs: VIRTIO_F_ACCESS_PLATFORM says so.
        let features = if ram.iommu().is_some() {
            features | 1 << VIRTIO_F_ACCESS_PLATFORM
        } else {
            features
        };
        let common = CommonConfig::new(features, &sizes)?;
        let msix = Msix::new(vectors)?;
        let mut config = PciConfig::new(PciIds {
            vendor: VIRTIO_PCI_VENDOR,
            device: DEVICE_ID_BASE + device_type,
            class,
            revision: 1,
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: 0x40,
            interrupt_pin: 1,
        });
        config.add_bar(
            BAR,
            BarKind::Memory64 {
                prefetchable: false,
            },
            BAR_SIZE,
        )?;
        let structure = |cfg_type: u8, offset: u64, len: u64| {
            let mut body = vec![0u8; 14];
            body[0] = 16; // cap_len, with the notify multiplier: 20
            body[1] = cfg_type;
            body[2] = BAR as u8;
            body[6..10].copy_from_slice(&(offset as u32).to_le_bytes());
            body[10..14].copy_from_slice(&(len as u32).to_le_bytes());
            body
        };
        for (t, off, len) in [
            (CFG_COMMON, COMMON_OFFSET, COMMON_CONFIG_SIZE),
            (CFG_ISR, ISR_OFFSET, 1),
            (CFG_DEVICE, DEVICE_OFFSET, DEVICE_LEN),
        ] {
            let body = structure(t, off, len);
            config.add_capability(VENDOR_CAP_ID, &body, &[0; 14])?;
        }
        let mut notify = structure(
            CFG_NOTIFY,
            NOTIFY_OFFSET,
            sizes.len() as u64 * u64::from(NOTIFY_MULTIPLIER),
        );
        notify[0] = 20;
        notify.extend(NOTIFY_MULTIPLIER.to_le_bytes());
        config.add_capability(VENDOR_CAP_ID, &notify, &[0; 18])?;
        let (body, mask) = msix.capability(
            BAR as u8,
            MSIX_TABLE_OFFSET as u32,
            BAR as u8,
            MSIX_PBA_OFFSET as u32,
        );
        let msix_cap = config.add_capability(MSIX_CAP_ID, &body, &mask)?;
        let notifiers = (0..sizes.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TransportError::EventFd {
                what: "queue notification",
                source,
            })?;
        let clones = notifiers
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TransportError::EventFd {
                what: "queue notification",
                source,
            })?;
        device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue_notifiers(clones);
        Ok(VirtioPciDevice {
            name,
            device,
            device_type,
            config,
            common,
            msix_cap,
            interrupt: Arc::new(VirtioInterrupt::new(msix, sizes.len(), interrupts)),
            notifiers,
            ram,
            worker: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// Each queue's notification eventfd and its offset in BAR 0 (for KVM ioeventfds).
    pub fn notifiers(&self) -> impl Iterator<Item = (u64, &EventFd)> {
        self.notifiers
            .iter()
            .enumerate()
            .map(|(i, fd)| (NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_MULTIPLIER), fd))
    }

    /// The interrupt side, for a device that signals on its own (config changes).
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// Stops serving requests once the one in progress is done (migration's stop-and-copy).
    pub fn pause(&self) {
        if let Some(w) = &self.worker {
            w.pause();
        }
    }

    pub fn resume(&self) {
        if let Some(w) = &self.worker {
            w.resume();
        }
    }

    /// Keeps the agreed MSI-X vectors where the worker's signals read them.
    fn sync_vectors(&self) {
        let mut s = self.interrupt.lock();
        s.queue_vectors = self.common.queue_msix_vectors().to_vec();
        s.config_vector = self.common.config_msix_vector();
    }

    fn start_worker(&mut self, queues: Vec<(u16, Queue)>) -> Result<(), std::io::Error> {
        self.sync_vectors();
        let w = QueueWorker::spawn(
            self.name.clone(),
            self.device.clone(),
            queues,
            &self.notifiers,
            self.ram.clone(),
            self.interrupt.clone(),
        )?;
        self.worker = Some(w);
        Ok(())
    }

    fn activate(&mut self) {
        let features = self.common.driver_features();
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let queues: Vec<(u16, Queue)> = self
            .common
            .queues()
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready())
            // The worker gets its own copy; the registers keep theirs for the driver to
            // read back.
            .filter_map(|(i, q)| {
                let mut q = Queue::try_from(q.state()).ok()?;
                q.set_event_idx(event_idx);
                Some((i as u16, q))
            })
            .collect();
        let accepted = self
            .device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .activate(features);
        let started = accepted.and_then(|()| self.start_worker(queues).map_err(|e| e.to_string()));
        if let Err(e) = started {
            log::warn!("{}: cannot start: {e}", self.name);
            self.needs_reset();
        } else {
            log::info!(
                "{}: driver ready, features {features:#x}{}",
                self.name,
                if event_idx { " (event idx)" } else { "" }
            );
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let change = self.common.write(offset, data);
        self.sync_vectors();
        match change {
            StatusChange::Activate => self.activate(),
            StatusChange::Reset => {
                // Joins the worker: no request is in flight after this.
                if self.worker.take().is_some() {
                    self.device
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .reset();
                    // Behind the vIOMMU: what it may have written is dirty (rule 5).
                    self.ram.device_reset();
                }
                self.interrupt.lock().isr = 0;
                self.interrupt.sink().intx(false);
            }
            StatusChange::Failed | StatusChange::None => {}
        }
    }

    fn needs_reset(&mut self) {
        // DEVICE_NEEDS_RESET is set by the device, not the driver: bypass the driver's
        // write rules.
        let status = self.common.status() | DEVICE_NEEDS_RESET;
        self.common.force_status(status);
        self.common.bump_config_generation();
        self.interrupt.signal_config();
    }

    /// The function's state. Pause first: a running worker moves its queues on.
    pub fn state(&self) -> VirtioPciState {
        let (msix, isr) = {
            let s = self.interrupt.lock();
            (s.msix.state(), s.isr)
        };
        VirtioPciState {
            version: VIRTIO_PCI_STATE_VERSION,
            device_type: self.device_type,
            pci: self.config.state(),
            msix,
            common: self.common.state(),
            isr,
            running: self.worker.as_ref().map(QueueWorker::queue_states),
            device_config: self.device_config(),
        }
    }

    /// Takes a migrated state (before the vCPUs run). The device resumes serving where
    /// the source stopped, looking at every queue once for requests made meanwhile.
    pub fn restore(&mut self, s: &VirtioPciState) -> Result<(), RestoreError> {
        let mismatch = |why: String| RestoreError::Mismatch {
            name: self.name.clone(),
            why,
        };
        if s.version != VIRTIO_PCI_STATE_VERSION {
            return Err(RestoreError::Version { found: s.version });
        }
        if s.device_type != self.device_type {
            return Err(RestoreError::DeviceType {
                name: self.name.clone(),
                found: s.device_type,
                expected: self.device_type,
            });
        }
        let ours = self.device_config();
        if s.device_config != ours {
            let at = s
                .device_config
                .iter()
                .zip(&ours)
                .position(|(a, b)| a != b)
                .unwrap_or(ours.len().min(s.device_config.len()));
            return Err(mismatch(format!(
                "the device configuration differs from the source's at byte {at:#x} \
                 (source {:02x?}, here {:02x?}; a disk of another size?)",
                s.device_config
                    .get(at..(at + 8).min(s.device_config.len()))
                    .unwrap_or(&[]),
                ours.get(at..(at + 8).min(ours.len())).unwrap_or(&[]),
            )));
        }
        let mut common = CommonConfig::new(self.common.state().device_features, &{
            self.common
                .queues()
                .iter()
                .map(|q| q.max_size())
                .collect::<Vec<_>>()
        })
        .map_err(|e| mismatch(e.to_string()))?;
        common.restore(&s.common).map_err(mismatch)?;
        let running = match &s.running {
            None => None,
            Some(qs) => Some(
                qs.iter()
                    .map(|(i, q)| {
                        q.to_queue()
                            .map(|q| (*i, q))
                            .map_err(|e| mismatch(format!("running queue {i}: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        if let Some(qs) = &running {
            if let Some((i, _)) = qs
                .iter()
                .find(|(i, _)| usize::from(*i) >= self.notifiers.len())
            {
                return Err(mismatch(format!("running queue {i} does not exist")));
            }
        }
        let mut config = self.config.clone();
        config
            .restore(&s.pci)
            .map_err(|e| mismatch(e.to_string()))?;
        let mut msix = self.interrupt.lock().msix.clone();
        let effects = msix.restore(&s.msix).map_err(|e| mismatch(e.to_string()))?;
        // Everything fits: apply.
        self.worker = None;
        self.config = config;
        self.common = common;
        {
            let mut st = self.interrupt.lock();
            st.msix = msix;
            st.isr = s.isr;
            // The line level itself is not restored: KVM's I/O APIC state (pending
            // level-triggered inputs included) moves with the irqchip.
            st.intx_disabled = self.config.command() & COMMAND_INTX_DISABLE != 0;
        }
        self.interrupt.apply(effects);
        if let Some(qs) = running {
            self.device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .activate(self.common.driver_features())
                .map_err(|e| mismatch(format!("device refused the agreed features: {e}")))?;
            self.start_worker(qs)
                .map_err(|source| RestoreError::Worker {
                    name: self.name.clone(),
                    source,
                })?;
        }
        Ok(())
    }
}

impl VirtioPciDevice {
    fn device_config(&self) -> Vec<u8> {
        let mut b = vec![0u8; DEVICE_CONFIG_COMPARED];
        let d = self.device.lock().unwrap_or_else(|p| p.into_inner());
        for (i, chunk) in b.chunks_mut(4).enumerate() {
            d.read_config(i as u64 * 4, chunk);
        }
        b
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        if offset < PCI_COMMAND + 2 && offset + data.len() > PCI_COMMAND {
            let disabled = self.config.command() & COMMAND_INTX_DISABLE != 0;
            self.interrupt.set_intx_disabled(disabled);
        }
        let ctl = self.msix_cap + 2;
        if offset < ctl + 2 && offset + data.len() > ctl {
            let b = self.config.bytes();
            let value = u16::from_le_bytes([b[ctl], b[ctl + 1]]);
            let effects = self.interrupt.lock().msix.control_written(value);
            self.interrupt.apply(effects);
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != BAR {
            return;
        }
        let len = data.len() as u64;
        match offset {
            o if o + len <= COMMON_OFFSET + COMMON_CONFIG_SIZE => self.common.read(o, data),
            o if o == ISR_OFFSET && len == 1 => {
                // Reading the ISR acknowledges it and drops the INTx line.
                data[0] = std::mem::take(&mut self.interrupt.lock().isr);
                self.interrupt.sink().intx(false);
            }
            o if o >= DEVICE_OFFSET && o + len <= DEVICE_OFFSET + DEVICE_LEN => self
                .device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read_config(o - DEVICE_OFFSET, data),
            o if o >= MSIX_TABLE_OFFSET => {
                let s = self.interrupt.lock();
                if o + len <= MSIX_TABLE_OFFSET + s.msix.table_size() {
                    s.msix.read_table(o - MSIX_TABLE_OFFSET, data)
                } else if o >= MSIX_PBA_OFFSET && o + len <= MSIX_PBA_OFFSET + s.msix.pba_size() {
                    s.msix.read_pba(o - MSIX_PBA_OFFSET, data)
                }
            }
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != BAR {
            return;
        }
        let len = data.len() as u64;
        let queues = self.notifiers.len() as u64;
        match offset {
            o if o + len <= COMMON_OFFSET + COMMON_CONFIG_SIZE => self.write_common(o, data),
            o if o >= DEVICE_OFFSET && o + len <= DEVICE_OFFSET + DEVICE_LEN => self
                .device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_config(o - DEVICE_OFFSET, data),
            // A notify that reached the VMM (no ioeventfd at this address): the same
            // eventfd KVM would have written. Before DRIVER_OK nobody listens.
            o if o >= NOTIFY_OFFSET
                && o < NOTIFY_OFFSET + queues * u64::from(NOTIFY_MULTIPLIER)
                && (o - NOTIFY_OFFSET).is_multiple_of(u64::from(NOTIFY_MULTIPLIER)) =>
            {
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if self.worker.is_some() {
                    if let Err(e) = self.notifiers[q].write(1) {
                        log::error!("{}: queue {q} notification: {e}", self.name);
                    }
                }
            }
            o if o >= MSIX_TABLE_OFFSET => {
                let effects = {
                    let mut s = self.interrupt.lock();
                    if o + len <= MSIX_TABLE_OFFSET + s.msix.table_size() {
                        s.msix.write_table(o - MSIX_TABLE_OFFSET, data)
                    } else {
                        vec![]
                    }
                };
                self.interrupt.apply(effects);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_ram::GuestMemoryMmap;
    use crate::pci::{MsixEffect, COMMAND_MEMORY};
    use std::time::{Duration, Instant};
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use vm_memory::GuestAddress;

    const ISR_QUEUE: u64 = 1;

    #[derive(Default)]
    struct Fake {
        activated: Option<u64>,
        /// (queue, next_avail seen) per process_queue call.
        served: Vec<(u16, u16)>,
        resets: u32,
        refuse: bool,
        /// Queue 1's buffers wait for events of the device's own (an event queue).
        event_queue: bool,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u16 {
            4
        }
        fn pci_class(&self) -> u32 {
            0xff_00_00
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![64, 64]
        }
        fn features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(0x40 + offset as u8);
        }
        fn activate(&mut self, features: u64) -> Result<(), String> {
            if self.refuse {
                return Err("refused".into());
            }
            self.activated = Some(features);
            Ok(())
        }
        fn process_queue(&mut self, index: u16, queue: &mut Queue, _ram: &GuestRam) -> usize {
            self.served.push((index, queue.next_avail()));
            0
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
        fn buffers_wait_for_events(&self, index: u16) -> bool {
            self.event_queue && index == 1
        }
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl InterruptSink for Recorder {
        fn msix(&self, effect: MsixEffect) {
            self.0.lock().unwrap().push(format!("{effect:?}"));
        }
        fn intx(&self, level: bool) {
            self.0.lock().unwrap().push(format!("intx {level}"));
        }
    }

    fn ram() -> GuestRam {
        GuestRam::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap())
    }

    fn dev(refuse: bool) -> (VirtioPciDevice, Arc<Mutex<Fake>>, Arc<Recorder>) {
        let sink = Arc::new(Recorder::default());
        let fake = Arc::new(Mutex::new(Fake {
            refuse,
            ..Fake::default()
        }));
        let d = VirtioPciDevice::new("fake".into(), fake.clone(), ram(), sink.clone()).unwrap();
        (d, fake, sink)
    }

    fn wbar(d: &mut VirtioPciDevice, offset: u64, v: u64, len: usize) {
        d.write_bar(BAR, offset, &v.to_le_bytes()[..len]);
    }

    fn rbar(d: &mut VirtioPciDevice, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.read_bar(BAR, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// The driver's handshake through BAR 0: queue 1 only, then DRIVER_OK.
    fn bring_up(d: &mut VirtioPciDevice) {
        wbar(d, 0x14, 1 | 2, 1);
        wbar(d, 0x08, 1, 4);
        wbar(d, 0x0c, 1, 4); // VERSION_1 (bit 32)
        wbar(d, 0x14, 1 | 2 | 8, 1);
        wbar(d, 0x16, 1, 2);
        wbar(d, 0x18, 16, 2);
        wbar(d, 0x20, 0x10_0000, 4);
        wbar(d, 0x28, 0x11_0000, 4);
        wbar(d, 0x30, 0x12_0000, 4);
        wbar(d, 0x1c, 1, 2);
        wbar(d, 0x14, 1 | 2 | 8 | 4, 1);
    }

    /// Waits (bounded) until the fake has served `n` times; returns what it served.
    fn served(fake: &Mutex<Fake>, n: usize) -> Vec<(u16, u16)> {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let s = fake.lock().unwrap().served.clone();
            if s.len() >= n || Instant::now() > until {
                return s;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn capabilities_describe_the_bar_layout() {
        let (d, _, _) = dev(false);
        let c = d.config().bytes();
        assert_eq!(u16::from_le_bytes([c[0], c[1]]), 0x1af4);
        assert_eq!(u16::from_le_bytes([c[2], c[3]]), 0x1044, "0x1040 + type 4");
        let mut at = usize::from(c[0x34]);
        let mut seen = vec![];
        while at != 0 {
            let (id, next) = (c[at], usize::from(c[at + 1]));
            if id == VENDOR_CAP_ID {
                let off = u32::from_le_bytes(c[at + 8..at + 12].try_into().unwrap());
                let len = u32::from_le_bytes(c[at + 12..at + 16].try_into().unwrap());
                seen.push((c[at + 3], c[at + 4], off, len, c[at + 2]));
                if c[at + 3] == CFG_NOTIFY {
                    let m = u32::from_le_bytes(c[at + 16..at + 20].try_into().unwrap());
                    assert_eq!(m, NOTIFY_MULTIPLIER);
                }
            } else {
                assert_eq!(id, MSIX_CAP_ID);
                assert_eq!(
                    u16::from_le_bytes([c[at + 2], c[at + 3]]) & 0x7ff,
                    2,
                    "3 vectors"
                );
            }
            at = next;
        }
        assert_eq!(
            seen,
            vec![
                (CFG_COMMON, 0, 0, 0x3c, 16),
                (CFG_ISR, 0, 0x1000, 1, 16),
                (CFG_DEVICE, 0, 0x2000, 0x1000, 16),
                (CFG_NOTIFY, 0, 0x3000, 8, 20),
            ]
        );
        assert_eq!(d.config().bars().next().unwrap().size, BAR_SIZE);
        let offsets: Vec<u64> = d.notifiers().map(|(o, _)| o).collect();
        assert_eq!(offsets, vec![0x3000, 0x3004]);
    }

    #[test]
    fn the_handshake_starts_a_worker_that_serves_notified_queues() {
        let (mut d, fake, _) = dev(false);
        assert_eq!(rbar(&mut d, 0x12, 2), 2, "num_queues");
        wbar(&mut d, 0x3004, 1, 2);
        assert!(!d.is_active());
        bring_up(&mut d);
        assert!(d.is_active());
        assert_eq!(
            fake.lock().unwrap().activated,
            Some(1 << VIRTIO_F_VERSION_1)
        );
        // The worker looks at every running queue once when it starts.
        assert_eq!(served(&fake, 1), vec![(1, 0)]);
        // A notify exit reaches the worker; a misaligned one and queue 0 (not enabled)
        // do not.
        wbar(&mut d, 0x3002, 1, 2);
        wbar(&mut d, 0x3004, 1, 2);
        assert_eq!(served(&fake, 2), vec![(1, 0), (1, 0)]);
        // So does KVM's write to the eventfd (ioeventfd).
        d.notifiers().nth(1).unwrap().1.write(1).unwrap();
        assert_eq!(served(&fake, 3).len(), 3);
        assert_eq!(rbar(&mut d, 0x2003, 1), 0x43, "device config at its offset");
        wbar(&mut d, 0x14, 0, 1);
        assert_eq!(fake.lock().unwrap().resets, 1);
        assert!(!d.is_active());
        assert!(!d.common.queues()[1].ready());
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            fake.lock().unwrap().served.len(),
            3,
            "stopped with the reset"
        );
    }

    #[test]
    fn a_paused_device_serves_nothing_until_resumed() {
        let (mut d, fake, _) = dev(false);
        bring_up(&mut d);
        served(&fake, 1);
        d.pause();
        wbar(&mut d, 0x3004, 1, 2);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(fake.lock().unwrap().served.len(), 1, "paused");
        d.resume();
        assert!(
            served(&fake, 2).len() >= 2,
            "the notification made meanwhile is served"
        );
    }

    /// A driver whose available index always runs ahead of what the device takes (here
    /// the fake takes nothing) must not keep the worker's lock: pause and reset return.
    #[test]
    fn a_queue_that_never_drains_does_not_block_pause_or_reset() {
        let (mut d, fake, _) = dev(false);
        d.ram.write_obj(1u16, 0x11_0002).expect("avail idx in RAM");
        bring_up(&mut d);
        assert!(
            served(&fake, 10).len() >= 10,
            "the worker keeps coming back"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            d.pause();
            let n = fake.lock().unwrap().served.len();
            std::thread::sleep(Duration::from_millis(30));
            let paused_still = fake.lock().unwrap().served.len() == n;
            wbar(&mut d, 0x14, 0, 1);
            tx.send(paused_still).unwrap();
        });
        let paused_still = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("pause and reset returned within 10 s");
        assert!(paused_still, "nothing served while paused");
        t.join().unwrap();
    }

    /// The same never-draining queue as an event queue (the vIOMMU's fault records): the
    /// buffers the device did not take are no work, so the worker serves it once per
    /// wake-up and then sleeps, instead of spinning on them (it did: a core at 70 %).
    #[test]
    fn an_event_queue_with_buffers_and_no_events_does_not_spin() {
        let (mut d, fake, _) = dev(false);
        fake.lock().unwrap().event_queue = true;
        d.ram.write_obj(16u16, 0x11_0002).expect("avail idx in RAM");
        bring_up(&mut d);
        assert_eq!(served(&fake, 1).len(), 1, "served once as it starts");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(fake.lock().unwrap().served.len(), 1, "then left alone");
        // The device's own wake-up (a notifier write) serves it once more.
        d.notifiers().nth(1).unwrap().1.write(1).unwrap();
        assert_eq!(served(&fake, 2).len(), 2);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(fake.lock().unwrap().served.len(), 2, "and no more");
    }

    #[test]
    fn a_device_that_cannot_start_asks_for_a_reset() {
        let (mut d, _, _) = dev(true);
        bring_up(&mut d);
        assert!(!d.is_active());
        assert_ne!(rbar(&mut d, 0x14, 1) as u8 & DEVICE_NEEDS_RESET, 0);
        assert_eq!(rbar(&mut d, 0x15, 1), 1, "config generation moved");
    }

    #[test]
    fn without_msix_interrupts_go_through_intx_and_the_isr() {
        let (mut d, _, sink) = dev(false);
        bring_up(&mut d);
        d.interrupt().signal_queue(1);
        assert_eq!(rbar(&mut d, ISR_OFFSET, 1), ISR_QUEUE);
        assert_eq!(rbar(&mut d, ISR_OFFSET, 1), 0, "reading acknowledged it");
        assert_eq!(
            *sink.0.lock().unwrap(),
            vec!["intx true", "intx false", "intx false"]
        );
    }

    #[test]
    fn intx_disable_in_the_command_register_keeps_the_line_low() {
        let (mut d, _, sink) = dev(false);
        bring_up(&mut d);
        let command = |d: &mut VirtioPciDevice, v: u16| d.write_config(4, &v.to_le_bytes());
        command(&mut d, COMMAND_MEMORY | COMMAND_INTX_DISABLE);
        d.interrupt().signal_queue(1);
        assert!(
            !sink.0.lock().unwrap().iter().any(|l| l == "intx true"),
            "{:?}",
            sink.0.lock().unwrap()
        );
        // Writing the same value again changes nothing; clearing the bit raises the line
        // for the reason the ISR kept, and reading the ISR lowers it.
        command(&mut d, COMMAND_MEMORY | COMMAND_INTX_DISABLE);
        command(&mut d, COMMAND_MEMORY);
        assert_eq!(sink.0.lock().unwrap().last().unwrap(), "intx true");
        assert_eq!(rbar(&mut d, ISR_OFFSET, 1), ISR_QUEUE);
        // Setting it with the line high lowers it.
        d.interrupt().signal_queue(1);
        command(&mut d, COMMAND_MEMORY | COMMAND_INTX_DISABLE);
        assert_eq!(
            sink.0.lock().unwrap()[1..],
            ["intx true", "intx false", "intx true", "intx false"]
        );
        // The state keeps the bit: a restored function still keeps the line low.
        let state = d.state();
        let (mut e, _, sink_e) = dev(false);
        e.restore(&state).unwrap();
        e.interrupt().signal_queue(1);
        assert!(
            !sink_e.0.lock().unwrap().iter().any(|l| l == "intx true"),
            "{:?}",
            sink_e.0.lock().unwrap()
        );
    }

    #[test]
    fn with_msix_a_used_queue_sends_its_vector_once_unmasked() {
        let (mut d, _, sink) = dev(false);
        bring_up(&mut d);
        let ctl = d.msix_cap + 2;
        d.write_config(ctl, &0x8000u16.to_le_bytes());
        wbar(&mut d, 0x16, 1, 2);
        wbar(&mut d, 0x1a, 2, 2);
        // Vector 2: address and data, then unmask.
        wbar(&mut d, MSIX_TABLE_OFFSET + 32, 0xfee0_0000, 8);
        wbar(&mut d, MSIX_TABLE_OFFSET + 40, 0x4031, 4);
        d.interrupt().signal_queue(1);
        wbar(&mut d, MSIX_TABLE_OFFSET + 44, 0, 4);
        d.interrupt().signal_queue(1);
        let log = sink.0.lock().unwrap().clone();
        let sends = log
            .iter()
            .filter(|l| l.starts_with("Send { vector: 2"))
            .count();
        assert_eq!(
            sends, 2,
            "the pending one on unmask, then one more: {log:?}"
        );
        assert!(
            log.iter().any(|l| l.starts_with("Route { vector: 2")),
            "{log:?}"
        );
        assert!(!log.iter().any(|l| l.starts_with("intx")), "{log:?}");
        // A queue with no vector sends nothing.
        wbar(&mut d, 0x16, 0, 2);
        d.interrupt().signal_queue(0);
        assert_eq!(sink.0.lock().unwrap().len(), log.len());
    }

    #[test]
    fn a_running_device_moves_with_its_state() {
        let (mut d, fake, _) = dev(false);
        bring_up(&mut d);
        served(&fake, 1);
        d.pause();
        let s = d.state();
        let running = s.running.clone().expect("running queues");
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].0, 1);
        let json = serde_json::to_string(&s).unwrap();
        let back: VirtioPciState = serde_json::from_str(&json).unwrap();

        let (mut e, fake2, _) = dev(false);
        e.restore(&back).unwrap();
        assert!(e.is_active());
        assert_eq!(
            fake2.lock().unwrap().activated,
            Some(1 << VIRTIO_F_VERSION_1)
        );
        assert_eq!(served(&fake2, 1), vec![(1, 0)], "looked at its queue once");
        assert_eq!(rbar(&mut e, 0x14, 1), 15, "status DRIVER_OK");
        assert_eq!(e.state().common, s.common);

        // A state that does not fit changes nothing: another device configuration...
        let (mut f, _, _) = dev(false);
        let mut other = back.device_config.clone();
        other[5] ^= 1;
        let wrong = VirtioPciState {
            device_config: other,
            ..back.clone()
        };
        let e = f.restore(&wrong).unwrap_err().to_string();
        assert!(e.contains("at byte 0x5"), "{e}");
        assert!(!f.is_active());
        // ...another device type, another version.
        let wrong = VirtioPciState {
            device_type: 2,
            ..back.clone()
        };
        assert!(f
            .restore(&wrong)
            .unwrap_err()
            .to_string()
            .contains("type 2"));
        let wrong = VirtioPciState { version: 9, ..back };
        assert!(f.restore(&wrong).is_err());
        assert!(!f.is_active());
        assert_eq!(rbar(&mut f, 0x14, 1), 0);
    }

    #[test]
    fn other_bars_and_gaps_read_zero_and_ignore_writes() {
        let (mut d, fake, _) = dev(false);
        let mut b = [0xee; 4];
        d.read_bar(1, 0, &mut b);
        assert_eq!(b, [0; 4]);
        d.read_bar(BAR, 0x7000, &mut b);
        assert_eq!(b, [0; 4]);
        d.write_bar(BAR, 0x7000, &[1; 4]);
        d.write_bar(BAR, ISR_OFFSET, &[1]);
        assert!(fake.lock().unwrap().served.is_empty());
    }
}

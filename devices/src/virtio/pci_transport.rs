//! The virtio-pci transport (virtio 1.2 §4.1): one PCI function whose BAR 0 holds the
//! common configuration, the ISR, the device-specific configuration, the notification
//! area and the MSI-X table and pending bits, each announced by a vendor-specific
//! capability. The device behind it only sees [`VirtioDevice`] calls; interrupts leave
//! through an [`InterruptSink`] (KVM routes and irqfds in the VMM, a recorder in tests).

use std::sync::Arc;

use virtio_queue::Queue;

use super::common_config::{
    CommonConfig, CommonConfigError, StatusChange, COMMON_CONFIG_SIZE, NO_VECTOR,
};
use crate::pci::{
    BarKind, Msix, MsixEffect, MsixError, MsixTrigger, PciConfig, PciConfigError, PciDevice,
    PciIds, MSIX_CAP_ID,
};

pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern virtio-pci device ids are 0x1040 plus the virtio device type.
const DEVICE_ID_BASE: u16 = 0x1040;
const VENDOR_CAP_ID: u8 = 0x09;

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

const ISR_QUEUE: u8 = 1 << 0;
const ISR_CONFIG: u8 = 1 << 1;

/// A virtio device, as the transport drives it.
pub trait VirtioDevice: Send {
    /// The virtio device type (2 block, 4 entropy, ...).
    fn device_type(&self) -> u16;
    /// PCI class code (base, sub, interface) the function shows.
    fn pci_class(&self) -> u32;
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered; VERSION_1 must be among them.
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// DRIVER_OK: start with the agreed features and the queues the driver enabled
    /// (index, queue). An error sets DEVICE_NEEDS_RESET for the driver to see.
    fn activate(&mut self, features: u64, queues: Vec<(u16, Queue)>) -> Result<(), String>;
    /// The driver reset the device: stop, finish or drop what is in flight, forget the
    /// queues.
    fn reset(&mut self);
    /// The driver notified queue `queue` (the VMM wires an ioeventfd instead where it can).
    fn queue_notified(&mut self, _queue: u16) {}
}

/// Where interrupts go.
pub trait InterruptSink: Send + Sync {
    /// An MSI-X route changed, or a message is to be sent.
    fn msix(&self, effect: MsixEffect);
    /// INTx level (for drivers that do not enable MSI-X).
    fn intx(&self, level: bool);
}

/// Why a transport could not be built (VMM bugs).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportError {
    #[error(transparent)]
    Common(#[from] CommonConfigError),
    #[error(transparent)]
    Config(#[from] PciConfigError),
    #[error(transparent)]
    Msix(#[from] MsixError),
    #[error("{queues} queues need {queues} + 1 MSI-X vectors, more than the {MAX_VECTORS} the BAR holds")]
    TooManyQueues { queues: usize },
}

const DEVICE_NEEDS_RESET: u8 = 64;

/// One virtio device on PCI.
pub struct VirtioPciDevice<D: VirtioDevice> {
    device: D,
    config: PciConfig,
    common: CommonConfig,
    msix: Msix,
    msix_cap: usize,
    isr: u8,
    interrupts: Arc<dyn InterruptSink>,
    active: bool,
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    pub fn new(device: D, interrupts: Arc<dyn InterruptSink>) -> Result<Self, TransportError> {
        let sizes = device.queue_max_sizes();
        let vectors = u16::try_from(sizes.len() + 1)
            .ok()
            .filter(|&v| v <= MAX_VECTORS)
            .ok_or(TransportError::TooManyQueues {
                queues: sizes.len(),
            })?;
        let common = CommonConfig::new(device.features(), &sizes)?;
        let msix = Msix::new(vectors)?;
        let mut config = PciConfig::new(PciIds {
            vendor: VIRTIO_PCI_VENDOR,
            device: DEVICE_ID_BASE + device.device_type(),
            class: device.pci_class(),
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
        Ok(VirtioPciDevice {
            device,
            config,
            common,
            msix,
            msix_cap,
            isr: 0,
            interrupts,
            active: false,
        })
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The device put buffers in queue `queue`'s used ring: interrupt the driver.
    pub fn signal_used_queue(&mut self, queue: u16) {
        let vector = self
            .common
            .queue_msix_vector(usize::from(queue))
            .unwrap_or(NO_VECTOR);
        self.signal(vector, ISR_QUEUE);
    }

    /// The device changed its configuration.
    pub fn signal_config_change(&mut self) {
        self.common.bump_config_generation();
        let vector = self.common.config_msix_vector();
        self.signal(vector, ISR_CONFIG);
    }

    fn signal(&mut self, vector: u16, isr: u8) {
        if self.msix.enabled() {
            if vector == NO_VECTOR {
                return;
            }
            if let MsixTrigger::Send(message) = self.msix.trigger(vector) {
                self.interrupts.msix(MsixEffect::Send { vector, message });
            }
        } else {
            self.isr |= isr;
            self.interrupts.intx(true);
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        match self.common.write(offset, data) {
            StatusChange::Activate => {
                let queues = self
                    .common
                    .queues()
                    .iter()
                    .enumerate()
                    .filter(|(_, q)| virtio_queue::QueueT::ready(*q))
                    // The device gets its own copy; the registers keep theirs for the
                    // driver to read back.
                    .filter_map(|(i, q)| Queue::try_from(q.state()).ok().map(|q| (i as u16, q)))
                    .collect();
                match self.device.activate(self.common.driver_features(), queues) {
                    Ok(()) => self.active = true,
                    Err(e) => {
                        log::warn!(
                            "virtio device type {} failed to start: {e}",
                            self.device.device_type()
                        );
                        self.needs_reset();
                    }
                }
            }
            StatusChange::Reset => {
                if std::mem::take(&mut self.active) {
                    self.device.reset();
                }
                self.isr = 0;
                self.interrupts.intx(false);
            }
            StatusChange::Failed | StatusChange::None => {}
        }
    }

    fn needs_reset(&mut self) {
        // DEVICE_NEEDS_RESET is set by the device, not the driver: bypass the driver's
        // write rules.
        let status = self.common.status() | DEVICE_NEEDS_RESET;
        self.common.force_status(status);
        self.signal_config_change();
    }
}

impl<D: VirtioDevice> PciDevice for VirtioPciDevice<D> {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let ctl = self.msix_cap + 2;
        if offset < ctl + 2 && offset + data.len() > ctl {
            let b = self.config.bytes();
            let value = u16::from_le_bytes([b[ctl], b[ctl + 1]]);
            for effect in self.msix.control_written(value) {
                self.interrupts.msix(effect);
            }
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
                data[0] = std::mem::take(&mut self.isr);
                self.interrupts.intx(false);
            }
            o if o >= DEVICE_OFFSET && o + len <= DEVICE_OFFSET + DEVICE_LEN => {
                self.device.read_config(o - DEVICE_OFFSET, data)
            }
            o if o >= MSIX_TABLE_OFFSET
                && o + len <= MSIX_TABLE_OFFSET + self.msix.table_size() =>
            {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if o >= MSIX_PBA_OFFSET && o + len <= MSIX_PBA_OFFSET + self.msix.pba_size() => {
                self.msix.read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != BAR {
            return;
        }
        let len = data.len() as u64;
        let queues = self.common.queues().len() as u64;
        match offset {
            o if o + len <= COMMON_OFFSET + COMMON_CONFIG_SIZE => self.write_common(o, data),
            o if o >= DEVICE_OFFSET && o + len <= DEVICE_OFFSET + DEVICE_LEN => {
                self.device.write_config(o - DEVICE_OFFSET, data)
            }
            // A notification before DRIVER_OK is ignored.
            o if self.active
                && o >= NOTIFY_OFFSET
                && o < NOTIFY_OFFSET + queues * u64::from(NOTIFY_MULTIPLIER)
                && (o - NOTIFY_OFFSET).is_multiple_of(u64::from(NOTIFY_MULTIPLIER)) =>
            {
                let q = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER);
                self.device.queue_notified(q as u16);
            }
            o if o >= MSIX_TABLE_OFFSET
                && o + len <= MSIX_TABLE_OFFSET + self.msix.table_size() =>
            {
                for effect in self.msix.write_table(o - MSIX_TABLE_OFFSET, data) {
                    self.interrupts.msix(effect);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_queue::QueueT;

    #[derive(Default)]
    struct Fake {
        activated: Option<(u64, Vec<(u16, u16)>)>,
        notified: Vec<u16>,
        resets: u32,
        refuse: bool,
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
        fn activate(&mut self, features: u64, queues: Vec<(u16, Queue)>) -> Result<(), String> {
            if self.refuse {
                return Err("refused".into());
            }
            self.activated = Some((
                features,
                queues.iter().map(|(i, q)| (*i, q.size())).collect(),
            ));
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
        fn queue_notified(&mut self, queue: u16) {
            self.notified.push(queue);
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

    fn dev(refuse: bool) -> (VirtioPciDevice<Fake>, Arc<Recorder>) {
        let sink = Arc::new(Recorder::default());
        let d = VirtioPciDevice::new(
            Fake {
                refuse,
                ..Fake::default()
            },
            sink.clone(),
        )
        .unwrap();
        (d, sink)
    }

    fn wbar(d: &mut VirtioPciDevice<Fake>, offset: u64, v: u64, len: usize) {
        d.write_bar(BAR, offset, &v.to_le_bytes()[..len]);
    }

    fn rbar(d: &mut VirtioPciDevice<Fake>, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.read_bar(BAR, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// The driver's handshake through BAR 0: queue 1 only, then DRIVER_OK.
    fn bring_up(d: &mut VirtioPciDevice<Fake>) {
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

    #[test]
    fn capabilities_describe_the_bar_layout() {
        let (d, _) = dev(false);
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
    }

    #[test]
    fn the_handshake_activates_the_device_with_the_enabled_queues() {
        let (mut d, _) = dev(false);
        assert_eq!(rbar(&mut d, 0x12, 2), 2, "num_queues");
        bring_up(&mut d);
        assert!(d.is_active());
        assert_eq!(
            d.device().activated,
            Some((1 << VIRTIO_F_VERSION_1, vec![(1, 16)]))
        );
        wbar(&mut d, 0x3004, 1, 2);
        wbar(&mut d, 0x3002, 1, 2);
        wbar(&mut d, 0x3008, 1, 2);
        assert_eq!(d.device().notified, vec![1], "only queue 1's aligned slot");
        assert_eq!(rbar(&mut d, 0x2003, 1), 0x43, "device config at its offset");
        wbar(&mut d, 0x14, 0, 1);
        assert_eq!(d.device().resets, 1);
        assert!(!d.is_active());
        assert!(!d.common.queues()[1].ready());
    }

    #[test]
    fn a_device_that_cannot_start_asks_for_a_reset() {
        let (mut d, _) = dev(true);
        bring_up(&mut d);
        assert!(!d.is_active());
        assert_ne!(rbar(&mut d, 0x14, 1) as u8 & DEVICE_NEEDS_RESET, 0);
        assert_eq!(rbar(&mut d, 0x15, 1), 1, "config generation moved");
    }

    #[test]
    fn without_msix_interrupts_go_through_intx_and_the_isr() {
        let (mut d, sink) = dev(false);
        bring_up(&mut d);
        d.signal_used_queue(1);
        assert_eq!(rbar(&mut d, ISR_OFFSET, 1), u64::from(ISR_QUEUE));
        assert_eq!(rbar(&mut d, ISR_OFFSET, 1), 0, "reading acknowledged it");
        assert_eq!(
            *sink.0.lock().unwrap(),
            vec!["intx true", "intx false", "intx false"]
        );
    }

    #[test]
    fn with_msix_a_used_queue_sends_its_vector_once_unmasked() {
        let (mut d, sink) = dev(false);
        bring_up(&mut d);
        let ctl = d.msix_cap + 2;
        d.write_config(ctl, &0x8000u16.to_le_bytes());
        wbar(&mut d, 0x16, 1, 2);
        wbar(&mut d, 0x1a, 2, 2);
        // Vector 2: address and data, then unmask.
        wbar(&mut d, MSIX_TABLE_OFFSET + 32, 0xfee0_0000, 8);
        wbar(&mut d, MSIX_TABLE_OFFSET + 40, 0x4031, 4);
        d.signal_used_queue(1);
        wbar(&mut d, MSIX_TABLE_OFFSET + 44, 0, 4);
        d.signal_used_queue(1);
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
        d.signal_used_queue(0);
        assert_eq!(sink.0.lock().unwrap().len(), log.len());
    }

    #[test]
    fn other_bars_and_gaps_read_zero_and_ignore_writes() {
        let (mut d, _) = dev(false);
        let mut b = [0xee; 4];
        d.read_bar(1, 0, &mut b);
        assert_eq!(b, [0; 4]);
        d.read_bar(BAR, 0x7000, &mut b);
        assert_eq!(b, [0; 4]);
        d.write_bar(BAR, 0x7000, &[1; 4]);
        d.write_bar(BAR, ISR_OFFSET, &[1]);
        assert_eq!(d.device().notified, Vec::<u16>::new());
    }
}

//! The virtio-pci common configuration structure (virtio 1.2 §4.1.4.3): feature
//! negotiation, the device status handshake and the setup of each queue, kept as
//! `virtio-queue` queues until the driver says DRIVER_OK. The transport maps it at the
//! start of its BAR and acts on the [`StatusChange`] a write returns.
//!
//! The rules a driver can break, and what happens then (nothing panics, nothing is
//! half-applied):
//! - FEATURES_OK with a feature the device does not offer, or without VERSION_1: the bit
//!   is not set, which the driver reads back as "refused";
//! - a status write that clears bits without writing 0 (reset) is ignored;
//! - feature and queue setup after FEATURES_OK / DRIVER_OK is ignored;
//! - a queue size that is not a power of two up to the maximum, or a misaligned ring
//!   address, is ignored (the register keeps its value);
//! - an access of the wrong width reads zeros and writes nothing.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

/// Bytes of the structure (up to and including `queue_reset`).
pub const COMMON_CONFIG_SIZE: u64 = 0x3c;
/// `config_msix_vector` / `queue_msix_vector` value for "no vector".
pub const NO_VECTOR: u16 = 0xffff;

const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC_LO: u64 = 0x20;
const QUEUE_DESC_HI: u64 = 0x24;
const QUEUE_DRIVER_LO: u64 = 0x28;
const QUEUE_DRIVER_HI: u64 = 0x2c;
const QUEUE_DEVICE_LO: u64 = 0x30;
const QUEUE_DEVICE_HI: u64 = 0x34;
const QUEUE_NOTIFY_DATA: u64 = 0x38;
const QUEUE_RESET: u64 = 0x3a;

const ACKNOWLEDGE: u8 = VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
const DRIVER: u8 = VIRTIO_CONFIG_S_DRIVER as u8;
const FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
const DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
const FAILED: u8 = VIRTIO_CONFIG_S_FAILED as u8;

/// What a write to the structure asks of the transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusChange {
    None,
    /// The driver wrote 0: stop the device, forget its queues (already done here).
    Reset,
    /// DRIVER_OK: start the device with the enabled queues.
    Activate,
    /// The driver gave up (FAILED).
    Failed,
}

/// Why a device's declaration was refused (VMM bugs, not guest input).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommonConfigError {
    #[error("a virtio device must offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NoVersion1(u64),
    #[error("queue {index}: maximum size {size} is not a power of two from 1 to 32768")]
    BadQueueSize { index: usize, size: u16 },
    #[error("a virtio device needs 1 to 65535 queues, not {0}")]
    QueueCount(usize),
}

/// The common configuration of one virtio-pci function.
#[derive(Debug)]
pub struct CommonConfig {
    device_features: u64,
    driver_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    status: u8,
    config_generation: u8,
    config_msix_vector: u16,
    queue_select: u16,
    queues: Vec<Queue>,
    queue_msix_vectors: Vec<u16>,
}

impl CommonConfig {
    pub fn new(device_features: u64, queue_max_sizes: &[u16]) -> Result<Self, CommonConfigError> {
        if device_features & 1 << VIRTIO_F_VERSION_1 == 0 {
            return Err(CommonConfigError::NoVersion1(device_features));
        }
        if queue_max_sizes.is_empty() || queue_max_sizes.len() > usize::from(u16::MAX) {
            return Err(CommonConfigError::QueueCount(queue_max_sizes.len()));
        }
        let queues = queue_max_sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|_| CommonConfigError::BadQueueSize { index, size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CommonConfig {
            device_features,
            driver_features: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            status: 0,
            config_generation: 0,
            config_msix_vector: NO_VECTOR,
            queue_select: 0,
            queue_msix_vectors: vec![NO_VECTOR; queues.len()],
            queues,
        })
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    /// Features both sides agreed on (valid once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    pub fn queue_msix_vector(&self, queue: usize) -> Option<u16> {
        self.queue_msix_vectors.get(queue).copied()
    }

    pub fn config_msix_vector(&self) -> u16 {
        self.config_msix_vector
    }

    /// Sets status bits that only the device sets (DEVICE_NEEDS_RESET), past the rules
    /// for driver writes.
    pub(crate) fn force_status(&mut self, status: u8) {
        self.status = status;
    }

    /// The device changed its configuration: drivers re-read it when this moves.
    pub fn bump_config_generation(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    fn selected(&self) -> Option<usize> {
        let q = usize::from(self.queue_select);
        (q < self.queues.len()).then_some(q)
    }

    /// Queue setup is open while the driver has not said DRIVER_OK.
    fn queue_setup_open(&self) -> bool {
        self.status & DRIVER_OK == 0
    }

    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let q = self.selected().map(|i| &self.queues[i]);
        let v: u64 = match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select.into(),
            (DEVICE_FEATURE, 4) => half(self.device_features, self.device_feature_select),
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select.into(),
            (DRIVER_FEATURE, 4) => half(self.driver_features, self.driver_feature_select),
            (CONFIG_MSIX_VECTOR, 2) => self.config_msix_vector.into(),
            (NUM_QUEUES, 2) => self.queues.len() as u64,
            (DEVICE_STATUS, 1) => self.status.into(),
            (CONFIG_GENERATION, 1) => self.config_generation.into(),
            (QUEUE_SELECT, 2) => self.queue_select.into(),
            // Size 0 tells the driver the selected queue does not exist.
            (QUEUE_SIZE, 2) => q.map_or(0, |q| q.size().into()),
            (QUEUE_MSIX_VECTOR, 2) => self
                .selected()
                .map_or(NO_VECTOR, |i| self.queue_msix_vectors[i])
                .into(),
            (QUEUE_ENABLE, 2) => q.map_or(0, |q| q.ready().into()),
            // One notify slot per queue, in queue order.
            (QUEUE_NOTIFY_OFF, 2) | (QUEUE_NOTIFY_DATA, 2) => self.selected().unwrap_or(0) as u64,
            (QUEUE_DESC_LO, 4) => q.map_or(0, |q| q.desc_table() & 0xffff_ffff),
            (QUEUE_DESC_HI, 4) => q.map_or(0, |q| q.desc_table() >> 32),
            (QUEUE_DRIVER_LO, 4) => q.map_or(0, |q| q.avail_ring() & 0xffff_ffff),
            (QUEUE_DRIVER_HI, 4) => q.map_or(0, |q| q.avail_ring() >> 32),
            (QUEUE_DEVICE_LO, 4) => q.map_or(0, |q| q.used_ring() & 0xffff_ffff),
            (QUEUE_DEVICE_HI, 4) => q.map_or(0, |q| q.used_ring() >> 32),
            (QUEUE_RESET, 2) => 0,
            _ => return,
        };
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> StatusChange {
        let mut b = [0u8; 8];
        let Some(dst) = b.get_mut(..data.len()) else {
            return StatusChange::None;
        };
        dst.copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = v as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = v as u32,
            (DRIVER_FEATURE, 4) if self.status & FEATURES_OK == 0 => {
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return StatusChange::None,
                };
                self.driver_features =
                    (self.driver_features & !(0xffff_ffff << shift)) | (v << shift);
            }
            (CONFIG_MSIX_VECTOR, 2) => self.config_msix_vector = v as u16,
            (DEVICE_STATUS, 1) => return self.write_status(v as u8),
            (QUEUE_SELECT, 2) => self.queue_select = v as u16,
            (QUEUE_MSIX_VECTOR, 2) => {
                if let Some(i) = self.selected() {
                    self.queue_msix_vectors[i] = v as u16;
                }
            }
            (
                QUEUE_SIZE | QUEUE_ENABLE | QUEUE_DESC_LO | QUEUE_DESC_HI | QUEUE_DRIVER_LO
                | QUEUE_DRIVER_HI | QUEUE_DEVICE_LO | QUEUE_DEVICE_HI,
                2 | 4,
            ) if self.queue_setup_open() => {
                self.write_queue(offset, data.len(), v);
            }
            _ => {}
        }
        StatusChange::None
    }

    fn write_queue(&mut self, offset: u64, len: usize, v: u64) {
        let Some(i) = self.selected() else { return };
        let q = &mut self.queues[i];
        let set_half = |old: u64, hi: bool| {
            if hi {
                (old & 0xffff_ffff) | v << 32
            } else {
                (old & !0xffff_ffff) | v
            }
        };
        // Invalid values are refused by virtio-queue and leave the register as it was.
        let _ = match (offset, len) {
            (QUEUE_SIZE, 2) => q.try_set_size(v as u16),
            // Writing 0 is not allowed (queue_reset is the way); ignore it.
            (QUEUE_ENABLE, 2) => {
                if v == 1 {
                    q.set_ready(true);
                }
                Ok(())
            }
            (QUEUE_DESC_LO | QUEUE_DESC_HI, 4) => {
                let a = set_half(q.desc_table(), offset == QUEUE_DESC_HI);
                q.try_set_desc_table_address(GuestAddress(a))
            }
            (QUEUE_DRIVER_LO | QUEUE_DRIVER_HI, 4) => {
                let a = set_half(q.avail_ring(), offset == QUEUE_DRIVER_HI);
                q.try_set_avail_ring_address(GuestAddress(a))
            }
            (QUEUE_DEVICE_LO | QUEUE_DEVICE_HI, 4) => {
                let a = set_half(q.used_ring(), offset == QUEUE_DEVICE_HI);
                q.try_set_used_ring_address(GuestAddress(a))
            }
            _ => Ok(()),
        };
    }

    fn write_status(&mut self, new: u8) -> StatusChange {
        if new == 0 {
            self.reset();
            return StatusChange::Reset;
        }
        let old = self.status;
        if old & !new != 0 {
            // Bits only go away through a reset.
            return StatusChange::None;
        }
        let added = new & !old;
        let mut status = new;
        if added & FEATURES_OK != 0 && !self.features_acceptable() {
            status &= !FEATURES_OK;
        }
        if added & DRIVER_OK != 0 && status & FEATURES_OK == 0 {
            status &= !DRIVER_OK;
        }
        self.status = status;
        if added & FAILED != 0 {
            StatusChange::Failed
        } else if status & added & DRIVER_OK != 0 {
            StatusChange::Activate
        } else {
            StatusChange::None
        }
    }

    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.device_features == 0
            && self.driver_features & 1 << VIRTIO_F_VERSION_1 != 0
            && self.status & (ACKNOWLEDGE | DRIVER) == ACKNOWLEDGE | DRIVER
    }

    /// Back to the state after power-on (the device's own state is the transport's).
    pub fn reset(&mut self) {
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.status = 0;
        self.config_msix_vector = NO_VECTOR;
        self.queue_select = 0;
        self.queues.iter_mut().for_each(QueueT::reset);
        self.queue_msix_vectors.fill(NO_VECTOR);
    }
}

/// The common configuration as migrated.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommonConfigState {
    pub device_features: u64,
    pub driver_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub status: u8,
    pub config_generation: u8,
    pub config_msix_vector: u16,
    pub queue_select: u16,
    pub queues: Vec<super::QueueState>,
    pub queue_msix_vectors: Vec<u16>,
}

impl CommonConfig {
    pub fn state(&self) -> CommonConfigState {
        CommonConfigState {
            device_features: self.device_features,
            driver_features: self.driver_features,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            status: self.status,
            config_generation: self.config_generation,
            config_msix_vector: self.config_msix_vector,
            queue_select: self.queue_select,
            queues: self.queues.iter().map(super::QueueState::of).collect(),
            queue_msix_vectors: self.queue_msix_vectors.clone(),
        }
    }

    /// Takes a migrated state. It must come from the same device (same features offered,
    /// same queues); nothing changes if it does not fit.
    pub fn restore(&mut self, s: &CommonConfigState) -> Result<(), String> {
        if s.device_features != self.device_features {
            return Err(format!(
                "the source device offered features {:#x}, this one offers {:#x}",
                s.device_features, self.device_features
            ));
        }
        if s.queues.len() != self.queues.len() || s.queue_msix_vectors.len() != self.queues.len() {
            return Err(format!(
                "the source device had {} queues, this one has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        // A queue larger than this device offers would outgrow what it was built for.
        for (i, (theirs, mine)) in s.queues.iter().zip(&self.queues).enumerate() {
            if theirs.max_size != mine.max_size() {
                return Err(format!(
                    "queue {i}: the source offered {} entries at most, this device {}",
                    theirs.max_size,
                    mine.max_size()
                ));
            }
        }
        let queues = s
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.to_queue().map_err(|e| format!("queue {i}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        self.driver_features = s.driver_features;
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.status = s.status;
        self.config_generation = s.config_generation;
        self.config_msix_vector = s.config_msix_vector;
        self.queue_select = s.queue_select;
        self.queues = queues;
        self.queue_msix_vectors = s.queue_msix_vectors.clone();
        Ok(())
    }

    pub fn queue_msix_vectors(&self) -> &[u16] {
        &self.queue_msix_vectors
    }
}

/// The 32-bit half of `features` that `select` picks (0 = low, 1 = high, else none).
fn half(features: u64, select: u32) -> u64 {
    match select {
        0 => features & 0xffff_ffff,
        1 => features >> 32,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

    const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;

    fn w(c: &mut CommonConfig, offset: u64, v: u64, len: usize) -> StatusChange {
        c.write(offset, &v.to_le_bytes()[..len])
    }

    fn r(c: &CommonConfig, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        c.read(offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// The driver's side of the handshake up to FEATURES_OK, with `features`.
    fn negotiate(c: &mut CommonConfig, features: u64) -> u8 {
        w(c, DEVICE_STATUS, u64::from(ACKNOWLEDGE), 1);
        w(c, DEVICE_STATUS, u64::from(ACKNOWLEDGE | DRIVER), 1);
        for sel in 0..2 {
            w(c, DRIVER_FEATURE_SELECT, sel, 4);
            w(c, DRIVER_FEATURE, half(features, sel as u32), 4);
        }
        w(
            c,
            DEVICE_STATUS,
            u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK),
            1,
        );
        r(c, DEVICE_STATUS, 1) as u8
    }

    #[test]
    fn the_device_offers_its_features_in_two_halves() {
        let c = &mut CommonConfig::new(FEATURES, &[256, 128]).unwrap();
        assert_eq!(r(c, DEVICE_FEATURE, 4), 1 << VIRTIO_RING_F_EVENT_IDX);
        w(c, DEVICE_FEATURE_SELECT, 1, 4);
        assert_eq!(r(c, DEVICE_FEATURE, 4), 1, "VERSION_1 is bit 32");
        w(c, DEVICE_FEATURE_SELECT, 2, 4);
        assert_eq!(r(c, DEVICE_FEATURE, 4), 0);
        assert_eq!(r(c, NUM_QUEUES, 2), 2);
        assert_eq!(
            CommonConfig::new(1 << VIRTIO_RING_F_EVENT_IDX, &[8]).unwrap_err(),
            CommonConfigError::NoVersion1(1 << VIRTIO_RING_F_EVENT_IDX)
        );
        assert!(CommonConfig::new(FEATURES, &[100]).is_err());
    }

    #[test]
    fn features_ok_is_refused_for_unoffered_features_or_without_version_1() {
        let c = &mut CommonConfig::new(FEATURES, &[8]).unwrap();
        assert_eq!(
            negotiate(c, FEATURES | 1 << 3),
            ACKNOWLEDGE | DRIVER,
            "bit 3 not offered"
        );
        w(c, DEVICE_STATUS, 0, 1);
        assert_eq!(
            negotiate(c, 1 << VIRTIO_RING_F_EVENT_IDX),
            ACKNOWLEDGE | DRIVER
        );
        w(c, DEVICE_STATUS, 0, 1);
        assert_eq!(negotiate(c, FEATURES), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(c.driver_features(), FEATURES);
        // Features are fixed from here on.
        w(c, DRIVER_FEATURE_SELECT, 0, 4);
        w(c, DRIVER_FEATURE, 0, 4);
        assert_eq!(c.driver_features(), FEATURES);
    }

    #[test]
    fn queues_are_set_up_then_activated_by_driver_ok() {
        let c = &mut CommonConfig::new(FEATURES, &[256, 64]).unwrap();
        negotiate(c, FEATURES);
        w(c, QUEUE_SELECT, 1, 2);
        assert_eq!(r(c, QUEUE_SIZE, 2), 64);
        assert_eq!(r(c, QUEUE_NOTIFY_OFF, 2), 1);
        w(c, QUEUE_SIZE, 100, 2);
        assert_eq!(r(c, QUEUE_SIZE, 2), 64, "not a power of two: refused");
        w(c, QUEUE_SIZE, 32, 2);
        w(c, QUEUE_DESC_LO, 0x1000, 4);
        w(c, QUEUE_DESC_HI, 0x1, 4);
        w(c, QUEUE_DRIVER_LO, 0x2000, 4);
        w(c, QUEUE_DEVICE_LO, 0x3000, 4);
        w(c, QUEUE_DEVICE_LO, 0x3001, 4);
        w(c, QUEUE_MSIX_VECTOR, 3, 2);
        w(c, QUEUE_ENABLE, 1, 2);
        let q = &c.queues()[1];
        assert_eq!(
            (q.size(), q.desc_table(), q.avail_ring()),
            (32, 0x1_0000_1000, 0x2000)
        );
        assert_eq!(q.used_ring(), 0x3000, "a misaligned used ring is refused");
        assert!(q.ready());
        assert_eq!(c.queue_msix_vector(1), Some(3));
        assert_eq!(
            w(
                c,
                DEVICE_STATUS,
                u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
                1
            ),
            StatusChange::Activate
        );
        // Setup is closed now.
        w(c, QUEUE_SIZE, 8, 2);
        assert_eq!(c.queues()[1].size(), 32);
        // A queue that does not exist reads size 0 and takes nothing.
        w(c, QUEUE_SELECT, 7, 2);
        assert_eq!(r(c, QUEUE_SIZE, 2), 0);
        assert_eq!(r(c, QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    }

    /// Found while fuzzing `device_state`: a migrated queue offering more entries than
    /// this device does is refused, and nothing changes.
    #[test]
    fn a_migrated_queue_larger_than_offered_is_refused() {
        let c = &mut CommonConfig::new(FEATURES, &[256, 64]).unwrap();
        negotiate(c, FEATURES);
        let mut s = c.state();
        s.queues[1].max_size = 32768;
        s.queues[1].size = 32768;
        let before = c.state();
        let e = c.restore(&s).unwrap_err();
        assert!(
            e.contains("queue 1") && e.contains("32768") && e.contains("64"),
            "{e}"
        );
        assert_eq!(c.state(), before);
        assert_eq!(c.restore(&before), Ok(()));
    }

    #[test]
    fn driver_ok_without_features_ok_and_cleared_bits_are_refused() {
        let c = &mut CommonConfig::new(FEATURES, &[8]).unwrap();
        w(c, DEVICE_STATUS, u64::from(ACKNOWLEDGE | DRIVER), 1);
        assert_eq!(
            w(
                c,
                DEVICE_STATUS,
                u64::from(ACKNOWLEDGE | DRIVER | DRIVER_OK),
                1
            ),
            StatusChange::None
        );
        assert_eq!(c.status(), ACKNOWLEDGE | DRIVER);
        assert_eq!(
            w(c, DEVICE_STATUS, u64::from(ACKNOWLEDGE), 1),
            StatusChange::None
        );
        assert_eq!(
            c.status(),
            ACKNOWLEDGE | DRIVER,
            "bits go away only by reset"
        );
        assert_eq!(
            w(
                c,
                DEVICE_STATUS,
                u64::from(ACKNOWLEDGE | DRIVER | FAILED),
                1
            ),
            StatusChange::Failed
        );
    }

    #[test]
    fn reset_forgets_the_driver_and_the_queues() {
        let c = &mut CommonConfig::new(FEATURES, &[16]).unwrap();
        negotiate(c, FEATURES);
        w(c, QUEUE_SIZE, 8, 2);
        w(c, QUEUE_ENABLE, 1, 2);
        w(c, CONFIG_MSIX_VECTOR, 0, 2);
        assert_eq!(w(c, DEVICE_STATUS, 0, 1), StatusChange::Reset);
        assert_eq!(c.status(), 0);
        assert_eq!(c.driver_features(), 0);
        assert_eq!(c.config_msix_vector(), NO_VECTOR);
        assert_eq!((c.queues()[0].size(), c.queues()[0].ready()), (16, false));
    }

    #[test]
    fn wrong_widths_and_unknown_offsets_do_nothing() {
        let c = &mut CommonConfig::new(FEATURES, &[16]).unwrap();
        assert_eq!(r(c, DEVICE_FEATURE, 2), 0);
        assert_eq!(r(c, 0x100, 4), 0);
        w(c, DEVICE_STATUS, u64::from(ACKNOWLEDGE), 4);
        assert_eq!(c.status(), 0);
        w(c, QUEUE_SIZE, 8, 1);
        assert_eq!(c.queues()[0].size(), 16);
        assert_eq!(
            c.write(0, &[0; 9]),
            StatusChange::None,
            "longer than any field"
        );
        c.bump_config_generation();
        assert_eq!(r(c, CONFIG_GENERATION, 1), 1);
    }
}

//! MSI-X (PCI 3.0 §6.8.2): the capability in configuration space, the vector table and
//! pending-bit array a BAR exposes, and the masking rules. A device asks for a vector with
//! [`Msix::trigger`]; the answer is the message to send, or that the vector was masked
//! and is now pending (it goes out when the guest unmasks it). Sending is the VMM's job
//! (KVM irq routing and irqfds); this module only decides.

use serde::{Deserialize, Serialize};

/// Capability id of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Most vectors a function may have.
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Version of [`MsixState`].
pub const MSIX_STATE_VERSION: u32 = 1;

const CTL_ENABLE: u16 = 1 << 15;
const CTL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

/// One message as the guest programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// One vector table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub message: MsiMessage,
    /// Vector control: bit 0 masks the vector.
    pub control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        // Vectors come out of reset masked.
        MsixEntry {
            message: MsiMessage::default(),
            control: ENTRY_MASKED,
        }
    }
}

/// What a device's interrupt request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixTrigger {
    /// Send this message now.
    Send(MsiMessage),
    /// The vector or the function is masked: its pending bit is set.
    Pending,
    /// MSI-X is off (or no such vector): nothing to do on this path.
    Off,
}

/// A consequence of a guest write the VMM must carry out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixEffect {
    /// Vector `vector`'s message changed: update its route.
    Route { vector: u16, message: MsiMessage },
    /// A pending vector was unmasked: send it now.
    Send { vector: u16, message: MsiMessage },
}

/// MSI-X as migrated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub version: u32,
    pub entries: Vec<MsixEntry>,
    pub pending: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// A state that does not fit this function's MSI-X.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsixError {
    #[error("MSI-X state version {found} (expected {MSIX_STATE_VERSION})")]
    Version { found: u32 },
    #[error("MSI-X state has {found} vectors, this function has {expected}")]
    Vectors { found: usize, expected: usize },
    #[error("{0} MSI-X vectors is not between 1 and {MSIX_MAX_VECTORS}")]
    BadCount(u16),
}

/// A function's MSI-X.
#[derive(Clone, Debug)]
pub struct Msix {
    entries: Vec<MsixEntry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
}

impl Msix {
    pub fn new(vectors: u16) -> Result<Self, MsixError> {
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return Err(MsixError::BadCount(vectors));
        }
        Ok(Msix {
            entries: vec![MsixEntry::default(); usize::from(vectors)],
            pending: vec![0; usize::from(vectors).div_ceil(64)],
            enabled: false,
            function_masked: false,
        })
    }

    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Bytes of BAR space the table needs.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// Bytes of BAR space the pending-bit array needs (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// The capability body after its id and next pointer (message control, table offset
    /// and BIR, PBA offset and BIR) and the guest's write mask for it: only enable and
    /// function mask are writable.
    pub fn capability(
        &self,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> ([u8; 10], [u8; 10]) {
        let ctl = self.vectors() - 1;
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&ctl.to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(table_bar & 7)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(pba_bar & 7)).to_le_bytes());
        let mut mask = [0u8; 10];
        mask[1] = ((CTL_ENABLE | CTL_FUNCTION_MASK) >> 8) as u8;
        (body, mask)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The guest wrote message control (after the config space masked it).
    pub fn control_written(&mut self, ctl: u16) -> Vec<MsixEffect> {
        self.enabled = ctl & CTL_ENABLE != 0;
        self.function_masked = ctl & CTL_FUNCTION_MASK != 0;
        self.send_unmasked_pending()
    }

    fn masked(&self, v: usize) -> bool {
        self.function_masked || self.entries[v].control & ENTRY_MASKED != 0
    }

    fn is_pending(&self, v: usize) -> bool {
        self.pending[v / 64] & 1 << (v % 64) != 0
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        if on {
            self.pending[v / 64] |= 1 << (v % 64);
        } else {
            self.pending[v / 64] &= !(1 << (v % 64));
        }
    }

    fn send_unmasked_pending(&mut self) -> Vec<MsixEffect> {
        if !self.enabled {
            return vec![];
        }
        let mut out = vec![];
        for v in 0..self.entries.len() {
            if self.is_pending(v) && !self.masked(v) {
                self.set_pending(v, false);
                out.push(MsixEffect::Send {
                    vector: v as u16,
                    message: self.entries[v].message,
                });
            }
        }
        out
    }

    /// The device asks for vector `vector`.
    pub fn trigger(&mut self, vector: u16) -> MsixTrigger {
        let v = usize::from(vector);
        if !self.enabled || v >= self.entries.len() {
            return MsixTrigger::Off;
        }
        if self.masked(v) {
            self.set_pending(v, true);
            return MsixTrigger::Pending;
        }
        MsixTrigger::Send(self.entries[v].message)
    }

    /// A guest read of the table at `offset` (dword or qword, aligned; anything else
    /// reads all ones).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some((v, field)) = self.table_field(offset, data.len()) else {
            return;
        };
        let e = &self.entries[v];
        let words = [
            e.message.address as u32,
            (e.message.address >> 32) as u32,
            e.message.data,
            e.control,
        ];
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            chunk.copy_from_slice(&words[field + i].to_le_bytes());
        }
    }

    /// A guest write to the table; returns what the VMM must do about it.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Vec<MsixEffect> {
        let Some((v, field)) = self.table_field(offset, data.len()) else {
            return vec![];
        };
        let before = self.entries[v];
        for (i, chunk) in data.chunks(4).enumerate() {
            let w = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
            let e = &mut self.entries[v];
            match field + i {
                0 => e.message.address = (e.message.address & !0xffff_ffff) | u64::from(w),
                1 => e.message.address = (e.message.address & 0xffff_ffff) | u64::from(w) << 32,
                2 => e.message.data = w,
                // Only the mask bit of vector control is defined.
                _ => e.control = w & ENTRY_MASKED,
            }
        }
        let mut out = vec![];
        let after = self.entries[v];
        if after.message != before.message {
            out.push(MsixEffect::Route {
                vector: v as u16,
                message: after.message,
            });
        }
        out.extend(self.send_unmasked_pending());
        out
    }

    /// Entry and first dword of an aligned dword or qword access inside the table.
    fn table_field(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        if !matches!(len, 4 | 8)
            || !offset.is_multiple_of(len as u64)
            || offset + len as u64 > self.table_size()
        {
            return None;
        }
        Some((
            (offset / MSIX_ENTRY_SIZE) as usize,
            ((offset % MSIX_ENTRY_SIZE) / 4) as usize,
        ))
    }

    /// A guest read of the pending-bit array (read-only; writes are ignored).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset as usize + i;
            *b = self
                .pending
                .get(at / 8)
                .map_or(0, |q| (q >> (8 * (at % 8))) as u8);
        }
    }

    pub fn state(&self) -> MsixState {
        MsixState {
            version: MSIX_STATE_VERSION,
            entries: self.entries.clone(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Takes a migrated function's MSI-X; returns the routes the VMM must set up.
    pub fn restore(&mut self, s: &MsixState) -> Result<Vec<MsixEffect>, MsixError> {
        if s.version != MSIX_STATE_VERSION {
            return Err(MsixError::Version { found: s.version });
        }
        if s.entries.len() != self.entries.len() || s.pending.len() != self.pending.len() {
            return Err(MsixError::Vectors {
                found: s.entries.len(),
                expected: self.entries.len(),
            });
        }
        self.entries.clone_from(&s.entries);
        self.pending.clone_from(&s.pending);
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        Ok(self
            .entries
            .iter()
            .enumerate()
            .map(|(v, e)| MsixEffect::Route {
                vector: v as u16,
                message: e.message,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(m: &mut Msix, v: u64, address: u64, data: u32) -> Vec<MsixEffect> {
        let at = v * MSIX_ENTRY_SIZE;
        let mut fx = m.write_table(at, &address.to_le_bytes());
        fx.extend(m.write_table(at + 8, &data.to_le_bytes()));
        fx
    }

    fn unmask(m: &mut Msix, v: u64) -> Vec<MsixEffect> {
        m.write_table(v * MSIX_ENTRY_SIZE + 12, &0u32.to_le_bytes())
    }

    #[test]
    fn capability_announces_size_and_locations_and_only_enable_and_mask_are_writable() {
        let m = Msix::new(3).unwrap();
        let (body, mask) = m.capability(2, 0x1000, 2, 0x1800);
        assert_eq!(
            u16::from_le_bytes([body[0], body[1]]),
            2,
            "table size is N-1"
        );
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x1002);
        assert_eq!(u32::from_le_bytes(body[6..10].try_into().unwrap()), 0x1802);
        assert_eq!(mask, [0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!((m.table_size(), m.pba_size()), (48, 8));
        assert_eq!(Msix::new(0).unwrap_err(), MsixError::BadCount(0));
        assert!(Msix::new(2049).is_err());
    }

    #[test]
    fn vectors_start_masked_and_pend_until_unmasked() {
        let mut m = Msix::new(2).unwrap();
        assert_eq!(m.trigger(0), MsixTrigger::Off, "MSI-X disabled");
        assert!(m.control_written(CTL_ENABLE).is_empty());
        let fx = program(&mut m, 1, 0xfee0_0000, 0x4041);
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x4041,
        };
        assert!(fx.contains(&MsixEffect::Route {
            vector: 1,
            message: msg
        }));
        assert_eq!(m.trigger(1), MsixTrigger::Pending, "masked out of reset");
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        assert_eq!(
            unmask(&mut m, 1),
            vec![MsixEffect::Send {
                vector: 1,
                message: msg
            }]
        );
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        assert_eq!(m.trigger(1), MsixTrigger::Send(msg));
        assert_eq!(m.trigger(7), MsixTrigger::Off, "no such vector");
    }

    #[test]
    fn the_function_mask_holds_every_vector_and_releases_them_together() {
        let mut m = Msix::new(2).unwrap();
        m.control_written(CTL_ENABLE);
        for v in 0..2 {
            program(&mut m, v, 0xfee0_0000, 0x30 + v as u32);
            unmask(&mut m, v);
        }
        m.control_written(CTL_ENABLE | CTL_FUNCTION_MASK);
        assert_eq!(m.trigger(0), MsixTrigger::Pending);
        assert_eq!(m.trigger(1), MsixTrigger::Pending);
        let sent = m.control_written(CTL_ENABLE);
        assert_eq!(sent.len(), 2);
        assert!(matches!(sent[1], MsixEffect::Send { vector: 1, message } if message.data == 0x31));
    }

    #[test]
    fn table_accesses_must_be_aligned_dwords_or_qwords_inside_the_table() {
        let mut m = Msix::new(1).unwrap();
        program(&mut m, 0, 0x1_fee0_1000, 0x99);
        let mut q = [0u8; 8];
        m.read_table(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_1000);
        let mut d = [0u8; 4];
        m.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "masked");
        m.read_table(2, &mut d);
        assert_eq!(d, [0xff; 4], "unaligned");
        m.read_table(16, &mut d);
        assert_eq!(d, [0xff; 4], "past the table");
        let mut b = [0u8; 2];
        m.read_table(8, &mut b);
        assert_eq!(b, [0xff; 2], "a word access");
        assert!(m.write_table(6, &[1, 2, 3, 4]).is_empty());
        assert!(m.write_table(12, &0xffff_fffeu32.to_le_bytes()).is_empty());
        m.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0, "only the mask bit is kept");
    }

    #[test]
    fn state_round_trips_and_gives_every_route_back() {
        let mut m = Msix::new(3).unwrap();
        m.control_written(CTL_ENABLE);
        program(&mut m, 2, 0xfee0_0000, 0x55);
        m.trigger(2);
        let s: MsixState =
            serde_json::from_str(&serde_json::to_string(&m.state()).unwrap()).unwrap();
        let mut d = Msix::new(3).unwrap();
        let routes = d.restore(&s).unwrap();
        assert_eq!(routes.len(), 3);
        assert!(d.enabled());
        assert_eq!(
            unmask(&mut d, 2),
            vec![MsixEffect::Send {
                vector: 2,
                message: MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x55
                }
            }],
            "the pending bit came along"
        );
        assert_eq!(
            Msix::new(4).unwrap().restore(&s),
            Err(MsixError::Vectors {
                found: 3,
                expected: 4
            })
        );
    }
}

//! One PCI function's configuration space: the 256-byte type 0 header with its
//! capability list, what the guest may write in it, and how BARs answer sizing (a BAR
//! written with all ones reads back the size mask, because its low address bits are not
//! writable).

use serde::{Deserialize, Serialize};

/// Bytes of configuration space a function has (ECAM reads past it get zeros: no
/// extended capabilities).
pub const CONFIG_SIZE: usize = 256;
/// Version of [`PciConfigState`]; a restore of another version is refused.
pub const CONFIG_STATE_VERSION: u32 = 1;

const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION: usize = 0x08;
const CLASS_CODE: usize = 0x09;
const CACHE_LINE_SIZE: usize = 0x0c;
const LATENCY_TIMER: usize = 0x0d;
const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
const SUBSYSTEM_ID: usize = 0x2e;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const INTERRUPT_PIN: usize = 0x3d;
/// Capabilities go after the header.
const FIRST_CAPABILITY: usize = 0x40;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;

const BAR_IO: u32 = 1 << 0;
const BAR_MEM64: u32 = 0b10 << 1;
const BAR_PREFETCHABLE: u32 = 1 << 3;

/// Number of BAR slots in a type 0 header.
pub const BAR_SLOTS: usize = 6;

/// What kind of address space a BAR claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    Io,
    Memory32,
    /// Takes its slot and the next one.
    Memory64 {
        prefetchable: bool,
    },
}

/// A BAR as the device declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub index: usize,
    pub kind: BarKind,
    pub size: u64,
    /// Where the guest (or the VMM, as firmware would) placed it.
    pub address: u64,
}

/// The identity a function shows in its header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    /// Base class, subclass and programming interface, as bits 23..0.
    pub class: u32,
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
    /// 0 for none, 1..=4 for INTA#..INTD#.
    pub interrupt_pin: u8,
}

/// Mistakes in a device's declaration of its configuration space (VMM bugs, not guest
/// input: the guest can only write registers).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciConfigError {
    #[error("BAR {index} does not exist (a function has BARs 0 to 5)")]
    NoSuchBar { index: usize },
    #[error("BAR {index} is already in use")]
    BarTaken { index: usize },
    #[error("BAR {index} size {size:#x} is not a power of two of at least {min} bytes")]
    BadBarSize { index: usize, size: u64, min: u64 },
    #[error("BAR {index} is 64-bit and needs slot {next} too, which does not exist", next = index + 1)]
    NoSlotForUpperHalf { index: usize },
    #[error("BAR {index} of kind {kind:?} cannot hold size {size:#x}")]
    BarTooLarge {
        index: usize,
        kind: BarKind,
        size: u64,
    },
    #[error("address {address:#x} is not aligned to BAR {index}'s size {size:#x}")]
    MisalignedBar {
        index: usize,
        address: u64,
        size: u64,
    },
    #[error("BAR {index} is a 32-bit BAR and cannot be placed at {address:#x}")]
    AddressOutOfReach { index: usize, address: u64 },
    #[error("capability {id:#x} of {len} bytes does not fit in configuration space")]
    NoRoomForCapability { id: u8, len: usize },
    #[error("capability {id:#x}: {mask} bytes of write mask for {len} bytes of body")]
    MaskLength { id: u8, len: usize, mask: usize },
    #[error("saved configuration space has version {found} and {len} bytes (expected version {CONFIG_STATE_VERSION} and {CONFIG_SIZE} bytes)")]
    BadState { found: u32, len: usize },
}

/// Configuration space as migrated: plain bytes, versioned. The write masks and BAR
/// layout are the device's own and are rebuilt by the destination's device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigState {
    pub version: u32,
    pub bytes: Vec<u8>,
}

/// One function's configuration space.
#[derive(Clone, Debug)]
pub struct PciConfig {
    bytes: [u8; CONFIG_SIZE],
    /// Per byte: the bits the guest may change.
    writable: [u8; CONFIG_SIZE],
    bars: [Option<(BarKind, u64)>; BAR_SLOTS],
    /// Offset of the last capability added (0: none yet).
    last_capability: usize,
    /// Where the next capability goes.
    next_free: usize,
}

impl PciConfig {
    pub fn new(ids: PciIds) -> Self {
        let mut c = PciConfig {
            bytes: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            bars: [None; BAR_SLOTS],
            last_capability: 0,
            next_free: FIRST_CAPABILITY,
        };
        c.put16(VENDOR_ID, ids.vendor);
        c.put16(DEVICE_ID, ids.device);
        c.bytes[REVISION] = ids.revision;
        c.bytes[CLASS_CODE..CLASS_CODE + 3].copy_from_slice(&ids.class.to_le_bytes()[..3]);
        c.put16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        c.put16(SUBSYSTEM_ID, ids.subsystem);
        c.bytes[INTERRUPT_PIN] = ids.interrupt_pin;
        let command = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&command.to_le_bytes());
        // Written by drivers, meaningless here, kept so they read back.
        c.writable[CACHE_LINE_SIZE] = 0xff;
        c.writable[LATENCY_TIMER] = 0xff;
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    /// Declares BAR `index`. Memory BARs are at least 16 bytes, I/O BARs at least 4 and
    /// at most 256; all are powers of two.
    pub fn add_bar(
        &mut self,
        index: usize,
        kind: BarKind,
        size: u64,
    ) -> Result<(), PciConfigError> {
        if index >= BAR_SLOTS {
            return Err(PciConfigError::NoSuchBar { index });
        }
        let upper = matches!(kind, BarKind::Memory64 { .. }).then_some(index + 1);
        if upper == Some(BAR_SLOTS) {
            return Err(PciConfigError::NoSlotForUpperHalf { index });
        }
        for i in std::iter::once(index).chain(upper) {
            if self.bars[i].is_some() || self.is_upper_half(i) {
                return Err(PciConfigError::BarTaken { index: i });
            }
        }
        let min = if kind == BarKind::Io { 4 } else { 16 };
        if size < min || !size.is_power_of_two() {
            return Err(PciConfigError::BadBarSize { index, size, min });
        }
        let max = match kind {
            BarKind::Io => 256,
            BarKind::Memory32 => 1 << 31,
            BarKind::Memory64 { .. } => 1 << 63,
        };
        if size > max {
            return Err(PciConfigError::BarTooLarge { index, kind, size });
        }
        let flags = match kind {
            BarKind::Io => BAR_IO,
            BarKind::Memory32 => 0,
            BarKind::Memory64 { prefetchable } => {
                BAR_MEM64 | if prefetchable { BAR_PREFETCHABLE } else { 0 }
            }
        };
        let mask = !(size - 1);
        let at = BAR0 + 4 * index;
        self.put32(at, flags);
        self.writable[at..at + 4].copy_from_slice(&((mask as u32) & !0xf).to_le_bytes());
        if kind == BarKind::Io {
            // I/O BARs keep only bit 0 as a flag.
            self.writable[at] = (mask as u8) & !0x3;
        }
        if let Some(u) = upper {
            let at = BAR0 + 4 * u;
            self.writable[at..at + 4].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        self.bars[index] = Some((kind, size));
        Ok(())
    }

    fn is_upper_half(&self, i: usize) -> bool {
        i > 0 && matches!(self.bars[i - 1], Some((BarKind::Memory64 { .. }, _)))
    }

    /// Places BAR `index` at `address`, as firmware does before the guest runs.
    pub fn set_bar_address(&mut self, index: usize, address: u64) -> Result<(), PciConfigError> {
        let (kind, size) = self
            .bars
            .get(index)
            .copied()
            .flatten()
            .ok_or(PciConfigError::NoSuchBar { index })?;
        if !address.is_multiple_of(size) {
            return Err(PciConfigError::MisalignedBar {
                index,
                address,
                size,
            });
        }
        match kind {
            BarKind::Memory64 { .. } => self.put32(BAR0 + 4 * (index + 1), (address >> 32) as u32),
            _ if address >> 32 != 0 => {
                return Err(PciConfigError::AddressOutOfReach { index, address })
            }
            _ => {}
        }
        let at = BAR0 + 4 * index;
        let flags = self.get32(at) & if kind == BarKind::Io { 0x3 } else { 0xf };
        self.put32(
            at,
            (address as u32 & !(size as u32).wrapping_sub(1)) | flags,
        );
        Ok(())
    }

    /// Every declared BAR with the address it holds now.
    pub fn bars(&self) -> impl Iterator<Item = Bar> + '_ {
        self.bars.iter().enumerate().filter_map(|(index, b)| {
            let (kind, size) = (*b)?;
            let low = u64::from(self.get32(BAR0 + 4 * index));
            let address = match kind {
                BarKind::Io => low & !0x3,
                BarKind::Memory32 => low & !0xf,
                BarKind::Memory64 { .. } => {
                    (u64::from(self.get32(BAR0 + 4 * (index + 1))) << 32) | (low & !0xf)
                }
            };
            Some(Bar {
                index,
                kind,
                size,
                address,
            })
        })
    }

    /// Appends a capability: `id`, the next pointer (filled in here), then `body`, with
    /// `writable` the guest's write mask for the body. Returns its offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, PciConfigError> {
        if writable.len() != body.len() {
            return Err(PciConfigError::MaskLength {
                id,
                len: body.len(),
                mask: writable.len(),
            });
        }
        let at = self.next_free;
        let end = at + 2 + body.len();
        if end > CONFIG_SIZE {
            return Err(PciConfigError::NoRoomForCapability {
                id,
                len: body.len() + 2,
            });
        }
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.bytes[at + 2..end].copy_from_slice(body);
        self.writable[at + 2..end].copy_from_slice(writable);
        if self.last_capability == 0 {
            self.bytes[CAPABILITIES_POINTER] = at as u8;
            let status = self.get16(STATUS) | STATUS_CAPABILITIES_LIST;
            self.put16(STATUS, status);
        } else {
            self.bytes[self.last_capability + 1] = at as u8;
        }
        self.last_capability = at;
        self.next_free = end.next_multiple_of(4);
        Ok(at)
    }

    /// Reads `data.len()` bytes at `offset`; past the end reads zeros.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// A guest write: only the writable bits of each byte change; past the end nothing.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let Some(old) = self.bytes.get(offset + i).copied() else {
                return;
            };
            let mask = self.writable[offset + i];
            self.bytes[offset + i] = (old & !mask) | (v & mask);
        }
    }

    /// Bytes of config space, for devices that keep state in their capabilities.
    pub fn bytes(&self) -> &[u8; CONFIG_SIZE] {
        &self.bytes
    }

    /// The device's own update of a register (not masked: status bits, capability
    /// fields the device owns).
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
    }

    pub fn command(&self) -> u16 {
        self.get16(COMMAND)
    }

    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    pub fn io_enabled(&self) -> bool {
        self.command() & COMMAND_IO != 0
    }

    /// The function may master the bus (DMA); a device must not touch guest memory
    /// without it.
    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    pub fn state(&self) -> PciConfigState {
        PciConfigState {
            version: CONFIG_STATE_VERSION,
            bytes: self.bytes.to_vec(),
        }
    }

    /// Takes the bytes of a migrated function whose device declared the same layout.
    pub fn restore(&mut self, s: &PciConfigState) -> Result<(), PciConfigError> {
        if s.version != CONFIG_STATE_VERSION || s.bytes.len() != CONFIG_SIZE {
            return Err(PciConfigError::BadState {
                found: s.version,
                len: s.bytes.len(),
            });
        }
        self.bytes.copy_from_slice(&s.bytes);
        Ok(())
    }

    fn get16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    fn get32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().expect("4 bytes"))
    }

    fn put16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
}

/// Why a BAR of a device served elsewhere (vfio-user, VFIO) cannot be declared.
#[derive(Debug)]
pub enum DeviceBarError<E> {
    /// Asking the device for the BAR's size failed.
    Size(E),
    /// BAR `index` of `size` bytes cannot be taken.
    Bar {
        index: usize,
        size: u64,
        reason: String,
    },
}

/// Declares the memory BARs of a device served elsewhere in `config`: each BAR's kind from
/// the flags in the device's own header (`header`, at least the first 0x28 bytes), its
/// size from `size_of(index)` (0: no BAR). I/O BARs are refused. Returns (index, size) of
/// the BARs declared, in order.
pub fn declare_device_bars<E>(
    config: &mut PciConfig,
    header: &[u8],
    mut size_of: impl FnMut(usize) -> Result<u64, E>,
) -> Result<Vec<(usize, u64)>, DeviceBarError<E>> {
    let mut bars = Vec::new();
    let mut index = 0;
    while index < BAR_SLOTS {
        let size = size_of(index).map_err(DeviceBarError::Size)?;
        let at = BAR0 + 4 * index;
        let flags = header
            .get(at..at + 4)
            .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        let kind = if flags & BAR_IO != 0 {
            BarKind::Io
        } else if flags & 0x6 == BAR_MEM64 {
            BarKind::Memory64 {
                prefetchable: flags & BAR_PREFETCHABLE != 0,
            }
        } else {
            BarKind::Memory32
        };
        if size != 0 {
            let bad = |reason: String| DeviceBarError::Bar {
                index,
                size,
                reason,
            };
            if kind == BarKind::Io {
                return Err(bad("I/O BARs are not supported".into()));
            }
            config
                .add_bar(index, kind, size)
                .map_err(|e| bad(e.to_string()))?;
            bars.push((index, size));
        }
        index += if matches!(kind, BarKind::Memory64 { .. }) {
            2
        } else {
            1
        };
    }
    Ok(bars)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> PciConfig {
        PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            class: 0x01_80_00,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
            interrupt_pin: 1,
        })
    }

    fn r32(c: &PciConfig, at: usize) -> u32 {
        let mut b = [0; 4];
        c.read(at, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(c: &mut PciConfig, at: usize, v: u32) {
        c.write(at, &v.to_le_bytes());
    }

    #[test]
    fn header_shows_the_ids_and_ignores_writes_to_them() {
        let mut c = dev();
        assert_eq!(r32(&c, 0), 0x1042_1af4);
        assert_eq!(r32(&c, 8), 0x0180_0001);
        assert_eq!(r32(&c, 0x2c), 0x0040_1af4);
        w32(&mut c, 0, 0xdead_beef);
        w32(&mut c, 8, 0xdead_beef);
        assert_eq!(r32(&c, 0), 0x1042_1af4);
        assert_eq!(r32(&c, 8), 0x0180_0001);
        assert_eq!(c.bytes()[INTERRUPT_PIN], 1);
        c.write(INTERRUPT_LINE, &[11]);
        assert_eq!(c.bytes()[INTERRUPT_LINE], 11);
        c.write(INTERRUPT_PIN, &[3]);
        assert_eq!(c.bytes()[INTERRUPT_PIN], 1, "the pin is read-only");
    }

    #[test]
    fn command_takes_only_its_defined_bits() {
        let mut c = dev();
        c.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(
            c.command(),
            COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE
        );
        assert!(c.bus_master() && c.memory_enabled() && c.io_enabled());
        c.write(COMMAND, &[0]);
        assert!(!c.bus_master() && !c.memory_enabled());
    }

    #[test]
    fn bars_answer_sizing_and_keep_their_flags() {
        let mut c = dev();
        c.add_bar(0, BarKind::Memory32, 0x4000).unwrap();
        c.add_bar(1, BarKind::Io, 0x20).unwrap();
        c.add_bar(2, BarKind::Memory64 { prefetchable: true }, 1 << 33)
            .unwrap();
        // Sizing: write all ones, read the mask back.
        for i in 0..6 {
            w32(&mut c, BAR0 + 4 * i, !0);
        }
        assert_eq!(r32(&c, 0x10), 0xffff_c000);
        assert_eq!(r32(&c, 0x14), 0xffff_ffe1);
        assert_eq!(
            r32(&c, 0x18),
            0x0000_000c,
            "64-bit, prefetchable, low bits of an 8 GiB BAR"
        );
        assert_eq!(r32(&c, 0x1c), 0xffff_fffe);
        assert_eq!(r32(&c, 0x20), 0, "unused BAR reads zero");
        // Placement.
        w32(&mut c, 0x10, 0xfe00_0000);
        w32(&mut c, 0x14, 0xc040);
        w32(&mut c, 0x18, 0);
        w32(&mut c, 0x1c, 0x4);
        let bars: Vec<_> = c.bars().collect();
        assert_eq!(bars.len(), 3);
        assert_eq!((bars[0].address, bars[0].size), (0xfe00_0000, 0x4000));
        assert_eq!(bars[1].address, 0xc040);
        assert_eq!((bars[2].address, bars[2].index), (0x4_0000_0000, 2));
        c.set_bar_address(0, 0xfebf_c000).unwrap();
        assert_eq!(r32(&c, 0x10), 0xfebf_c000);
        c.set_bar_address(2, 0x8_0000_0000).unwrap();
        assert_eq!(c.bars().nth(2).unwrap().address, 0x8_0000_0000);
    }

    #[test]
    fn bad_bar_declarations_say_what_is_wrong() {
        let mut c = dev();
        assert_eq!(
            c.add_bar(6, BarKind::Memory32, 16),
            Err(PciConfigError::NoSuchBar { index: 6 })
        );
        assert_eq!(
            c.add_bar(
                5,
                BarKind::Memory64 {
                    prefetchable: false
                },
                16
            ),
            Err(PciConfigError::NoSlotForUpperHalf { index: 5 })
        );
        let e = c.add_bar(0, BarKind::Memory32, 0x3000).unwrap_err();
        assert!(e.to_string().contains("0x3000"), "{e}");
        assert!(c.add_bar(0, BarKind::Io, 512).is_err());
        c.add_bar(
            0,
            BarKind::Memory64 {
                prefetchable: false,
            },
            0x1000,
        )
        .unwrap();
        assert_eq!(
            c.add_bar(1, BarKind::Memory32, 16),
            Err(PciConfigError::BarTaken { index: 1 })
        );
        assert_eq!(
            c.set_bar_address(0, 0x1800),
            Err(PciConfigError::MisalignedBar {
                index: 0,
                address: 0x1800,
                size: 0x1000
            })
        );
    }

    #[test]
    fn capabilities_chain_in_order_with_their_own_write_masks() {
        let mut c = dev();
        let a = c
            .add_capability(
                0x11,
                &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
                &[0xff, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0],
            )
            .unwrap();
        let b = c.add_capability(0x09, &[0; 14], &[0; 14]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x4c, "aligned to 4 after the first");
        assert_eq!(c.bytes()[CAPABILITIES_POINTER], 0x40);
        assert_ne!(c.get16(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        assert_eq!(c.bytes()[0x41], 0x4c);
        assert_eq!(c.bytes()[0x4d], 0, "the list ends");
        c.write(0x42, &[0xaa, 0xff, 0xff]);
        assert_eq!(&c.bytes()[0x42..0x45], &[0xaa, 0xc2, 3]);
        assert!(matches!(
            c.add_capability(0x10, &[0; 200], &[0; 200]),
            Err(PciConfigError::NoRoomForCapability { id: 0x10, .. })
        ));
    }

    #[test]
    fn reads_and_writes_past_the_end_are_harmless() {
        let mut c = dev();
        let mut b = [0xee; 8];
        c.read(252, &mut b);
        assert_eq!(&b[4..], &[0, 0, 0, 0]);
        c.write(254, &[1, 2, 3, 4]);
        c.write(4096, &[1]);
    }

    #[test]
    fn state_round_trips_and_refuses_another_version() {
        let mut c = dev();
        c.add_bar(0, BarKind::Memory32, 0x1000).unwrap();
        c.set_bar_address(0, 0xfe00_0000).unwrap();
        c.write(COMMAND, &[COMMAND_MEMORY as u8]);
        let s = c.state();
        let json = serde_json::to_string(&s).unwrap();
        let mut d = dev();
        d.add_bar(0, BarKind::Memory32, 0x1000).unwrap();
        d.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(d.bars().next().unwrap().address, 0xfe00_0000);
        assert!(d.memory_enabled());
        let e = d
            .restore(&PciConfigState {
                version: 2,
                bytes: vec![0; 256],
            })
            .unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
    }
}

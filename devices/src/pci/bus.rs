//! PCI bus 0 with its host bridge, reached two ways: configuration mechanism #1 (an
//! address latched at port 0xCF8, data at 0xCFC..0xCFF) and ECAM (one 4 KiB window per
//! function in an MMIO region the MCFG table announces). Only bus 0, function 0 of each
//! device exists; everything else reads as absent (all ones) and ignores writes.

use std::sync::{Arc, Mutex};

use super::config::{BarKind, PciConfig, PciIds};
use crate::{MmioDevice, PioDevice, PlatformEvent};

/// Devices per bus.
pub const SLOTS: usize = 32;
/// First port of configuration mechanism #1 (address at +0, data at +4..+8).
pub const CONFIG_IO_PORT: u16 = 0xcf8;
pub const CONFIG_IO_LEN: u16 = 8;
/// ECAM bytes for bus 0: 32 devices x 8 functions x 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
const ECAM_FUNCTION_SIZE: u64 = 1 << 12;

/// A device on the bus: its configuration space and its BARs. Config accesses reach the
/// space through the default methods; a device overrides them to act on a write (MSI-X
/// enable, say).
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfig;
    fn config_mut(&mut self) -> &mut PciConfig;

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data);
    }

    /// A guest read of `data.len()` bytes at `offset` into BAR `bar`.
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    /// A guest write into BAR `bar`.
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// The host bridge at 00.0: a PCI function with no BARs that tells the guest a PCI bus
/// is here.
pub struct PciHostBridge {
    config: PciConfig,
}

impl Default for PciHostBridge {
    fn default() -> Self {
        PciHostBridge {
            config: PciConfig::new(PciIds {
                // Red Hat's id for a generic PCIe host bridge, which guests know.
                vendor: 0x1b36,
                device: 0x0008,
                class: 0x06_00_00,
                ..PciIds::default()
            }),
        }
    }
}

impl PciDevice for PciHostBridge {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
}

/// Bus, device, function and register offset of one configuration access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigAddress {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
    pub offset: usize,
}

impl ConfigAddress {
    /// Decodes the value latched at 0xCF8 plus the byte `within` the data port; `None`
    /// when the enable bit is clear (the access is not a configuration cycle).
    pub fn from_cf8(latch: u32, within: u8) -> Option<Self> {
        (latch & 1 << 31 != 0).then(|| ConfigAddress {
            bus: (latch >> 16) as u8,
            device: ((latch >> 11) & 0x1f) as u8,
            function: ((latch >> 8) & 0x7) as u8,
            offset: (latch & 0xfc) as usize + usize::from(within & 3),
        })
    }

    /// Decodes an offset into the ECAM region of bus 0 onward.
    pub fn from_ecam(offset: u64) -> Self {
        ConfigAddress {
            bus: (offset >> 20) as u8,
            device: ((offset >> 15) & 0x1f) as u8,
            function: ((offset >> 12) & 0x7) as u8,
            offset: (offset & (ECAM_FUNCTION_SIZE - 1)) as usize,
        }
    }
}

/// The bus is full or a slot is taken (a VMM wiring mistake).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciBusError {
    #[error("PCI slot {0} is already in use")]
    SlotTaken(u8),
    #[error("PCI slot {0} does not exist (bus 0 has slots 0 to 31)")]
    NoSuchSlot(u8),
    #[error("PCI bus 0 has no free slot left (32 devices)")]
    Full,
}

/// Where a guest MMIO or port access landed on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarHit {
    pub slot: u8,
    pub bar: usize,
    pub offset: u64,
}

/// Bus 0 and its devices.
pub struct PciBus {
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
}

impl Default for PciBus {
    fn default() -> Self {
        let mut slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>> = vec![None; SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(PciHostBridge::default())));
        PciBus { slots }
    }
}

impl PciBus {
    /// Puts `dev` in the first free slot and returns the slot.
    pub fn add(&mut self, dev: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciBusError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciBusError::Full)?;
        self.slots[slot] = Some(dev);
        Ok(slot as u8)
    }

    /// Puts `dev` in `slot` (a device that must keep its address across a migration).
    pub fn add_at(&mut self, slot: u8, dev: Arc<Mutex<dyn PciDevice>>) -> Result<(), PciBusError> {
        let s = self
            .slots
            .get_mut(usize::from(slot))
            .ok_or(PciBusError::NoSuchSlot(slot))?;
        if s.is_some() {
            return Err(PciBusError::SlotTaken(slot));
        }
        *s = Some(dev);
        Ok(())
    }

    pub fn device(&self, slot: u8) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        self.slots.get(usize::from(slot))?.as_ref()
    }

    fn function(&self, a: ConfigAddress) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        if a.bus != 0 || a.function != 0 {
            return None;
        }
        self.device(a.device)
    }

    pub fn read_config(&self, a: ConfigAddress, data: &mut [u8]) {
        match self.function(a) {
            Some(d) => lock(d).read_config(a.offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn write_config(&self, a: ConfigAddress, data: &[u8]) {
        if let Some(d) = self.function(a) {
            lock(d).write_config(a.offset, data);
        }
    }

    /// The memory BAR (of a device with memory decoding on) that holds `addr`.
    pub fn find_memory_bar(&self, addr: u64, len: u64) -> Option<BarHit> {
        self.find_bar(addr, len, |k| k != BarKind::Io, PciConfig::memory_enabled)
    }

    /// The I/O BAR (of a device with I/O decoding on) that holds `port`.
    pub fn find_io_bar(&self, port: u16, len: u64) -> Option<BarHit> {
        self.find_bar(
            u64::from(port),
            len,
            |k| k == BarKind::Io,
            PciConfig::io_enabled,
        )
    }

    fn find_bar(
        &self,
        addr: u64,
        len: u64,
        kind: impl Fn(BarKind) -> bool,
        decoding: impl Fn(&PciConfig) -> bool,
    ) -> Option<BarHit> {
        self.slots.iter().enumerate().find_map(|(slot, d)| {
            let d = lock(d.as_ref()?);
            let c = d.config();
            if !decoding(c) {
                return None;
            }
            let hit = c
                .bars()
                .filter(|b| kind(b.kind) && b.address != 0)
                .find(|b| addr >= b.address && addr.saturating_add(len) <= b.address + b.size)
                .map(|b| BarHit {
                    slot: slot as u8,
                    bar: b.index,
                    offset: addr - b.address,
                });
            hit
        })
    }

    /// A guest read from ECAM, at `offset` from the region's start.
    pub fn read_ecam(&self, offset: u64, data: &mut [u8]) {
        self.read_config(ConfigAddress::from_ecam(offset), data);
    }

    pub fn write_ecam(&self, offset: u64, data: &[u8]) {
        self.write_config(ConfigAddress::from_ecam(offset), data);
    }
}

fn lock(d: &Arc<Mutex<dyn PciDevice>>) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// Configuration mechanism #1 on ports 0xCF8..0xCFF.
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    latch: u32,
}

impl PciConfigIo {
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciConfigIo { bus, latch: 0 }
    }
}

impl PioDevice for PciConfigIo {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match offset {
            // Only a whole dword reads the latch; narrower reads of 0xCF8 belong to other
            // legacy uses and see nothing.
            0 if data.len() == 4 => data.copy_from_slice(&self.latch.to_le_bytes()),
            4..=7 if usize::from(offset - 4) + data.len() <= 4 => {
                match ConfigAddress::from_cf8(self.latch, (offset - 4) as u8) {
                    Some(a) => self.bus.read_config(a, data),
                    None => data.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<PlatformEvent> {
        match offset {
            0 if data.len() == 4 => {
                self.latch = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            }
            4..=7 if usize::from(offset - 4) + data.len() <= 4 => {
                if let Some(a) = ConfigAddress::from_cf8(self.latch, (offset - 4) as u8) {
                    self.bus.write_config(a, data);
                }
            }
            _ => {}
        }
        None
    }
}

/// The MMIO window the devices' memory BARs live in, as one MMIO device: an access is
/// passed to the BAR that holds it (a BAR the guest moved inside the window follows),
/// or reads as all ones and is dropped.
pub struct PciBarWindow {
    bus: Arc<PciBus>,
    base: u64,
}

impl PciBarWindow {
    pub fn new(bus: Arc<PciBus>, base: u64) -> Self {
        PciBarWindow { bus, base }
    }
}

impl MmioDevice for PciBarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let addr = self.base + offset;
        match self.bus.find_memory_bar(addr, data.len() as u64) {
            Some(hit) => match self.bus.device(hit.slot) {
                Some(d) => lock(d).read_bar(hit.bar, hit.offset, data),
                None => data.fill(0xff),
            },
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let addr = self.base + offset;
        if let Some(hit) = self.bus.find_memory_bar(addr, data.len() as u64) {
            if let Some(d) = self.bus.device(hit.slot) {
                lock(d).write_bar(hit.bar, hit.offset, data);
            }
        }
    }
}

/// The ECAM window of bus 0 as an MMIO device.
pub struct PciEcam {
    bus: Arc<PciBus>,
}

impl PciEcam {
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciEcam { bus }
    }
}

impl MmioDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Accesses of 1, 2 or 4 bytes within one dword, as the spec allows.
        if matches!(data.len(), 1 | 2 | 4) && (offset % 4) as usize + data.len() <= 4 {
            self.bus.read_ecam(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if matches!(data.len(), 1 | 2 | 4) && (offset % 4) as usize + data.len() <= 4 {
            self.bus.write_ecam(offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::COMMAND_MEMORY;

    struct Scratch {
        config: PciConfig,
        last_write: Option<(usize, u64, Vec<u8>)>,
    }

    impl PciDevice for Scratch {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.config
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) << 4 | offset as u8);
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((bar, offset, data.to_vec()));
        }
    }

    fn scratch() -> Arc<Mutex<Scratch>> {
        let mut config = PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1044,
            class: 0x00ff_0000,
            ..PciIds::default()
        });
        config.add_bar(0, BarKind::Memory32, 0x1000).unwrap();
        config.add_bar(1, BarKind::Io, 0x10).unwrap();
        Arc::new(Mutex::new(Scratch {
            config,
            last_write: None,
        }))
    }

    fn cf8(device: u8, reg: u32) -> u32 {
        1 << 31 | u32::from(device) << 11 | reg
    }

    fn io_read32(io: &mut PciConfigIo, device: u8, reg: u32) -> u32 {
        io.write(0, &cf8(device, reg).to_le_bytes());
        let mut b = [0; 4];
        io.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn the_host_bridge_and_devices_answer_on_cf8_and_absent_ones_read_all_ones() {
        let mut bus = PciBus::default();
        assert_eq!(bus.add(scratch()).unwrap(), 1);
        let mut io = PciConfigIo::new(Arc::new(bus));
        assert_eq!(io_read32(&mut io, 0, 0), 0x0008_1b36);
        assert_eq!(io_read32(&mut io, 0, 8) >> 8, 0x06_00_00);
        assert_eq!(io_read32(&mut io, 1, 0), 0x1044_1af4);
        assert_eq!(io_read32(&mut io, 2, 0), 0xffff_ffff);
        // Function 1 and bus 1 do not exist.
        io.write(0, &(cf8(1, 0) | 1 << 8).to_le_bytes());
        let mut b = [0; 4];
        io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        io.write(0, &(cf8(1, 0) | 1 << 16).to_le_bytes());
        io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        // The enable bit off: not a config cycle.
        io.write(0, &0u32.to_le_bytes());
        io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        // The latch reads back.
        io.write(0, &cf8(1, 0x10).to_le_bytes());
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), cf8(1, 0x10));
    }

    #[test]
    fn byte_and_word_accesses_through_the_data_port_hit_the_right_register() {
        let mut bus = PciBus::default();
        bus.add(scratch()).unwrap();
        let mut io = PciConfigIo::new(Arc::new(bus));
        io.write(0, &cf8(1, 0).to_le_bytes());
        let mut w = [0; 2];
        io.read(6, &mut w);
        assert_eq!(
            u16::from_le_bytes(w),
            0x1044,
            "device id at byte 2 of the dword"
        );
        io.write(0, &cf8(1, 0x3c).to_le_bytes());
        io.write(4, &[9]);
        let mut one = [0];
        io.read(4, &mut one);
        assert_eq!(one, [9]);
        // A word at byte 3 would cross the dword: refused.
        io.read(7, &mut w);
        assert_eq!(w, [0xff; 2]);
    }

    #[test]
    fn ecam_decodes_device_function_and_register() {
        let a = ConfigAddress::from_ecam(3 << 15 | 2 << 12 | 0x44);
        assert_eq!(
            a,
            ConfigAddress {
                bus: 0,
                device: 3,
                function: 2,
                offset: 0x44
            }
        );
        let mut bus = PciBus::default();
        bus.add_at(5, scratch()).unwrap();
        assert_eq!(bus.add_at(5, scratch()), Err(PciBusError::SlotTaken(5)));
        assert_eq!(bus.add_at(32, scratch()), Err(PciBusError::NoSuchSlot(32)));
        let mut b = [0; 4];
        bus.read_ecam(5 << 15, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1044_1af4);
        bus.write_ecam(5 << 15 | 0x10, &0xfe00_0000u32.to_le_bytes());
        bus.read_ecam(5 << 15 | 0x10, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xfe00_0000);
        // Extended space past 256 bytes reads zero (no extended capabilities).
        bus.read_ecam(5 << 15 | 0x100, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn bar_accesses_route_only_while_decoding_is_on() {
        let mut bus = PciBus::default();
        let dev = scratch();
        bus.add(dev.clone()).unwrap();
        {
            let mut d = dev.lock().unwrap();
            d.config.set_bar_address(0, 0xfe00_0000).unwrap();
            d.config.set_bar_address(1, 0xc000).unwrap();
        }
        assert_eq!(
            bus.find_memory_bar(0xfe00_0010, 4),
            None,
            "memory decoding off"
        );
        dev.lock().unwrap().config.write(
            4,
            &[(COMMAND_MEMORY | super::super::config::COMMAND_IO) as u8],
        );
        assert_eq!(
            bus.find_memory_bar(0xfe00_0010, 4),
            Some(BarHit {
                slot: 1,
                bar: 0,
                offset: 0x10
            })
        );
        assert_eq!(bus.find_memory_bar(0xfe00_0ffe, 4), None, "crosses the end");
        assert_eq!(bus.find_io_bar(0xc004, 2).map(|h| h.bar), Some(1));
        assert_eq!(bus.find_io_bar(0xfe00, 2), None);
    }

    #[test]
    fn ecam_takes_aligned_accesses_only() {
        let mut ecam = PciEcam::new(Arc::new(PciBus::default()));
        let mut b = [0; 4];
        ecam.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0008_1b36);
        let mut w = [0; 2];
        ecam.read(2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0008);
        ecam.read(3, &mut w);
        assert_eq!(w, [0xff; 2], "a word across the dword boundary");
        let mut q = [0; 8];
        ecam.read(0, &mut q);
        assert_eq!(q, [0xff; 8], "8-byte accesses are not config accesses");
    }

    #[test]
    fn the_bus_fills_up() {
        let mut bus = PciBus::default();
        for _ in 1..SLOTS {
            bus.add(scratch()).unwrap();
        }
        assert_eq!(bus.add(scratch()), Err(PciBusError::Full));
    }
}

//! Port I/O and MMIO dispatch: each device owns a range and sees offsets into it.

use std::sync::{Arc, Mutex};

/// What a device write asks of the platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformEvent {
    /// The guest wrote `code` to the debug-exit port: end with that status.
    DebugExit(u8),
    /// The guest asked for a reset (i8042 0xFE, triple fault is the VMM's own case).
    Reset,
    /// The guest powered off (ACPI S5).
    PowerOff,
}

/// A port-I/O device. `offset` is relative to the start of its range.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]) -> Option<PlatformEvent>;
}

struct Entry {
    base: u16,
    len: u16,
    dev: Arc<Mutex<dyn PioDevice>>,
}

/// The port-I/O address space. Reads of unclaimed ports return all ones (as on a PC with
/// nothing decoding them), writes to them are dropped.
#[derive(Default)]
pub struct PioBus {
    entries: Vec<Entry>,
}

impl PioBus {
    /// Claims `base..base+len` for `dev`. Overlaps are a programming error of the VMM.
    pub fn insert(&mut self, base: u16, len: u16, dev: Arc<Mutex<dyn PioDevice>>) {
        let end = u32::from(base) + u32::from(len);
        assert!(
            self.entries.iter().all(|e| end <= u32::from(e.base)
                || u32::from(e.base) + u32::from(e.len) <= u32::from(base)),
            "port range {base:#x}+{len:#x} overlaps another device"
        );
        self.entries.push(Entry { base, len, dev });
    }

    fn find(&self, port: u16) -> Option<(&Entry, u16)> {
        self.entries
            .iter()
            .find(|e| port >= e.base && u32::from(port) < u32::from(e.base) + u32::from(e.len))
            .map(|e| (e, port - e.base))
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((e, off)) => e
                .dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read(off, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) -> Option<PlatformEvent> {
        let (e, off) = self.find(port)?;
        e.dev
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(off, data)
    }
}

/// A memory-mapped device. `offset` is relative to the start of its range.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct MmioEntry {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn MmioDevice>>,
}

/// The MMIO address space outside guest RAM and the in-kernel irqchip. Reads of
/// unclaimed addresses return all ones (nothing decodes them), writes are dropped.
#[derive(Default)]
pub struct MmioBus {
    entries: Vec<MmioEntry>,
}

impl MmioBus {
    /// Claims `base..base+len` for `dev`. Overlaps are a programming error of the VMM.
    pub fn insert(&mut self, base: u64, len: u64, dev: Arc<Mutex<dyn MmioDevice>>) {
        let end = base.checked_add(len).expect("MMIO range wraps");
        assert!(
            self.entries
                .iter()
                .all(|e| end <= e.base || e.base + e.len <= base),
            "MMIO range {base:#x}+{len:#x} overlaps another device"
        );
        self.entries.push(MmioEntry { base, len, dev });
    }

    /// The device and offset of an access of `len` bytes at `addr`, when one device
    /// holds all of it.
    fn find(&self, addr: u64, len: usize) -> Option<(&MmioEntry, u64)> {
        self.entries
            .iter()
            .find(|e| addr >= e.base && addr.saturating_add(len as u64) <= e.base + e.len)
            .map(|e| (e, addr - e.base))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some((e, off)) => e
                .dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read(off, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((e, off)) = self.find(addr, data.len()) {
            e.dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write(off, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u16, data: &[u8]) -> Option<PlatformEvent> {
            self.0 = data[0];
            None
        }
    }

    #[test]
    fn dispatches_by_range_and_defaults_to_ones() {
        let mut bus = PioBus::default();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Echo(1))));
        let mut b = [0u8; 1];
        bus.read(0x12, &mut b);
        assert_eq!(b, [3]);
        bus.read(0x14, &mut b);
        assert_eq!(b, [0xff]);
        assert_eq!(bus.write(0x10, &[7]), None);
        bus.read(0x10, &mut b);
        assert_eq!(b, [7]);
        assert_eq!(bus.write(0x99, &[7]), None);
    }

    struct Cell(Vec<u8>);
    impl MmioDevice for Cell {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.copy_from_slice(&self.0[offset as usize..][..data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0[offset as usize..][..data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn mmio_dispatches_whole_accesses_and_defaults_to_ones() {
        let mut bus = MmioBus::default();
        bus.insert(0x1000, 8, Arc::new(Mutex::new(Cell(vec![0; 8]))));
        bus.write(0x1004, &[1, 2, 3, 4]);
        let mut b = [0u8; 4];
        bus.read(0x1004, &mut b);
        assert_eq!(b, [1, 2, 3, 4]);
        // Straddling the end: no device holds it.
        bus.read(0x1006, &mut b);
        assert_eq!(b, [0xff; 4]);
        bus.write(0x1006, &[9; 4]);
        bus.read(0xffff_ffff_ffff_fffe, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    #[should_panic(expected = "overlaps")]
    fn overlapping_mmio_ranges_are_refused() {
        let mut bus = MmioBus::default();
        bus.insert(0x1000, 8, Arc::new(Mutex::new(Cell(vec![0; 8]))));
        bus.insert(0x0ff8, 9, Arc::new(Mutex::new(Cell(vec![0; 9]))));
    }

    #[test]
    #[should_panic(expected = "overlaps")]
    fn overlapping_ranges_are_refused() {
        let mut bus = PioBus::default();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Echo(1))));
        bus.insert(0x13, 1, Arc::new(Mutex::new(Echo(1))));
    }
}

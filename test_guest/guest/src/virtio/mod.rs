//! A modern virtio-pci driver (virtio 1.2 §4.1) for `workload=dma-verify`: it finds a
//! virtio-blk or virtio-rng function on PCI bus 0, reads its vendor capabilities,
//! negotiates features and sets up split virtqueues. All of that happens once at boot, in
//! ring 0 (port I/O to 0xCF8 is ring-0 only; ring 0 is slow on some hypervisors, see
//! `sys`, so it is kept short); the workload then uses the queues from ring 3 (`queue`):
//! the BAR is identity-mapped and user-accessible like everything below 4 GiB, and made
//! uncached here.
//!
//! * Functions: vendor 0x1af4, device 0x1042 (blk) / 0x1044 (rng), or the transitional
//!   0x1001 / 0x1005 QEMU shows by default; either way only the modern interface is used
//!   (vendor capabilities: common configuration, notifications, ISR, device
//!   configuration), never the legacy I/O BAR.
//! * BARs: used where the VMM or the firmware put them. A BAR the driver needs that is an
//!   I/O BAR, unassigned (address 0) or not wholly below 4 GiB fails the run with a line
//!   naming it; the driver never moves BARs.
//! * Features: VERSION_1, plus FLUSH (blk, when offered: the workload flushes after
//!   writing the disk) and MQ (blk, when offered and there is more than one vCPU: a queue
//!   per vCPU). Nothing else; a read-only disk fails.
//! * Queues: split, `min(device maximum, 256)` entries (rounded down to a power of two),
//!   memory from the driver memory after the workload regions (`guest_pattern::dma`).
//! * Interrupts: by default none: MSI-X stays disabled, the configuration and queue
//!   vectors are NO_VECTOR, INTx is disabled in the command register and every available
//!   ring says NO_INTERRUPT. With `irq=msix`: MSI-X enabled, table entry `q` aimed at the
//!   boot vCPU with IDT vector `irq::queue_vector(q)`, queue `q`'s vector `q` (the device
//!   must read it back), the available rings without NO_INTERRUPT; the configuration
//!   vector stays NO_VECTOR. With `irq=intx`: MSI-X stays disabled, INTx enabled, the
//!   line the interrupt line register names routed through the I/O APIC (`irq`), the
//!   available rings without NO_INTERRUPT; the handler reads the ISR. Either way the
//!   driver polls the used rings; interrupts are only counted (`irq`).

pub mod blk;
pub mod iommu;
pub mod queue;

use guest_pattern::cmdline::{Dma, Irq};
use guest_pattern::dma::{DriverMemory, MAX_QUEUE_SIZE};
use guest_pattern::viommu::F_ACCESS_PLATFORM;

use crate::arch::Plain;
use crate::pci::{read_config, write_config};

pub const VENDOR: u16 = 0x1af4;

/// The driver's name for the device.
pub fn name(dma: Dma) -> &'static str {
    match dma {
        Dma::Blk => "virtio-blk",
        Dma::Rng => "virtio-rng",
        Dma::VfioUser => "vfio-user",
    }
}

/// The devices the driver knows.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Blk,
    Rng,
    Iommu,
}

impl Kind {
    pub fn of(dma: Dma) -> Kind {
        match dma {
            Dma::Blk => Kind::Blk,
            Dma::Rng => Kind::Rng,
            Dma::VfioUser => panic!("dma=vfio-user is not a virtio device"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Blk => "virtio-blk",
            Kind::Rng => "virtio-rng",
            Kind::Iommu => "virtio-iommu",
        }
    }

    /// PCI device ids accepted: modern, transitional (virtio-iommu has no transitional
    /// id).
    fn ids(self) -> [u16; 2] {
        match self {
            Kind::Blk => [0x1042, 0x1001],
            Kind::Rng => [0x1044, 0x1005],
            Kind::Iommu => [guest_pattern::viommu::DEVICE_ID; 2],
        }
    }
}

// PCI configuration space (type 0 header).
const REG_COMMAND: u8 = 0x04;
/// Interrupt line (byte 0x3c), interrupt pin (byte 0x3d).
const REG_INTERRUPT: u8 = 0x3c;
const REG_HEADER_TYPE: u8 = 0x0c;
const REG_BAR0: u8 = 0x10;
const REG_CAPABILITIES: u8 = 0x34;
/// Status register (upper half of the dword at 0x04): capability list present.
const STATUS_CAP_LIST: u32 = 1 << 20;
const CMD_MEMORY: u32 = 1 << 1;
const CMD_BUS_MASTER: u32 = 1 << 2;
const CMD_INTX_DISABLE: u32 = 1 << 10;
const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
// MSI-X message control (upper half of the capability's first dword).
const MSIX_ENABLE: u32 = 1 << 15;
const MSIX_FUNCTION_MASK: u32 = 1 << 14;
const MSIX_TABLE_SIZE: u32 = 0x7ff;
/// Bytes per MSI-X table entry: address (low, high), data, vector control.
const MSIX_ENTRY: u64 = 16;
/// An MSI address: the local APICs' window, destination APIC id in bits 12-19 (physical
/// destination mode, no redirection hint).
const MSI_ADDRESS: u32 = 0xfee0_0000;

// virtio_pci_cap.cfg_type
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_NAMES: [&str; 5] = ["", "common", "notify", "ISR", "device"];

// Common configuration (virtio 1.2 §4.1.4.3).
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
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
/// Bytes of the common configuration the driver uses.
const COMMON_LEN: u32 = 0x38;

// Device status.
const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
pub const NEEDS_RESET: u8 = 64;
const FAILED: u8 = 128;

const F_VERSION_1: u64 = 1 << 32;
const BLK_F_RO: u64 = 1 << 5;
const BLK_F_FLUSH: u64 = 1 << 9;
const BLK_F_MQ: u64 = 1 << 12;
const NO_VECTOR: u16 = 0xffff;

// virtio-blk configuration.
const BLK_CAPACITY: u64 = 0;
const BLK_NUM_QUEUES: u64 = 34;
const SECTOR: u64 = 512;

const FOUR_GIB: u64 = 1 << 32;
const MIB2: u64 = 2 << 20;

/// A device structure in a BAR: `len` bytes at `base`, below 4 GiB, identity-mapped,
/// uncached. Only this module makes them, from the capabilities and the BARs.
#[derive(Clone, Copy)]
pub struct Mmio {
    base: u64,
    len: u64,
}

impl Mmio {
    pub fn read<T: Plain>(&self, offset: u64) -> T {
        let size = core::mem::size_of::<T>() as u64;
        assert!(offset + size <= self.len, "MMIO read past the structure");
        // SAFETY: the structure lies in a memory BAR wholly below 4 GiB (checked when it
        // was made), where the identity map holds it, uncached; the access is inside it,
        // naturally aligned by the callers' offsets. It is device memory, not memory
        // Rust knows about: a volatile access of the register's own size.
        unsafe { core::ptr::read_volatile((self.base + offset) as *const T) }
    }

    pub fn write<T: Plain>(&self, offset: u64, value: T) {
        let size = core::mem::size_of::<T>() as u64;
        assert!(offset + size <= self.len, "MMIO write past the structure");
        // SAFETY: as for `read`: a register of the device's structure, below 4 GiB,
        // mapped uncached; writing it changes device state only.
        unsafe { core::ptr::write_volatile((self.base + offset) as *mut T, value) }
    }

    fn write_u64(&self, offset: u64, value: u64) {
        self.write::<u32>(offset, value as u32);
        self.write::<u32>(offset + 4, (value >> 32) as u32);
    }

    /// A 64-bit field, as two 32-bit reads (low half first), as virtio 1.2 §4.1.3.1 asks
    /// of device configuration fields.
    pub fn read_u64(&self, offset: u64) -> u64 {
        u64::from(self.read::<u32>(offset)) | u64::from(self.read::<u32>(offset + 4)) << 32
    }

    /// Bytes of the structure.
    pub fn len(&self) -> u64 {
        self.len
    }
}

/// One `virtio_pci_cap`.
#[derive(Clone, Copy)]
struct Cap {
    bar: u8,
    offset: u32,
    length: u32,
}

/// What the workload needs to know about the device it drives.
pub struct Device {
    pub dev: u8,
    pub func: u8,
    pub id: u16,
    /// BAR index and address of the common configuration.
    pub bar: (u8, u64),
    /// Features agreed.
    pub features: u64,
    pub queues: u32,
    /// Entries of each queue (the smallest, should they differ).
    pub queue_size: u16,
    /// virtio-blk: bytes of the disk.
    pub capacity: u64,
    /// `irq=msix`: where the MSI-X table is and the APIC id its entries aim at.
    pub msix: Option<MsixTable>,
    /// `irq=intx`: the pin, its line and where the I/O APIC sends it.
    pub intx: Option<Intx>,
}

/// INTx as `irq=intx` set it up.
#[derive(Clone, Copy)]
pub struct Intx {
    /// Interrupt pin register: 1 = INTA#.
    pub pin: u8,
    /// Interrupt line register: the GSI.
    pub line: u8,
    pub route: crate::irq::IntxRoute,
    pub apic_id: u32,
}

/// The MSI-X table as `irq=msix` programmed it.
#[derive(Clone, Copy)]
pub struct MsixTable {
    /// The table's BAR index and address.
    pub bar: (u8, u64),
    /// Entries in the table (the device's vectors).
    pub entries: u32,
    /// Entries programmed (one per queue).
    pub used: u32,
    pub apic_id: u32,
}

impl Device {
    pub fn flush(&self) -> bool {
        self.features & BLK_F_FLUSH != 0
    }

    /// Prints `guest: dma device=...`: the device, how the workload will use it (`batch`
    /// pages, at most `requests` chains in flight), `extra` (` disk=...`) and the driver
    /// memory; with `irq=msix` then `guest: dma irq=msix table=<bar>:0x<addr>
    /// vectors=<used>/<entries> idt=0x<first>-0x<last> apic=<id>`, with `irq=intx`
    /// `guest: dma irq=intx pin=<A-D> line=<gsi> ioapic=0x<addr> input=<n> idt=0x<v>
    /// apic=<id>`.
    pub fn announce(
        &self,
        dma: Dma,
        batch: usize,
        requests: usize,
        extra: impl core::fmt::Display,
        memory: core::ops::Range<u64>,
    ) {
        say!(
            "dma device={} pci=00:{:02x}.{} id={VENDOR:04x}:{:04x} bar={}:{:#x} features={:#x} queues={} queue_size={} batch={batch} requests={requests}{extra} memory={:#x}-{:#x}",
            name(dma),
            self.dev,
            self.func,
            self.id,
            self.bar.0,
            self.bar.1,
            self.features,
            self.queues,
            self.queue_size,
            memory.start,
            memory.end
        );
        if let Some(m) = &self.msix {
            say!(
                "dma irq=msix table={}:{:#x} vectors={}/{} idt={:#x}-{:#x} apic={}",
                m.bar.0,
                m.bar.1,
                m.used,
                m.entries,
                crate::irq::queue_vector(0),
                crate::irq::queue_vector(m.used - 1),
                m.apic_id
            );
        }
        if let Some(i) = &self.intx {
            say!(
                "dma irq=intx pin={} line={} ioapic={:#x} input={} idt={:#x} apic={}",
                char::from(b'A' + (i.pin - 1)),
                i.line,
                i.route.ioapic,
                i.route.input,
                crate::irq::INTX_VECTOR,
                i.apic_id
            );
        }
    }
}

/// Finds the first function on bus 0 that is a `kind` device: (device, function, id).
pub fn locate(kind: Kind) -> Option<(u8, u8, u16)> {
    for dev in 0..32 {
        if read_config(dev, 0, 0) & 0xffff == 0xffff {
            continue;
        }
        let multi = read_config(dev, 0, REG_HEADER_TYPE) & (0x80 << 16) != 0;
        for func in 0..if multi { 8 } else { 1 } {
            let id = read_config(dev, func, 0);
            let (vendor, device) = (id as u16, (id >> 16) as u16);
            if vendor == VENDOR && kind.ids().contains(&device) {
                return Some((dev, func, device));
            }
        }
    }
    None
}

/// Fails the run for want of a `kind` device on bus 0.
pub fn missing(kind: Kind) -> ! {
    let [modern, transitional] = kind.ids();
    if modern == transitional {
        crate::fail(format_args!(
            "no {} on PCI bus 0 (vendor {VENDOR:04x}, device {modern:04x})",
            kind.name()
        ))
    }
    crate::fail(format_args!(
        "no {} on PCI bus 0 (vendor {VENDOR:04x}, device {modern:04x} or {transitional:04x})",
        kind.name()
    ))
}

/// A virtio-pci function being set up (ring 0, at boot): its structures found, checked
/// and mapped uncached, memory decoding and bus mastering on, the device reset, then
/// ACKNOWLEDGE and DRIVER set and its features read. Any problem fails the run, naming
/// the function.
pub struct Transport {
    kind: Kind,
    pub dev: u8,
    pub func: u8,
    pub id: u16,
    /// BAR index and address of the common configuration.
    pub bar: (u8, u64),
    common: Mmio,
    notify: Mmio,
    notify_multiplier: u32,
    isr: Mmio,
    /// The device configuration, if the device has one.
    pub device_cfg: Option<Mmio>,
    msix_cap: Option<u8>,
    /// Features the device offers.
    pub offered: u64,
    status: u8,
}

impl Transport {
    /// Opens the first `kind` function on bus 0 (none fails the run). INTx is left enabled
    /// only for `irq=intx`. `device_cfg`: bytes of device configuration needed (none:
    /// not needed).
    pub fn open(kind: Kind, irq: Irq, device_cfg: Option<u32>) -> Transport {
        let Some((dev, func, id)) = locate(kind) else {
            missing(kind)
        };
        let fail = |why: core::fmt::Arguments| -> ! {
            crate::fail(format_args!("{} 00:{dev:02x}.{func}: {why}", kind.name()))
        };

        // Memory decoding and bus mastering on, INTx off unless irq=intx.
        let command = read_config(dev, func, REG_COMMAND);
        if command & STATUS_CAP_LIST == 0 {
            fail(format_args!("no capability list"));
        }
        let intx_disable = if irq == Irq::Intx {
            0
        } else {
            CMD_INTX_DISABLE
        };
        // Only the command half is written: zeros leave the status bits (write-1-to-clear).
        write_config(
            dev,
            func,
            REG_COMMAND,
            (command & 0xffff & !CMD_INTX_DISABLE) | CMD_MEMORY | CMD_BUS_MASTER | intx_disable,
        );

        // The vendor capabilities: the first of each type the driver knows; and MSI-X.
        let mut caps: [Option<Cap>; 5] = [None; 5];
        let mut msix_cap: Option<u8> = None;
        let mut notify_multiplier = 0;
        let mut at = (read_config(dev, func, REG_CAPABILITIES) & 0xfc) as u8;
        for _ in 0..48 {
            if at == 0 {
                break;
            }
            let head = read_config(dev, func, at);
            let (cap_id, next, cap_len, cfg_type) = (
                head as u8,
                (head >> 8) as u8 & 0xfc,
                (head >> 16) as u8,
                (head >> 24) as u8,
            );
            if cap_id == CAP_MSIX && msix_cap.is_none() {
                msix_cap = Some(at);
            }
            let bar = read_config(dev, func, at + 4) as u8;
            let kind = usize::from(cfg_type);
            if cap_id == CAP_VENDOR
                && (1..caps.len()).contains(&kind)
                && bar <= 5
                && caps[kind].is_none()
                && (cfg_type != CFG_NOTIFY || cap_len >= 20)
            {
                caps[kind] = Some(Cap {
                    bar,
                    offset: read_config(dev, func, at + 8),
                    length: read_config(dev, func, at + 12),
                });
                if cfg_type == CFG_NOTIFY {
                    notify_multiplier = read_config(dev, func, at + 16);
                }
            }
            at = next;
        }

        let mut t = Transport {
            kind,
            dev,
            func,
            id,
            bar: (0, 0),
            common: Mmio { base: 0, len: 0 },
            notify: Mmio { base: 0, len: 0 },
            notify_multiplier,
            isr: Mmio { base: 0, len: 0 },
            device_cfg: None,
            msix_cap,
            offered: 0,
            status: 0,
        };
        // A structure: its capability, its BAR's address, checked and mapped uncached.
        let structure = |t: &Transport, cfg_type: u8, min_len: u32| -> Option<(Mmio, u8, u64)> {
            let what = CFG_NAMES[usize::from(cfg_type)];
            let cap = caps[usize::from(cfg_type)]?;
            if cap.length < min_len {
                t.fail(format_args!(
                    "the {what} structure has {} bytes, the driver needs {min_len}",
                    cap.length
                ));
            }
            let (mmio, addr) = t.in_bar(
                cap.bar,
                cap.offset,
                u64::from(cap.length),
                format_args!("{what} structure"),
            );
            Some((mmio, cap.bar, addr))
        };
        let missing = |t: &Transport, cfg_type: u8| -> ! {
            t.fail(format_args!(
                "no {} structure (vendor capability cfg_type {cfg_type})",
                CFG_NAMES[usize::from(cfg_type)]
            ))
        };
        let (common, bar, bar_addr) =
            structure(&t, CFG_COMMON, COMMON_LEN).unwrap_or_else(|| missing(&t, CFG_COMMON));
        let (notify, _, _) =
            structure(&t, CFG_NOTIFY, 2).unwrap_or_else(|| missing(&t, CFG_NOTIFY));
        // The ISR: only `irq=intx` reads it, but a device without one is not virtio-pci.
        let (isr, _, _) = structure(&t, CFG_ISR, 1).unwrap_or_else(|| missing(&t, CFG_ISR));
        let device_cfg = device_cfg.map(|min| {
            structure(&t, CFG_DEVICE, min)
                .unwrap_or_else(|| missing(&t, CFG_DEVICE))
                .0
        });
        t.common = common;
        t.bar = (bar, bar_addr);
        t.notify = notify;
        t.isr = isr;
        t.device_cfg = device_cfg;

        // Reset, then the handshake (virtio 1.2 §3.1.1).
        common.write::<u8>(DEVICE_STATUS, 0);
        let mut reset = false;
        for _ in 0..100_000 {
            if common.read::<u8>(DEVICE_STATUS) == 0 {
                reset = true;
                break;
            }
            core::hint::spin_loop();
        }
        if !reset {
            t.fail(format_args!("device status does not read 0 after a reset"));
        }
        t.status = ACKNOWLEDGE | DRIVER;
        common.write::<u8>(DEVICE_STATUS, ACKNOWLEDGE);
        common.write::<u8>(DEVICE_STATUS, t.status);
        common.write::<u32>(DEVICE_FEATURE_SELECT, 0);
        let low = common.read::<u32>(DEVICE_FEATURE);
        common.write::<u32>(DEVICE_FEATURE_SELECT, 1);
        t.offered = u64::from(common.read::<u32>(DEVICE_FEATURE)) << 32 | u64::from(low);
        if t.offered & F_VERSION_1 == 0 {
            t.fail(format_args!(
                "VERSION_1 not offered (features {:#x}): a legacy-only device",
                t.offered
            ));
        }
        t
    }

    /// Fails the run: `guest: FAIL <device> 00:DD.F: <why>`.
    pub fn fail(&self, why: core::fmt::Arguments) -> ! {
        crate::fail(format_args!(
            "{} 00:{:02x}.{}: {why}",
            self.kind.name(),
            self.dev,
            self.func
        ))
    }

    /// `len` bytes at `offset` in BAR `bar` holding `what`: the BAR's address, checked,
    /// and the structure mapped uncached.
    fn in_bar(&self, bar: u8, offset: u32, len: u64, what: core::fmt::Arguments) -> (Mmio, u64) {
        let (dev, func) = (self.dev, self.func);
        let reg = REG_BAR0 + 4 * bar;
        let low = read_config(dev, func, reg);
        if low & 1 != 0 {
            self.fail(format_args!("BAR {bar} (the {what}) is an I/O BAR"));
        }
        let mut addr = u64::from(low & !0xf);
        if (low >> 1) & 3 == 2 {
            if bar == 5 {
                self.fail(format_args!("BAR 5 claims to be 64-bit"));
            }
            addr |= u64::from(read_config(dev, func, reg + 4)) << 32;
        }
        if addr == 0 {
            self.fail(format_args!(
                "BAR {bar} (the {what}) is unassigned (address 0)"
            ));
        }
        let start = addr + u64::from(offset);
        let end = start + len;
        if end > FOUR_GIB {
            self.fail(format_args!(
                "BAR {bar} at {addr:#x} (the {what}, {start:#x}-{end:#x}) is not below 4 GiB, \
                 the only memory the driver maps"
            ));
        }
        let mut page = start & !(MIB2 - 1);
        while page < end {
            crate::paging::set_uncached(page);
            page += MIB2;
        }
        (Mmio { base: start, len }, addr)
    }

    /// Writes the driver features `wanted` and sets FEATURES_OK, which must stick.
    pub fn negotiate(&mut self, wanted: u64) {
        let common = self.common;
        common.write::<u32>(DRIVER_FEATURE_SELECT, 0);
        common.write::<u32>(DRIVER_FEATURE, wanted as u32);
        common.write::<u32>(DRIVER_FEATURE_SELECT, 1);
        common.write::<u32>(DRIVER_FEATURE, (wanted >> 32) as u32);
        self.status |= FEATURES_OK;
        common.write::<u8>(DEVICE_STATUS, self.status);
        if common.read::<u8>(DEVICE_STATUS) & FEATURES_OK == 0 {
            self.fail(format_args!(
                "FEATURES_OK refused for features {wanted:#x} (offered {:#x})",
                self.offered
            ));
        }
    }

    /// `read()` of the device configuration, repeated until `config_generation` says it
    /// did not change meanwhile.
    pub fn read_config_stable<T>(&self, read: impl Fn(&Mmio) -> T) -> T {
        let Some(cfg) = self.device_cfg.as_ref() else {
            self.fail(format_args!("no device configuration"));
        };
        for _ in 0..100 {
            let generation = self.common.read::<u8>(CONFIG_GENERATION);
            let value = read(cfg);
            if self.common.read::<u8>(CONFIG_GENERATION) == generation {
                return value;
            }
        }
        self.fail(format_args!(
            "the device configuration keeps changing (config_generation)"
        ))
    }

    /// Queues the device has.
    pub fn num_queues(&self) -> u32 {
        u32::from(self.common.read::<u16>(NUM_QUEUES))
    }

    /// Sets up queue `q` with rings in the driver's memory at `rings`, which the device
    /// sees at `device_rings`, and publishes it as `queue` slot `slot`; MSI-X vector
    /// `vector` (NO_VECTOR: none, and the rings ask for no interrupts unless
    /// `interrupts`). Returns its size: `min(device maximum, 256)` rounded down to a
    /// power of two.
    fn queue(
        &self,
        q: u16,
        slot: usize,
        rings: u64,
        device_rings: u64,
        vector: u16,
        interrupts: bool,
    ) -> u16 {
        let common = self.common;
        common.write::<u16>(QUEUE_SELECT, q);
        let max = common.read::<u16>(QUEUE_SIZE);
        if max == 0 {
            self.fail(format_args!("queue {q} is not available (size 0)"));
        }
        let size = max.min(MAX_QUEUE_SIZE);
        // Split rings want a power of two.
        let size = 1u16 << (15 - size.leading_zeros());
        common.write::<u16>(QUEUE_SIZE, size);
        common.write::<u16>(QUEUE_MSIX_VECTOR, vector);
        let accepted = common.read::<u16>(QUEUE_MSIX_VECTOR);
        if vector != NO_VECTOR && accepted != vector {
            self.fail(format_args!(
                "irq=msix: queue {q}'s MSI-X vector {vector} reads back as {accepted:#x}"
            ));
        }
        queue::init_rings(rings, interrupts);
        common.write_u64(QUEUE_DESC, device_rings);
        common.write_u64(
            QUEUE_DRIVER,
            device_rings + guest_pattern::dma::AVAIL_OFFSET,
        );
        common.write_u64(QUEUE_DEVICE, device_rings + guest_pattern::dma::USED_OFFSET);
        let off =
            u64::from(common.read::<u16>(QUEUE_NOTIFY_OFF)) * u64::from(self.notify_multiplier);
        if off + 2 > self.notify.len {
            self.fail(format_args!(
                "queue {q}'s notification address (offset {off:#x}) is past the notify structure ({:#x} bytes)",
                self.notify.len
            ));
        }
        common.write::<u16>(QUEUE_ENABLE, 1);
        queue::publish(
            slot,
            q,
            size,
            rings,
            self.notify.base + off,
            self.common.base + DEVICE_STATUS,
        );
        size
    }

    /// Sets DRIVER_OK; the device must then not say NEEDS_RESET or FAILED.
    fn driver_ok(&mut self) {
        self.common.write::<u16>(CONFIG_MSIX_VECTOR, NO_VECTOR);
        self.status |= DRIVER_OK;
        self.common.write::<u8>(DEVICE_STATUS, self.status);
        let now = self.common.read::<u8>(DEVICE_STATUS);
        if now & (NEEDS_RESET | FAILED) != 0 || now & DRIVER_OK == 0 {
            self.fail(format_args!("device status {now:#x} after DRIVER_OK"));
        }
    }
}

/// Sets up `dma`'s device for `cpus` vCPUs with rings in `mem` and interrupts as `irq`
/// says (`irq=msix`: aimed at local APIC `apic_id`, whose handler `irq::setup`
/// installed); publishes its queues to `queue`. `iommu`: the device's DMA goes through a
/// virtio-iommu, so it must offer VIRTIO_F_ACCESS_PLATFORM, and the ring addresses it is
/// given are IOVAs (`dma_iommu::device_address`). Ring 0, at boot, before the workload
/// starts. Any problem fails the run.
pub fn setup(
    dma: Dma,
    mem: &DriverMemory,
    cpus: u32,
    irq: Irq,
    apic_id: u32,
    iommu: bool,
) -> Device {
    let min_cfg = match dma {
        Dma::Blk => Some(8),
        Dma::Rng | Dma::VfioUser => None,
    };
    let mut t = Transport::open(Kind::of(dma), irq, min_cfg);
    let offered = t.offered;
    let mut wanted = F_VERSION_1;
    if dma == Dma::Blk {
        if offered & BLK_F_RO != 0 {
            t.fail(format_args!("the disk is read-only (VIRTIO_BLK_F_RO)"));
        }
        wanted |= offered & BLK_F_FLUSH;
        if cpus > 1 {
            wanted |= offered & BLK_F_MQ;
        }
    }
    // A device that offers ACCESS_PLATFORM wants it accepted (QEMU refuses FEATURES_OK
    // otherwise); with iommu=on it must offer it, or its DMA would not see the IOVAs.
    if iommu && offered & F_ACCESS_PLATFORM == 0 {
        t.fail(format_args!(
            "iommu=on, but VIRTIO_F_ACCESS_PLATFORM (bit 33) is not offered (features {offered:#x}): \
             the device's DMA would bypass the IOMMU (QEMU: iommu_platform=on)"
        ));
    }
    wanted |= offered & F_ACCESS_PLATFORM;
    t.negotiate(wanted);

    // Device configuration: the capacity (and queue count) of a disk.
    let mut capacity = 0;
    let mut queues = 1;
    if dma == Dma::Blk {
        let mq = wanted & BLK_F_MQ != 0;
        if mq && t.device_cfg.is_some_and(|c| c.len < BLK_NUM_QUEUES + 2) {
            t.fail(format_args!(
                "MQ offered but no num_queues in the device configuration"
            ));
        }
        let (sectors, num_queues) = t.read_config_stable(|cfg| {
            (
                u64::from(cfg.read::<u32>(BLK_CAPACITY))
                    | u64::from(cfg.read::<u32>(BLK_CAPACITY + 4)) << 32,
                if mq {
                    cfg.read::<u16>(BLK_NUM_QUEUES)
                } else {
                    1
                },
            )
        });
        capacity = sectors.saturating_mul(SECTOR);
        if mq {
            queues = u32::from(num_queues).clamp(1, cpus);
        }
    }
    let available = t.num_queues();
    if available < queues {
        t.fail(format_args!(
            "{queues} queue(s) needed, the device has {available}"
        ));
    }

    // irq=msix: MSI-X enabled with the function masked, entry q (queue q's) aimed at the
    // boot vCPU and unmasked, then the function unmasked (PCI 3.0 §6.8.2).
    let (dev, func) = (t.dev, t.func);
    let msix = (irq == Irq::Msix).then(|| {
        let Some(at) = t.msix_cap else {
            t.fail(format_args!("irq=msix: no MSI-X capability"))
        };
        let head = read_config(dev, func, at);
        let control = head >> 16;
        let entries = (control & MSIX_TABLE_SIZE) + 1;
        if entries < queues {
            t.fail(format_args!(
                "irq=msix: {queues} queue(s) need {queues} MSI-X vectors, the device has {entries}"
            ));
        }
        if apic_id > 0xff {
            t.fail(format_args!(
                "irq=msix: the boot vCPU's APIC id {apic_id} does not fit an MSI address"
            ));
        }
        let table_reg = read_config(dev, func, at + 4);
        let bir = (table_reg & 7) as u8;
        if bir > 5 {
            t.fail(format_args!("irq=msix: the MSI-X table is in BAR {bir}"));
        }
        let (table, _) = t.in_bar(
            bir,
            table_reg & !7,
            MSIX_ENTRY * u64::from(entries),
            format_args!("MSI-X table"),
        );
        let id_next = head & 0xffff;
        write_config(
            dev,
            func,
            at,
            id_next | (control | MSIX_ENABLE | MSIX_FUNCTION_MASK) << 16,
        );
        for q in 0..u64::from(queues) {
            let e = MSIX_ENTRY * q;
            table.write::<u32>(e, MSI_ADDRESS | apic_id << 12);
            table.write::<u32>(e + 4, 0);
            table.write::<u32>(e + 8, u32::from(crate::irq::queue_vector(q as u32)));
            table.write::<u32>(e + 12, 0);
        }
        write_config(
            dev,
            func,
            at,
            id_next | ((control | MSIX_ENABLE) & !MSIX_FUNCTION_MASK) << 16,
        );
        let now = read_config(dev, func, at) >> 16;
        if now & (MSIX_ENABLE | MSIX_FUNCTION_MASK) != MSIX_ENABLE {
            t.fail(format_args!(
                "irq=msix: MSI-X message control reads {now:#06x} after enabling"
            ));
        }
        MsixTable {
            bar: (bir, table.base),
            entries,
            used: queues,
            apic_id,
        }
    });

    // irq=intx: pin A's line (the interrupt line register, which the VMM or the firmware
    // set) through the I/O APIC to the boot vCPU.
    let intx = (irq == Irq::Intx).then(|| {
        let reg = read_config(dev, func, REG_INTERRUPT);
        let (line, pin) = (reg as u8, (reg >> 8) as u8);
        if !(1..=4).contains(&pin) {
            t.fail(format_args!("irq=intx: interrupt pin {pin} (no INTx)"));
        }
        if line == 0xff {
            t.fail(format_args!(
                "irq=intx: interrupt line {line:#x} (not connected)"
            ));
        }
        let route = crate::irq::route_intx(u32::from(line), t.isr.base, apic_id)
            .unwrap_or_else(|why| t.fail(format_args!("irq=intx: line {line}: {why}")));
        Intx {
            pin,
            line,
            route,
            apic_id,
        }
    });

    // The queues: split rings in the driver memory; interrupts only with irq=.
    let mut queue_size = MAX_QUEUE_SIZE;
    for q in 0..queues {
        let rings = mem.rings(q);
        let vector = if msix.is_some() { q as u16 } else { NO_VECTOR };
        let device_rings = crate::dma_iommu::device_address(rings, guest_pattern::dma::RING_BYTES);
        let size = t.queue(
            q as u16,
            q as usize,
            rings,
            device_rings,
            vector,
            irq != Irq::Off,
        );
        queue_size = queue_size.min(size);
    }
    t.driver_ok();
    queue::set_count(queues);
    Device {
        dev,
        func,
        id: t.id,
        bar: t.bar,
        features: wanted,
        queues,
        queue_size,
        capacity,
        msix,
        intx,
    }
}

//! ACPI tables in the BIOS area at `ACPI_START`: RSDP -> XSDT -> {FADT, MADT, MCFG,
//! VIOT when the VM has a virtio-iommu}, FADT -> {FACS, DSDT}. A full (not
//! hardware-reduced) ACPI platform, because guests use the legacy PIC/IOAPIC/LAPIC and
//! i8042; power-off goes through the PM1a control register the `devices` crate emulates.

use vm_memory::{Bytes, GuestAddress};

use super::aml;
use super::layout::{ACPI_END, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR, PCI_ECAM_START};
use super::BootError;
use crate::memory::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"FERRY ";
const OEM_TABLE_ID: [u8; 8] = *b"FERRYVM ";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: [u8; 4] = *b"FRRY";
const CREATOR_REVISION: u32 = 1;
/// Length of the common table header.
pub const HEADER_LEN: usize = 36;
/// Length of an ACPI 2.0+ RSDP.
pub const RSDP_LEN: usize = 36;
/// Length of an ACPI 6 FADT.
const FADT_LEN: usize = 276;
const FACS_LEN: usize = 64;

/// The PM1 event block (status + enable, 2 bytes each), just below the control register
/// as on QEMU's PIIX4/ICH9 (0x600). ACPICA refuses to enable a full ACPI platform without
/// one; nothing raises events, so the VMM only needs to decode it as RAZ/WI.
pub const PM1A_EVT_BLK: u16 = devices::ACPI_PM1A_EVT_PORT;
const PM1_EVT_LEN: u8 = 4;
/// PM1a control: where guests write SLP_TYP|SLP_EN (devices::AcpiPmControl).
pub const PM1A_CNT_BLK: u16 = devices::ACPI_PM1A_CNT_PORT;
const PM1_CNT_LEN: u8 = 2;
/// SLP_TYP for S5 in the DSDT's `_S5_`: the value the PM control device acts on.
pub const S5_SLP_TYP: u64 = devices::S5_SLP_TYP as u64;
/// The conventional ISA IRQ for the SCI (the PM1 power button raises it), level-triggered
/// and active high (the MADT's override says so).
pub const SCI_IRQ: u16 = 9;
/// i8042 command port and its "pulse reset line" command: the FADT reset register.
const RESET_PORT: u64 = 0x64;
const RESET_VALUE: u8 = 0xfe;

/// FADT IAPC_BOOT_ARCH flags.
const IAPC_LEGACY_DEVICES: u16 = 1 << 0; // COM1 on the ISA/LPC bus
const IAPC_8042: u16 = 1 << 1; // an i8042 at 0x60/0x64: Linux probes it
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2; // no VGA: don't poke its ports
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5; // no RTC at 0x70/0x71: don't register one

/// FADT flags.
const FADT_WBINVD: u32 = 1 << 0;
const FADT_PROC_C1: u32 = 1 << 2;
const FADT_SLP_BUTTON: u32 = 1 << 5; // no fixed-feature sleep button
const FADT_RESET_REG_SUP: u32 = 1 << 10;

/// Generic Address Structure address space: system I/O.
const GAS_SYSTEM_IO: u8 = 1;
/// GAS access sizes.
const GAS_ACCESS_BYTE: u8 = 1;
const GAS_ACCESS_WORD: u8 = 2;

/// MADT flags: PCAT_COMPAT, dual 8259s present (the in-kernel PIC).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LAPIC: u8 = 0;
const MADT_IOAPIC: u8 = 1;
const MADT_INT_SRC_OVERRIDE: u8 = 2;
/// MPS INTI flags of an interrupt source override: polarity (bits 0-1), trigger (2-3).
const MADT_ACTIVE_HIGH: u16 = 0b01;
const MADT_LEVEL: u16 = 0b11 << 2;
const LAPIC_ENABLED: u32 = 1;
/// The in-kernel I/O APIC resets with ID 0; report what it will answer.
const IOAPIC_ID: u8 = 0;

/// VIOT (ACPI 6.4 5.2.32, Virtual I/O Translation Table): the fixed part after the
/// common header is a node count, the offset of the first node and 8 reserved bytes.
const VIOT_NODES_AT: usize = HEADER_LEN + 12;
/// VIOT node types, and the lengths of the two kinds Ferry writes.
const VIOT_NODE_PCI_RANGE: u8 = 1;
const VIOT_NODE_VIRTIO_IOMMU_PCI: u8 = 3;
const VIOT_PCI_RANGE_LEN: u16 = 24;
const VIOT_VIRTIO_IOMMU_PCI_LEN: u16 = 16;
/// The only PCI segment (MCFG, `_SEG`).
const PCI_SEGMENT: u16 = 0;

/// The BDF (bus << 8 | device << 3 | function) of `function` in `slot` of bus 0.
/// Panics unless `slot` < 32 and `function` < 8.
pub const fn bus0_bdf(slot: u8, function: u8) -> u16 {
    assert!(slot < 32 && function < 8, "no such PCI slot or function");
    ((slot as u16) << 3) | function as u16
}

/// `bb:dd.f`, as lspci and Linux print a BDF.
fn bdf_name(bdf: u16) -> String {
    format!("{:02x}:{:02x}.{}", bdf >> 8, (bdf >> 3) & 0x1f, bdf & 7)
}

/// A `Viot` that would describe something else than a virtio-iommu and its endpoints.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ViotError {
    #[error("VIOT: the virtio-iommu at {} cannot be one of its own endpoints", bdf_name(*.0))]
    IommuIsEndpoint(u16),
}

/// What the VIOT says: one virtio-iommu PCI function on segment 0 and the PCI functions
/// (segment 0) whose DMA it translates. Functions not listed bypass it.
///
/// Each endpoint's ID, the one the guest's virtio-iommu driver names in its requests
/// (ATTACH, ...), is its BDF: [`Viot::endpoint_id`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Viot {
    iommu_bdf: u16,
    /// Ascending, no duplicates.
    endpoints: Vec<u16>,
}

impl Viot {
    /// The virtio-iommu at `iommu_bdf` (e.g. `bus0_bdf(slot, 0)`) in front of the
    /// functions at `endpoints` (any order; a BDF given twice counts once; none is
    /// allowed: the IOMMU then has no endpoint). Refuses the IOMMU as its own endpoint.
    pub fn new(
        iommu_bdf: u16,
        endpoints: impl IntoIterator<Item = u16>,
    ) -> Result<Viot, ViotError> {
        let mut endpoints: Vec<u16> = endpoints.into_iter().collect();
        endpoints.sort_unstable();
        endpoints.dedup();
        if endpoints.binary_search(&iommu_bdf).is_ok() {
            return Err(ViotError::IommuIsEndpoint(iommu_bdf));
        }
        Ok(Viot {
            iommu_bdf,
            endpoints,
        })
    }

    pub fn iommu_bdf(&self) -> u16 {
        self.iommu_bdf
    }

    /// The endpoints' BDFs, ascending.
    pub fn endpoints(&self) -> &[u16] {
        &self.endpoints
    }

    /// The endpoint ID the guest uses for the function at `bdf` on segment 0: every PCI
    /// range node starts its endpoint IDs at its first BDF, so the ID is the BDF.
    pub const fn endpoint_id(bdf: u16) -> u32 {
        bdf as u32
    }

    /// The endpoints as runs of consecutive BDFs, `(first, last)`: one PCI range node
    /// each (a single node when they are contiguous).
    fn ranges(&self) -> Vec<(u16, u16)> {
        let mut out: Vec<(u16, u16)> = Vec::new();
        for &bdf in &self.endpoints {
            match out.last_mut() {
                Some((_, last)) if last.checked_add(1) == Some(bdf) => *last = bdf,
                _ => out.push((bdf, bdf)),
            }
        }
        out
    }
}

/// The VIOT for `v`: the virtio-iommu PCI node first, then one PCI range node per run of
/// endpoints, each naming the virtio-iommu node (by its offset in the table) as its
/// output node.
fn viot(v: &Viot) -> Vec<u8> {
    let ranges = v.ranges();
    let iommu_at = VIOT_NODES_AT as u16;
    let mut t = Sdt::new(b"VIOT", 0);
    t.u16(1 + ranges.len() as u16) // node count
        .u16(iommu_at) // node offset
        .u64(0); // reserved
    debug_assert_eq!(t.0.len(), VIOT_NODES_AT);
    t.u8(VIOT_NODE_VIRTIO_IOMMU_PCI)
        .u8(0) // reserved
        .u16(VIOT_VIRTIO_IOMMU_PCI_LEN)
        .u16(PCI_SEGMENT)
        .u16(v.iommu_bdf)
        .u64(0); // reserved
    for (first, last) in ranges {
        t.u8(VIOT_NODE_PCI_RANGE)
            .u8(0) // reserved
            .u16(VIOT_PCI_RANGE_LEN)
            .u32(Viot::endpoint_id(first)) // endpoint ID of the first BDF
            .u16(PCI_SEGMENT) // segment start
            .u16(PCI_SEGMENT) // segment end
            .u16(first)
            .u16(last)
            .u16(iommu_at) // output node
            .bytes(&[0; 6]); // reserved
    }
    t.finish()
}

/// Sum of all bytes, mod 256.
pub fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

/// A system description table being built: the header, then fields appended in order.
struct Sdt(Vec<u8>);

impl Sdt {
    fn new(signature: &[u8; 4], revision: u8) -> Self {
        let mut v = Vec::with_capacity(256);
        v.extend(signature);
        v.extend([0; 4]); // length, set by finish()
        v.push(revision);
        v.push(0); // checksum, set by finish()
        v.extend(OEM_ID);
        v.extend(OEM_TABLE_ID);
        v.extend(OEM_REVISION.to_le_bytes());
        v.extend(CREATOR_ID);
        v.extend(CREATOR_REVISION.to_le_bytes());
        Sdt(v)
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes(&[v])
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// A Generic Address Structure for an I/O port register.
    fn gas_io(&mut self, port: u64, bit_width: u8, access: u8) -> &mut Self {
        if port == 0 {
            return self.bytes(&[0; 12]);
        }
        self.bytes(&[GAS_SYSTEM_IO, bit_width, 0, access]).u64(port)
    }

    /// Sets the length and checksum.
    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = 0u8.wrapping_sub(byte_sum(&self.0));
        self.0
    }
}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(RSDP_LEN);
    v.extend(b"RSD PTR ");
    v.push(0); // checksum of the first 20 bytes
    v.extend(OEM_ID);
    v.push(2); // revision: ACPI 2.0+, XSDT present
    v.extend(0u32.to_le_bytes()); // no RSDT: every 2.0+ guest reads the XSDT
    v.extend((RSDP_LEN as u32).to_le_bytes());
    v.extend(xsdt.to_le_bytes());
    v.push(0); // extended checksum, of all 36 bytes
    v.extend([0; 3]);
    v[8] = 0u8.wrapping_sub(byte_sum(&v[..20]));
    v[32] = 0u8.wrapping_sub(byte_sum(&v));
    v
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = Sdt::new(b"XSDT", 1);
    for e in entries {
        t.u64(*e);
    }
    t.finish()
}

fn facs() -> Vec<u8> {
    let mut v = vec![0u8; FACS_LEN];
    v[..4].copy_from_slice(b"FACS");
    v[4..8].copy_from_slice(&(FACS_LEN as u32).to_le_bytes());
    v[32] = 2; // version
    v
}

fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut t = Sdt::new(b"FACP", 6);
    t.u32(facs as u32) // FIRMWARE_CTRL
        .u32(dsdt as u32) // DSDT
        .u8(0) // reserved (INT_MODEL in ACPI 1.0)
        .u8(0) // Preferred_PM_Profile: unspecified
        .u16(SCI_IRQ)
        .u32(0) // SMI_CMD: none, the platform is always in ACPI mode
        .u8(0) // ACPI_ENABLE
        .u8(0) // ACPI_DISABLE
        .u8(0) // S4BIOS_REQ
        .u8(0) // PSTATE_CNT
        .u32(u32::from(PM1A_EVT_BLK))
        .u32(0) // PM1b_EVT_BLK
        .u32(u32::from(PM1A_CNT_BLK))
        .u32(0) // PM1b_CNT_BLK
        .u32(0) // PM2_CNT_BLK
        .u32(0) // PM_TMR_BLK: no ACPI PM timer
        .u32(0) // GPE0_BLK
        .u32(0) // GPE1_BLK
        .u8(PM1_EVT_LEN)
        .u8(PM1_CNT_LEN)
        .u8(0) // PM2_CNT_LEN
        .u8(0) // PM_TMR_LEN
        .u8(0) // GPE0_BLK_LEN
        .u8(0) // GPE1_BLK_LEN
        .u8(0) // GPE1_BASE
        .u8(0) // CST_CNT
        .u16(101) // P_LVL2_LAT: > 100, C2 not supported
        .u16(1001) // P_LVL3_LAT: > 1000, C3 not supported
        .u16(0) // FLUSH_SIZE
        .u16(0) // FLUSH_STRIDE
        .u8(0) // DUTY_OFFSET
        .u8(0) // DUTY_WIDTH
        .u8(0) // DAY_ALRM
        .u8(0) // MON_ALRM
        .u8(0) // CENTURY
        .u16(IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT)
        .u8(0) // reserved
        // PWR_BUTTON clear: the power button is the fixed-feature one in PM1 (vm.power-button).
        .u32(FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_RESET_REG_SUP)
        .gas_io(RESET_PORT, 8, GAS_ACCESS_BYTE)
        .u8(RESET_VALUE)
        .u16(0) // ARM_BOOT_ARCH
        .u8(5) // FADT minor version: ACPI 6.5
        // ACPI 6: X_FIRMWARE_CTRL must be zero when FIRMWARE_CTRL is set (and Linux
        // would install the FACS twice otherwise).
        .u64(0) // X_FIRMWARE_CTRL
        .u64(dsdt) // X_DSDT
        .gas_io(PM1A_EVT_BLK.into(), 8 * PM1_EVT_LEN, GAS_ACCESS_WORD)
        .gas_io(0, 0, 0) // X_PM1b_EVT_BLK
        .gas_io(PM1A_CNT_BLK.into(), 8 * PM1_CNT_LEN, GAS_ACCESS_WORD)
        .gas_io(0, 0, 0) // X_PM1b_CNT_BLK
        .gas_io(0, 0, 0) // X_PM2_CNT_BLK
        .gas_io(0, 0, 0) // X_PM_TMR_BLK
        .gas_io(0, 0, 0) // X_GPE0_BLK
        .gas_io(0, 0, 0) // X_GPE1_BLK
        .gas_io(0, 0, 0) // SLEEP_CONTROL_REG (hardware-reduced only)
        .gas_io(0, 0, 0) // SLEEP_STATUS_REG (hardware-reduced only)
        .u64(0); // hypervisor vendor identity
    debug_assert_eq!(t.0.len(), FADT_LEN);
    t.finish()
}

fn madt(ncpus: u8) -> Vec<u8> {
    let mut t = Sdt::new(b"APIC", 5);
    t.u32(LAPIC_ADDR as u32).u32(MADT_PCAT_COMPAT);
    for id in 0..ncpus {
        // Processor Local APIC: ACPI processor UID and APIC ID are the vCPU index.
        t.u8(MADT_LAPIC).u8(8).u8(id).u8(id).u32(LAPIC_ENABLED);
    }
    t.u8(MADT_IOAPIC)
        .u8(12)
        .u8(IOAPIC_ID)
        .u8(0)
        .u32(IOAPIC_ADDR as u32)
        .u32(0); // GSI base
                 // The PIT's IRQ0 is wired to IOAPIC pin 2 (KVM routes it there, like real boards).
    t.u8(MADT_INT_SRC_OVERRIDE)
        .u8(10)
        .u8(0) // bus: ISA
        .u8(0) // source: IRQ0
        .u32(2) // GSI 2
        .u16(0); // flags: conforms to the bus (edge, active high)
                 // The SCI: level-triggered, active high, as the PM device drives its line (an
                 // active-low line would read as always asserted through KVM's IOAPIC).
    t.u8(MADT_INT_SRC_OVERRIDE)
        .u8(10)
        .u8(0) // bus: ISA
        .u8(SCI_IRQ as u8)
        .u32(SCI_IRQ.into())
        .u16(MADT_ACTIVE_HIGH | MADT_LEVEL);
    t.finish()
}

/// The PCI host bridge: bus 0, configuration through 0xCF8 (and ECAM, from MCFG), the
/// I/O ports around it and the memory window the BARs are placed in; `_PRT` gives each
/// slot's INTA the IOAPIC pin the VMM wires it to.
fn pci0() -> Vec<u8> {
    use crate::pci_devices::{intx_gsi, BAR_WINDOW_SIZE, BAR_WINDOW_START};
    let prt: Vec<Vec<u8>> = (1..devices::pci::SLOTS as u8)
        .map(|slot| aml::prt_entry(slot, 0, intx_gsi(slot)))
        .collect();
    let window_end = BAR_WINDOW_START + BAR_WINDOW_SIZE - 1;
    aml::device(
        "PCI0",
        &[
            aml::name("_HID", &aml::integer(aml::eisa_id("PNP0A08").into())),
            aml::name("_CID", &aml::integer(aml::eisa_id("PNP0A03").into())),
            aml::name("_UID", &aml::integer(0)),
            aml::name("_SEG", &aml::integer(0)),
            aml::name("_BBN", &aml::integer(0)),
            aml::name(
                "_CRS",
                &aml::resource_template(&[
                    aml::word_bus_number(0, 0),
                    aml::io_port(
                        devices::pci::CONFIG_IO_PORT,
                        devices::pci::CONFIG_IO_LEN as u8,
                    ),
                    aml::word_io(0x0000, 0x0cf7),
                    aml::word_io(0x0d00, 0xffff),
                    aml::dword_memory(BAR_WINDOW_START as u32, window_end as u32),
                ]),
            ),
            aml::name("_PRT", &aml::package(&prt)),
        ]
        .concat(),
    )
}

fn dsdt() -> Vec<u8> {
    let com1 = aml::device(
        "COM1",
        &[
            aml::name("_HID", &aml::integer(aml::eisa_id("PNP0501").into())),
            aml::name("_UID", &aml::integer(1)),
            aml::name(
                "_CRS",
                &aml::resource_template(&[
                    aml::io_port(devices::COM1_PORT, 8),
                    aml::irq_no_flags(devices::COM1_IRQ as u8),
                ]),
            ),
        ]
        .concat(),
    );
    let kbd = aml::device(
        "PS2K",
        &[
            aml::name("_HID", &aml::integer(aml::eisa_id("PNP0303").into())),
            aml::name(
                "_CRS",
                &aml::resource_template(&[
                    aml::io_port(devices::I8042_PORT, 1),
                    aml::io_port(RESET_PORT as u16, 1),
                    aml::irq_no_flags(1),
                ]),
            ),
        ]
        .concat(),
    );
    let sb = aml::scope("\\_SB", &[com1, kbd, pci0()].concat());
    // _S5_: {SLP_TYPa, SLP_TYPb, reserved, reserved}.
    let s5 = aml::name(
        "_S5",
        &aml::package(&[
            aml::integer(S5_SLP_TYP),
            aml::integer(S5_SLP_TYP),
            aml::integer(0),
            aml::integer(0),
        ]),
    );
    let mut t = Sdt::new(b"DSDT", 2); // revision 2: 64-bit AML integers
    t.bytes(&sb).bytes(&s5);
    t.finish()
}

/// MCFG: where PCI segment 0's ECAM is (bus 0 only).
fn mcfg() -> Vec<u8> {
    let mut t = Sdt::new(b"MCFG", 1);
    t.u64(0) // reserved
        .u64(PCI_ECAM_START)
        .u16(0) // PCI segment group
        .u8(0) // first bus
        .u8(0) // last bus
        .u32(0); // reserved
    t.finish()
}

/// Writes the ACPI tables for `ncpus` vCPUs (APIC IDs 0..ncpus) at `ACPI_START` and
/// returns the RSDP's address, which is `ACPI_START` (where scanning guests look) and
/// what start_info.rsdp_paddr / boot_params.acpi_rsdp_addr should carry. With `viot`,
/// the VM's virtio-iommu and its endpoints are described in a VIOT the XSDT lists;
/// without, there is no VIOT.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    ncpus: u8,
    viot: Option<&Viot>,
) -> Result<GuestAddress, BootError> {
    if ncpus == 0 {
        return Err(BootError::VcpuCount { ncpus: 0 });
    }
    let dsdt = dsdt();
    let madt = madt(ncpus);
    let facs = facs();
    let mcfg = mcfg();
    let viot = viot.map(self::viot);
    let xsdt_len = HEADER_LEN + (3 + usize::from(viot.is_some())) * 8;

    // Lay the tables out one after the other; FACS must be 64-byte aligned.
    let mut next = ACPI_START.0;
    let mut place = |len: usize, align: u64| {
        let at = next.next_multiple_of(align);
        next = at + len as u64;
        at
    };
    let rsdp_at = place(RSDP_LEN, 16);
    let xsdt_at = place(xsdt_len, 16);
    let facs_at = place(facs.len(), 64);
    let fadt_at = place(FADT_LEN, 16);
    let madt_at = place(madt.len(), 16);
    let mcfg_at = place(mcfg.len(), 16);
    let dsdt_at = place(dsdt.len(), 16);
    let viot_at = viot.as_ref().map(|t| place(t.len(), 16));
    if next > ACPI_END {
        return Err(BootError::AcpiTooBig {
            end: next,
            limit: ACPI_END,
        });
    }
    let fadt = fadt(facs_at, dsdt_at);
    let mut entries = vec![fadt_at, madt_at, mcfg_at];
    entries.extend(viot_at);
    let xsdt = xsdt(&entries);
    debug_assert_eq!(xsdt.len(), xsdt_len);
    let rsdp = rsdp(xsdt_at);
    let mut tables = vec![
        ("RSDP", rsdp_at, &rsdp),
        ("XSDT", xsdt_at, &xsdt),
        ("FACS", facs_at, &facs),
        ("FADT", fadt_at, &fadt),
        ("MADT", madt_at, &madt),
        ("MCFG", mcfg_at, &mcfg),
        ("DSDT", dsdt_at, &dsdt),
    ];
    if let (Some(at), Some(t)) = (viot_at, &viot) {
        tables.push(("VIOT", at, t));
    }
    for (what, at, bytes) in tables {
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(|source| BootError::GuestMemory {
                what,
                addr: at,
                source,
            })?;
    }
    Ok(GuestAddress(rsdp_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::layout;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&layout::ram_regions(32 << 20)).unwrap()
    }

    fn read(m: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        m.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// Reads the table at `at`, checking its signature, length and checksum.
    fn table(m: &GuestMemoryMmap, at: u64, sig: &[u8; 4]) -> Vec<u8> {
        let hdr = read(m, at, HEADER_LEN);
        assert_eq!(&hdr[..4], sig, "signature at {at:#x}");
        let len = u32_at(&hdr, 4) as usize;
        assert!(len >= HEADER_LEN);
        let t = read(m, at, len);
        assert_eq!(byte_sum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    /// Walks RSDP -> XSDT -> tables, returning them by signature.
    fn walk(m: &GuestMemoryMmap, rsdp_at: u64) -> Vec<([u8; 4], u64, Vec<u8>)> {
        let rsdp = read(m, rsdp_at, RSDP_LEN);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(byte_sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(byte_sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(&rsdp, 20) as usize, RSDP_LEN);
        let xsdt = table(m, u64_at(&rsdp, 24), b"XSDT");
        xsdt[HEADER_LEN..]
            .chunks_exact(8)
            .map(|e| {
                let at = u64::from_le_bytes(e.try_into().unwrap());
                let sig: [u8; 4] = read(m, at, 4).try_into().unwrap();
                (sig, at, table(m, at, &sig))
            })
            .collect()
    }

    #[test]
    fn tables_parse_back() {
        for ncpus in [1u8, 2, 8, 255] {
            let m = mem();
            let rsdp_at = create_acpi_tables(&m, ncpus, None).unwrap();
            assert_eq!(rsdp_at, ACPI_START);
            let tables = walk(&m, rsdp_at.0);
            let sigs: Vec<_> = tables.iter().map(|t| t.0).collect();
            assert_eq!(sigs, vec![*b"FACP", *b"APIC", *b"MCFG"]);
            let mcfg = &tables[2].2;
            assert_eq!(mcfg.len(), 60, "header, 8 reserved bytes, one allocation");
            assert_eq!(u64_at(mcfg, 44), PCI_ECAM_START);
            assert_eq!(&mcfg[52..56], &[0, 0, 0, 0], "segment 0, buses 0 to 0");
            for (_, at, t) in &tables {
                assert!(*at >= ACPI_START.0 && at + t.len() as u64 <= ACPI_END);
            }

            let madt = &tables[1].2;
            assert_eq!(u32_at(madt, 36), 0xfee0_0000);
            assert_eq!(u32_at(madt, 40) & 1, 1, "PCAT_COMPAT");
            let mut lapic_ids = Vec::new();
            let (mut ioapics, mut overrides) = (0, 0);
            let mut at = 44;
            while at < madt.len() {
                let (kind, len) = (madt[at], usize::from(madt[at + 1]));
                let e = &madt[at..at + len];
                match kind {
                    0 => {
                        assert_eq!(len, 8);
                        assert_eq!(e[2], e[3], "UID = APIC ID");
                        assert_eq!(u32_at(e, 4), 1, "enabled");
                        lapic_ids.push(e[3]);
                    }
                    1 => {
                        assert_eq!(len, 12);
                        assert_eq!(u32_at(e, 4), 0xfec0_0000);
                        assert_eq!(u32_at(e, 8), 0, "GSI base");
                        ioapics += 1;
                    }
                    2 => {
                        assert_eq!(len, 10);
                        let flags = u16::from_le_bytes([e[8], e[9]]);
                        let expected = [(0, 0, 2, 0), (0, 9, 9, 0xd)][overrides];
                        assert_eq!(
                            (e[2], e[3], u32_at(e, 4), flags),
                            expected,
                            "IRQ0 -> GSI2 (bus's polarity and trigger), then the SCI (IRQ9 -> GSI9, level, active high)"
                        );
                        overrides += 1;
                    }
                    k => panic!("unexpected MADT entry type {k}"),
                }
                at += len;
            }
            assert_eq!(at, madt.len(), "entries fill the MADT exactly");
            assert_eq!(lapic_ids, (0..ncpus).collect::<Vec<_>>());
            assert_eq!((ioapics, overrides), (1, 2));
        }
    }

    #[test]
    fn fadt_points_at_dsdt_and_facs() {
        let m = mem();
        let rsdp_at = create_acpi_tables(&m, 2, None).unwrap();
        let tables = walk(&m, rsdp_at.0);
        let fadt = &tables[0].2;
        assert_eq!(fadt.len(), FADT_LEN);
        assert_eq!(fadt[8], 6, "FADT revision");
        let dsdt_at = u64_at(fadt, 140);
        assert_eq!(u64::from(u32_at(fadt, 40)), dsdt_at);
        let facs_at = u64::from(u32_at(fadt, 36));
        assert_eq!(u64_at(fadt, 132), 0, "X_FIRMWARE_CTRL unused");
        assert_eq!(facs_at % 64, 0);
        let facs = read(&m, facs_at, FACS_LEN);
        assert_eq!((&facs[..4], u32_at(&facs, 4)), (&b"FACS"[..], 64));
        // Not hardware-reduced; 8042 present; PM1 blocks where the devices are.
        assert_eq!(u32_at(fadt, 112) & (1 << 20), 0);
        assert_ne!(u16::from_le_bytes([fadt[109], fadt[110]]) & 2, 0);
        assert_eq!(u32_at(fadt, 56), 0x600);
        assert_eq!(u32_at(fadt, 64), u32::from(devices::ACPI_PM1A_CNT_PORT));
        assert_eq!((fadt[88], fadt[89]), (4, 2));
        assert_eq!(fadt[172], 1, "X_PM1a_CNT_BLK is system I/O");
        assert_eq!(u64_at(fadt, 176), u64::from(devices::ACPI_PM1A_CNT_PORT));
        assert_eq!(
            (fadt[116], u64_at(fadt, 120), fadt[128]),
            (1, 0x64, 0xfe),
            "reset reg"
        );

        let dsdt = table(&m, dsdt_at, b"DSDT");
        // The AML is well formed at the top level: \_SB scope, then Name(_S5_, ...).
        let body = &dsdt[HEADER_LEN..];
        assert_eq!(body[0], 0x10);
        let (scope_len, _) = super::super::aml::tests_support::decode_pkg_length(&body[1..]);
        let rest = &body[1 + scope_len..];
        assert_eq!(&rest[..5], b"\x08_S5_");
        assert_eq!(rest[5], 0x12);
        let (pkg_len, _) = super::super::aml::tests_support::decode_pkg_length(&rest[6..]);
        assert_eq!(6 + pkg_len, rest.len(), "nothing after _S5_");
        assert_eq!(rest[6 + 1], 4, "four elements");
        assert_eq!(&rest[8..10], &[0x0a, S5_SLP_TYP as u8]);
        let find = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"COM1") && find(b"PS2K"));
        assert!(find(&0x0105_d041u32.to_le_bytes()), "PNP0501");
    }

    /// ACPICA's disassembler `iasl` (acpica-tools, which scripts/dev_cli.sh installs),
    /// or the one the variable `env` names when set; `None` (the test skips) when there
    /// is none.
    fn iasl(env: Option<&str>) -> Option<std::ffi::OsString> {
        let iasl = env
            .and_then(std::env::var_os)
            .unwrap_or_else(|| "iasl".into());
        let found = std::process::Command::new(&iasl).arg("-v").output().is_ok();
        if !found {
            eprintln!("skipped: no {iasl:?} (apt-get install acpica-tools)");
        }
        found.then_some(iasl)
    }

    /// `iasl -d` of `table` (named `name`): the disassembly text.
    fn disassemble(iasl: &std::ffi::OsStr, name: &str, table: &[u8]) -> String {
        let dir = std::env::temp_dir().join(format!("ferry-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let aml = dir.join(format!("{name}.aml"));
        std::fs::write(&aml, table).unwrap();
        let out = std::process::Command::new(iasl)
            .arg("-d")
            .arg(&aml)
            .current_dir(&dir)
            .output()
            .unwrap();
        let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success() && !dsl.is_empty(),
            "iasl -d {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dsl
    }

    /// The DSDT as ACPICA's disassembler reads it (`iasl -d`): the PCI host bridge with
    /// its windows and `_PRT`.
    #[test]
    fn acpica_reads_the_pci_host_bridge() {
        let Some(iasl) = iasl(None) else {
            return;
        };
        let m = mem();
        let tables = walk(&m, create_acpi_tables(&m, 1, None).unwrap().0);
        let dsdt = table(&m, u64_at(&tables[0].2, 140), b"DSDT");
        let dsl = disassemble(&iasl, "dsdt", &dsdt);
        for needle in [
            "Device (PCI0)",
            "EisaId (\"PNP0A08\")",
            "EisaId (\"PNP0A03\")",
            "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,",
            "0xC0000000,         // Range Minimum",
            "0xDFFFFFFF,         // Range Maximum",
            "0x0CF7,             // Range Maximum",
            "Name (_PRT, Package (0x1F)",
            "0x0001FFFF,",
        ] {
            assert!(dsl.contains(needle), "no {needle:?} in:\n{dsl}");
        }
    }

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }

    /// The virtio-iommu in slot 3; behind it slots 1 and 2 and functions 0 to 2 of
    /// slot 4: three runs of consecutive BDFs.
    fn sample_viot() -> Viot {
        Viot::new(
            bus0_bdf(3, 0),
            [
                bus0_bdf(4, 2),
                bus0_bdf(2, 0),
                bus0_bdf(4, 0),
                bus0_bdf(1, 0),
                bus0_bdf(4, 1),
            ],
        )
        .unwrap()
    }

    /// Every byte of the ACPI area: no VIOT signature in it anywhere.
    fn assert_no_viot(m: &GuestMemoryMmap) {
        let area = read(m, ACPI_START.0, (ACPI_END - ACPI_START.0) as usize);
        assert!(!area.windows(4).any(|w| w == b"VIOT"), "a VIOT was written");
    }

    #[test]
    fn viot_endpoints_become_ranges() {
        assert_eq!(
            (bus0_bdf(0, 0), bus0_bdf(3, 0), bus0_bdf(4, 2)),
            (0, 0x18, 0x22)
        );
        assert_eq!(bus0_bdf(31, 7), 0xff);
        let v = sample_viot();
        assert_eq!(v.iommu_bdf(), 0x18);
        assert_eq!(v.endpoints(), &[0x08, 0x10, 0x20, 0x21, 0x22]);
        assert_eq!(v.ranges(), [(0x08, 0x08), (0x10, 0x10), (0x20, 0x22)]);
        assert_eq!(Viot::endpoint_id(0x21), 0x21);

        // Contiguous endpoints, in any order and repeated: one range.
        let v = Viot::new(0x28, [0x0a, 0x08, 0x09, 0x08]).unwrap();
        assert_eq!(v.endpoints(), &[0x08, 0x09, 0x0a]);
        assert_eq!(v.ranges(), [(0x08, 0x0a)]);
        assert_eq!(
            Viot::new(0, [0xffff, 0xfffe]).unwrap().ranges(),
            [(0xfffe, 0xffff)]
        );
        // No endpoint: only the virtio-iommu node.
        assert!(Viot::new(0x28, []).unwrap().ranges().is_empty());

        let e = Viot::new(0x18, [0x08, 0x18]).unwrap_err();
        assert_eq!(e, ViotError::IommuIsEndpoint(0x18));
        assert_eq!(
            e.to_string(),
            "VIOT: the virtio-iommu at 00:03.0 cannot be one of its own endpoints"
        );
    }

    /// The VIOT is listed in the XSDT when asked for and only then, checksums right,
    /// and reads back as one virtio-iommu node and a PCI range node per run of
    /// endpoints, each pointing at the virtio-iommu node.
    #[test]
    fn viot_is_in_the_xsdt_only_when_asked() {
        let m = mem();
        let without = walk(&m, create_acpi_tables(&m, 2, None).unwrap().0);
        let sigs: Vec<_> = without.iter().map(|t| t.0).collect();
        assert_eq!(sigs, vec![*b"FACP", *b"APIC", *b"MCFG"]);
        assert_no_viot(&m);

        let m = mem();
        let rsdp_at = create_acpi_tables(&m, 2, Some(&sample_viot())).unwrap();
        assert_eq!(rsdp_at, ACPI_START);
        let with = walk(&m, rsdp_at.0);
        let sigs: Vec<_> = with.iter().map(|t| t.0).collect();
        assert_eq!(sigs, vec![*b"FACP", *b"APIC", *b"MCFG", *b"VIOT"]);
        for (a, b) in without.iter().zip(&with) {
            assert_eq!(a.2, b.2, "{} changed", String::from_utf8_lossy(&a.0));
        }
        // No two tables overlap (the DSDT and FACS included), all in the ACPI area.
        let fadt = &with[0].2;
        let dsdt_at = u64_at(fadt, 140);
        let facs_at = u64::from(u32_at(fadt, 36));
        let mut spans: Vec<(u64, u64)> = with
            .iter()
            .map(|(_, at, t)| (*at, at + t.len() as u64))
            .collect();
        spans.push((dsdt_at, dsdt_at + table(&m, dsdt_at, b"DSDT").len() as u64));
        spans.push((facs_at, facs_at + FACS_LEN as u64));
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{:#x?} overlap", w);
        }
        assert!(spans[0].0 >= ACPI_START.0 && spans.last().unwrap().1 <= ACPI_END);

        let (_, viot_at, t) = &with[3];
        assert_eq!(viot_at % 16, 0);
        assert_eq!(t[8], 0, "VIOT revision");
        assert_eq!(t.len(), 48 + 16 + 3 * 24);
        assert_eq!(u16_at(t, 36), 4, "node count");
        assert_eq!(u16_at(t, 38), 48, "node offset");
        assert_eq!(&t[40..48], &[0; 8]);
        // (type, length, then the node's fields) for each node, in order.
        let mut nodes = Vec::new();
        let mut at = usize::from(u16_at(t, 38));
        while at < t.len() {
            let (kind, len) = (t[at], usize::from(u16_at(t, at + 2)));
            assert_eq!(t[at + 1], 0, "reserved");
            let n = &t[at..at + len];
            match kind {
                3 => {
                    assert_eq!(len, 16);
                    assert_eq!(&n[8..], &[0; 8]);
                    nodes.push((at, 3, vec![u16_at(n, 4), u16_at(n, 6)]));
                }
                1 => {
                    assert_eq!(len, 24);
                    assert_eq!(&n[18..], &[0; 6]);
                    assert_eq!(u32_at(n, 4), u32::from(u16_at(n, 12)), "endpoint ID = BDF");
                    let out = usize::from(u16_at(n, 16));
                    assert_eq!(t[out], 3, "the output node is the virtio-iommu");
                    let fields = [8, 10, 12, 14, 16].map(|o| u16_at(n, o));
                    nodes.push((at, 1, fields.to_vec()));
                }
                k => panic!("unexpected VIOT node type {k}"),
            }
            at += len;
        }
        assert_eq!(at, t.len(), "nodes fill the VIOT exactly");
        assert_eq!(
            nodes,
            [
                (48, 3, vec![0, 0x18]),
                (64, 1, vec![0, 0, 0x08, 0x08, 48]),
                (88, 1, vec![0, 0, 0x10, 0x10, 48]),
                (112, 1, vec![0, 0, 0x20, 0x22, 48]),
            ]
        );

        // A virtio-iommu without endpoints: its node alone.
        let m = mem();
        let alone = Viot::new(bus0_bdf(5, 0), []).unwrap();
        let tables = walk(&m, create_acpi_tables(&m, 1, Some(&alone)).unwrap().0);
        let t = &tables[3].2;
        assert_eq!((&tables[3].0, t.len(), u16_at(t, 36)), (b"VIOT", 64, 1));
        assert_eq!((t[48], u16_at(t, 54)), (3, 0x28));
    }

    /// `FieldName : FieldValue` of every field line (`[offset ...] name : value`) of an
    /// `iasl -d` data table disassembly, in order.
    fn dsl_fields(dsl: &str) -> Vec<(String, String)> {
        dsl.lines()
            .filter(|l| l.starts_with('['))
            .filter_map(|l| l.split_once(']')?.1.split_once(" : "))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }

    /// The VIOT as ACPICA's disassembler reads it: the header (and its checksum) with any
    /// iasl; each node's type, BDFs and output node with one that knows VIOT, ACPICA
    /// 20210604 and later. Debian 12's acpica-tools (20200925) is older: there the nodes
    /// are checked with `FERRY_VIOT_IASL=/path/to/a/newer/iasl` only.
    #[test]
    fn acpica_reads_the_viot() {
        let Some(iasl) = iasl(Some("FERRY_VIOT_IASL")) else {
            return;
        };
        let m = mem();
        let tables = walk(
            &m,
            create_acpi_tables(&m, 1, Some(&sample_viot())).unwrap().0,
        );
        let dsl = disassemble(&iasl, "viot", &tables[3].2);
        assert!(!dsl.contains("Incorrect checksum"), "{dsl}");
        let fields = dsl_fields(&dsl);
        let field = |name: &str| {
            let f = fields.iter().find(|(k, _)| k == name);
            f.map(|(_, v)| v.as_str()).unwrap_or_default()
        };
        assert!(field("Signature").starts_with("\"VIOT\""), "{dsl}");
        assert_eq!(field("Table Length"), "00000088", "{dsl}");
        assert_eq!(field("Revision"), "00", "{dsl}");
        if dsl.contains("Unknown ACPI table signature [VIOT]") {
            eprintln!("this iasl predates VIOT: its nodes are not decoded (FERRY_VIOT_IASL may name an ACPICA iasl from 20210604 on)");
            return;
        }
        let header = fields
            .iter()
            .position(|(k, _)| k == "Asl Compiler Revision");
        let body: Vec<(&str, &str)> = fields[header.unwrap() + 1..]
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut want = vec![
            ("Node count", "0004"),
            ("Node offset", "0030"),
            ("Reserved", "0000000000000000"),
            ("Type", "03 [VirtIO-PCI IOMMU]"),
            ("Reserved", "00"),
            ("Length", "0010"),
            ("PCI Segment", "0000"),
            ("PCI BDF number", "0018"),
            ("Reserved", "0000000000000000"),
        ];
        for (first, last) in [
            ("00000008", "0008"),
            ("00000010", "0010"),
            ("00000020", "0022"),
        ] {
            want.extend([
                ("Type", "01 [PCI Range]"),
                ("Reserved", "00"),
                ("Length", "0018"),
                ("Endpoint start", first),
                ("PCI Segment start", "0000"),
                ("PCI Segment end", "0000"),
                ("PCI BDF start", &first[4..]),
                ("PCI BDF end", last),
                ("Output node", "0030"),
                ("Reserved", "000000000000"),
            ]);
        }
        assert_eq!(body, want, "{dsl}");
    }

    /// A configuration with no iommu anywhere (the default, or every device's iommu
    /// off) needs no virtio-iommu, so the VM builder passes no VIOT and none is
    /// written; one device with iommu on is enough to need one.
    #[test]
    fn a_config_without_iommu_gets_no_viot() {
        use crate::config::{parse_disk, parse_rng, VmConfig};
        let off = VmConfig {
            disks: vec![
                parse_disk("path=/a.raw").unwrap(),
                parse_disk("path=/b.raw,iommu=off").unwrap(),
            ],
            rng: Some(parse_rng("src=/dev/urandom,iommu=false").unwrap()),
            ..Default::default()
        };
        // The endpoints such a builder would list: the devices with iommu on.
        let viot_for = |c: &VmConfig| {
            c.viommu_needed().then(|| {
                let on = c
                    .disks
                    .iter()
                    .map(|d| d.iommu)
                    .chain(c.rng.iter().map(|r| r.iommu));
                let slots = (1u8..).zip(on).filter(|(_, on)| *on);
                Viot::new(bus0_bdf(4, 0), slots.map(|(s, _)| bus0_bdf(s, 0))).unwrap()
            })
        };
        for c in [VmConfig::default(), off.clone()] {
            assert!(!c.viommu_needed());
            let m = mem();
            let tables = walk(
                &m,
                create_acpi_tables(&m, 1, viot_for(&c).as_ref()).unwrap().0,
            );
            assert!(tables.iter().all(|t| &t.0 != b"VIOT"));
            assert_no_viot(&m);
        }

        let mut on = off;
        on.disks[1].iommu = true;
        let viot = viot_for(&on).unwrap();
        assert_eq!(viot.endpoints(), &[bus0_bdf(2, 0)]);
        let m = mem();
        let tables = walk(&m, create_acpi_tables(&m, 1, Some(&viot)).unwrap().0);
        assert_eq!(&tables[3].0, b"VIOT");
    }

    #[test]
    fn zero_cpus_is_refused() {
        let e = create_acpi_tables(&mem(), 0, None).unwrap_err().to_string();
        assert!(e.contains('0'), "{e}");
    }
}

//! The guest physical address map: where RAM is, what the guest is told about it (e820 /
//! PVH memmap), and the fixed addresses of everything the VMM writes before the first
//! vCPU instruction.
//!
//! ```text
//! 0x0000_0000  real-mode IVT + BIOS data area (RAM, left alone)
//! 0x0000_1000  BOOT_GDT_ADDR         GDT for both boot protocols
//! 0x0000_2000  PVH_START_INFO_ADDR   hvm_start_info            (PVH)
//! 0x0000_2100  PVH_MODLIST_ADDR      hvm_modlist_entry[1]      (PVH, with an initramfs)
//! 0x0000_3000  PVH_MEMMAP_ADDR       hvm_memmap_table_entry[]  (PVH)
//! 0x0000_7000  ZERO_PAGE_ADDR        boot_params               (Linux)
//! 0x0000_8ff0  BOOT_STACK_POINTER    initial rsp               (Linux)
//! 0x0000_9000  PML4_ADDR, PDPT_ADDR, PD_ADDR..+4 pages: identity map of 0-4 GiB (Linux)
//! 0x0001_0000  CMDLINE_ADDR          kernel command line, up to CMDLINE_MAX_SIZE
//! 0x0002_0000  (free: the PVH test guest is linked at 0x20000-0x9f000)
//! 0x0009_fc00  EBDA_START            reserved up to 1 MiB
//! 0x000e_0000  ACPI_START            RSDP, XSDT, FADT, FACS, MADT, DSDT
//! 0x0010_0000  HIMEM_START           bzImage load address; guests' memory from here
//! 0xc000_0000  MMIO_HOLE_START       32-bit MMIO hole (PCI ECAM, IOAPIC, LAPIC)
//! 0xe000_0000  PCI_ECAM_START        ECAM of PCI bus 0 (1 MiB, announced by MCFG)
//! 0x1_0000_0000 HIGH_RAM_START       RAM above 3 GiB continues here
//! ```

use vm_memory::GuestAddress;

/// 1 MiB: the real-mode world ends here and kernels load from here up.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the Extended BIOS Data Area: conventional memory ends here, and the e820 map
/// reports everything from here to 1 MiB as reserved.
pub const EBDA_START: u64 = 0x9_fc00;
/// Low RAM ends at 3 GiB at most; [3 GiB, 4 GiB) is the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// RAM above the hole starts at 4 GiB.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// ECAM of PCI bus 0 (configuration space, 4 KiB per function) in the MMIO hole.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = devices::pci::ECAM_BUS_SIZE;
/// The I/O APIC (KVM's in-kernel one) in the MMIO hole.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APICs' default base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// The GDT shared by both boot protocols. Below 0x20000 so it never lands in the PVH
/// test guest's image.
pub const BOOT_GDT_ADDR: GuestAddress = GuestAddress(0x1000);
/// `hvm_start_info` for PVH boots (its address goes to the guest in %ebx).
pub const PVH_START_INFO_ADDR: GuestAddress = GuestAddress(0x2000);
/// The PVH module list (one entry: the initramfs).
pub const PVH_MODLIST_ADDR: GuestAddress = GuestAddress(0x2100);
/// The PVH memory map table.
pub const PVH_MEMMAP_ADDR: GuestAddress = GuestAddress(0x3000);
/// Entries that fit between `PVH_MEMMAP_ADDR` and the next page (24 bytes each).
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 0x1000 / 24;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_ADDR: GuestAddress = GuestAddress(0x7000);
/// Initial stack pointer for a Linux boot: the top of the free page below the page tables
/// (the kernel switches to its own stack at once; this only makes an early push safe).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 of the boot identity map.
pub const PML4_ADDR: GuestAddress = GuestAddress(0x9000);
/// The one page-directory-pointer table (covers 512 GiB, 4 entries used).
pub const PDPT_ADDR: GuestAddress = GuestAddress(0xa000);
/// First of `IDENTITY_MAP_GIB` page directories of 2 MiB pages, one page each.
pub const PD_ADDR: GuestAddress = GuestAddress(0xb000);
/// Size of the boot identity map in GiB: all of low RAM plus the MMIO hole, so the
/// kernel, boot_params, cmdline and initramfs are mapped wherever they sit below 4 GiB.
pub const IDENTITY_MAP_GIB: u64 = 4;
/// Kernel command line for both protocols.
pub const CMDLINE_ADDR: GuestAddress = GuestAddress(0x1_0000);
/// Room for the command line, including its NUL: up to `BOOT_AREA_END`.
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// Start of the VMM-written boot structures (GDT, start_info, memmap, zero page, page
/// tables, cmdline). Kernel segments must stay out of [BOOT_AREA_START, BOOT_AREA_END).
pub const BOOT_AREA_START: u64 = 0x1000;
/// End (exclusive) of the VMM-written boot structures.
pub const BOOT_AREA_END: u64 = 0x2_0000;
/// ACPI tables, RSDP first: in the BIOS read-only area guests scan for "RSD PTR ".
pub const ACPI_START: GuestAddress = GuestAddress(0xe_0000);
/// End (exclusive) of the ACPI area.
pub const ACPI_END: u64 = HIMEM_START;
/// Where a bzImage's protected-mode kernel goes (the boot protocol's default for
/// LOADED_HIGH kernels).
pub const KERNEL_LOAD_ADDR: GuestAddress = GuestAddress(HIMEM_START);

/// Smallest guest RAM the layout works with: every fixed structure lives below 1 MiB.
/// Kernels need more; `load_kernel` checks that against the image.
pub const MIN_MEM_SIZE: u64 = HIMEM_START;
/// Guest RAM size granularity: KVM memory slots are made of whole 4 KiB pages.
pub const MEM_SIZE_ALIGN: u64 = 0x1000;

// Checked at compile time: ACPI stays in the BIOS area guests scan, the boot stack in the
// free page between the zero page and the page tables.
const _: () = assert!(ACPI_START.0 >= 0xe_0000 && ACPI_END <= HIMEM_START);
const _: () =
    assert!(BOOT_STACK_POINTER > ZERO_PAGE_ADDR.0 + 0x1000 && BOOT_STACK_POINTER < PML4_ADDR.0);

/// What the e820 map / PVH memmap says a range is. The values are shared by both formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MemoryType {
    Ram = 1,
    Reserved = 2,
    Acpi = 3,
}

/// One entry of the memory map shown to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: MemoryType,
}

impl MemoryMapEntry {
    pub fn end(&self) -> u64 {
        self.addr + self.size
    }
}

/// Bytes of RAM below the MMIO hole for a guest of `size` bytes.
pub fn low_ram_size(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

/// Bytes of RAM above 4 GiB for a guest of `size` bytes.
pub fn high_ram_size(size: u64) -> u64 {
    size.saturating_sub(MMIO_HOLE_START)
}

/// The guest RAM regions for `size` bytes: [0, min(size, 3 GiB)) and the rest from 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    let mut regions = Vec::with_capacity(2);
    let low = low_ram_size(size);
    if low > 0 {
        regions.push((GuestAddress(0), low as usize));
    }
    let high = high_ram_size(size);
    if high > 0 {
        regions.push((GuestAddress(HIGH_RAM_START), high as usize));
    }
    regions
}

/// The memory map the guest sees (e820 for Linux, the PVH memmap): RAM below the EBDA,
/// the EBDA/BIOS area reserved (it holds the ACPI tables), RAM from 1 MiB to the end of
/// low RAM, and RAM above 4 GiB. Meant for sizes of at least `MIN_MEM_SIZE`; smaller
/// sizes give a map clipped to `size`.
pub fn memory_map(size: u64) -> Vec<MemoryMapEntry> {
    let low_end = low_ram_size(size);
    let mut map = Vec::with_capacity(4);
    let mut push = |addr: u64, end: u64, kind| {
        if end > addr {
            map.push(MemoryMapEntry {
                addr,
                size: end - addr,
                kind,
            });
        }
    };
    push(0, low_end.min(EBDA_START), MemoryType::Ram);
    push(EBDA_START, low_end.min(HIMEM_START), MemoryType::Reserved);
    push(HIMEM_START, low_end, MemoryType::Ram);
    push(
        HIGH_RAM_START,
        HIGH_RAM_START + high_ram_size(size),
        MemoryType::Ram,
    );
    map
}

/// Checks that `size` bytes of guest RAM can hold the fixed layout and be mapped by KVM.
pub fn check_mem_size(size: u64) -> Result<(), super::BootError> {
    if size < MIN_MEM_SIZE {
        return Err(super::BootError::MemoryTooSmall {
            mem_size: size,
            needed: MIN_MEM_SIZE,
            what: "the fixed boot structures below 1 MiB".into(),
        });
    }
    if !size.is_multiple_of(MEM_SIZE_ALIGN) {
        return Err(super::BootError::MemorySizeUnaligned {
            mem_size: size,
            align: MEM_SIZE_ALIGN,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn ram(addr: u64, end: u64) -> MemoryMapEntry {
        MemoryMapEntry {
            addr,
            size: end - addr,
            kind: MemoryType::Ram,
        }
    }

    fn reserved_bios() -> MemoryMapEntry {
        MemoryMapEntry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: MemoryType::Reserved,
        }
    }

    #[test]
    fn layout_128m() {
        let size = 128 * MIB;
        assert_eq!(ram_regions(size), vec![(GuestAddress(0), size as usize)]);
        assert_eq!(
            memory_map(size),
            vec![ram(0, EBDA_START), reserved_bios(), ram(HIMEM_START, size)]
        );
    }

    #[test]
    fn layout_3g_fills_low_ram_exactly() {
        let size = 3 * GIB;
        assert_eq!(ram_regions(size), vec![(GuestAddress(0), size as usize)]);
        assert_eq!(
            memory_map(size),
            vec![
                ram(0, EBDA_START),
                reserved_bios(),
                ram(HIMEM_START, 3 * GIB)
            ]
        );
    }

    #[test]
    fn layout_4g_splits_around_the_hole() {
        let size = 4 * GIB;
        assert_eq!(
            ram_regions(size),
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), GIB as usize)
            ]
        );
        assert_eq!(
            memory_map(size),
            vec![
                ram(0, EBDA_START),
                reserved_bios(),
                ram(HIMEM_START, 3 * GIB),
                ram(4 * GIB, 5 * GIB)
            ]
        );
    }

    #[test]
    fn layout_16g() {
        let size = 16 * GIB;
        let regions = ram_regions(size);
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), (13 * GIB) as usize)
            ]
        );
        assert_eq!(regions.iter().map(|r| r.1 as u64).sum::<u64>(), size);
        let map = memory_map(size);
        assert_eq!(map.last(), Some(&ram(4 * GIB, 17 * GIB)));
        // The hole holds the APICs and never appears as RAM.
        for e in &map {
            assert!(
                e.end() <= MMIO_HOLE_START || e.addr >= HIGH_RAM_START,
                "{e:?}"
            );
        }
        assert!((MMIO_HOLE_START..HIGH_RAM_START).contains(&IOAPIC_ADDR));
        assert!((MMIO_HOLE_START..HIGH_RAM_START).contains(&LAPIC_ADDR));
    }

    #[test]
    fn ram_in_map_equals_ram_regions() {
        for size in [MIN_MEM_SIZE, 128 * MIB, 3 * GIB, 4 * GIB, 16 * GIB] {
            let map_ram: u64 = memory_map(size)
                .iter()
                .filter(|e| e.kind == MemoryType::Ram)
                .map(|e| e.size)
                .sum();
            // The reserved BIOS window is backed by RAM but not offered to the guest.
            assert_eq!(map_ram + HIMEM_START - EBDA_START, size, "size {size:#x}");
        }
    }

    #[test]
    fn fixed_structures_stay_out_of_the_pvh_guest_and_its_workload() {
        // The PVH test guest is linked at 0x20000-0x9f000 and uses RAM from 1 MiB up.
        let low: [(GuestAddress, u64); 8] = [
            (BOOT_GDT_ADDR, 0x30),
            (PVH_START_INFO_ADDR, 56),
            (PVH_MODLIST_ADDR, 32),
            (PVH_MEMMAP_ADDR, (PVH_MEMMAP_MAX_ENTRIES * 24) as u64),
            (ZERO_PAGE_ADDR, 0x1000),
            (PML4_ADDR, 0x2000),
            (PD_ADDR, IDENTITY_MAP_GIB * 0x1000),
            (CMDLINE_ADDR, CMDLINE_MAX_SIZE as u64),
        ];
        for (addr, len) in low {
            assert!(addr.0 >= BOOT_AREA_START && addr.0 + len <= BOOT_AREA_END);
        }
        // No two of them overlap.
        for (i, a) in low.iter().enumerate() {
            for b in &low[i + 1..] {
                assert!(
                    a.0 .0 + a.1 <= b.0 .0 || b.0 .0 + b.1 <= a.0 .0,
                    "{a:?} {b:?}"
                );
            }
        }
    }

    #[test]
    fn mem_size_checks_name_the_size() {
        assert!(check_mem_size(MIN_MEM_SIZE).is_ok());
        let e = check_mem_size(0x8_0000).unwrap_err().to_string();
        assert!(e.contains("0x80000") && e.contains("0x100000"), "{e}");
        let e = check_mem_size(128 * MIB + 1).unwrap_err().to_string();
        assert!(e.contains("0x8000001"), "{e}");
    }
}

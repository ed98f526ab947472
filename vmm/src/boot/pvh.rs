//! PVH boot: an ELF kernel with a `XEN_ELFNOTE_PHYS32_ENTRY` note, entered in 32-bit
//! protected mode without paging, with `hvm_start_info` in %ebx.
//! Protocol: <https://xenbits.xen.org/docs/unstable/misc/pvh.html>.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_sregs};
use linux_loader::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{Bytes, GuestAddress};

use super::elf::{self, ElfImage};
use super::gdt::{self, CODE32_SELECTOR};
use super::layout::{
    self, BOOT_AREA_END, BOOT_AREA_START, EBDA_START, HIGH_RAM_START, HIMEM_START, MMIO_HOLE_START,
    PVH_MEMMAP_ADDR, PVH_MEMMAP_MAX_ENTRIES, PVH_MODLIST_ADDR, PVH_START_INFO_ADDR,
};
use super::{write_zeroes, BootError};
use crate::memory::GuestMemoryMmap;

/// CR0.PE: protected mode.
const X86_CR0_PE: u64 = 1 << 0;
/// CR0.ET: hard-wired to 1 on every CPU since the 486; KVM reports it set.
const X86_CR0_ET: u64 = 1 << 4;
/// EFLAGS bit 1 is reserved and always 1.
const EFLAGS_RESERVED: u64 = 1 << 1;

/// Reserved ranges no kernel segment may cover, with what they are.
const FORBIDDEN: [(u64, u64, &str); 3] = [
    (BOOT_AREA_START, BOOT_AREA_END, "the VMM's boot structures"),
    (EBDA_START, HIMEM_START, "the reserved EBDA/BIOS/ACPI area"),
    (MMIO_HOLE_START, HIGH_RAM_START, "the MMIO hole"),
];

/// RAM size a guest needs for [.., end) to be backed, given the hole at 3-4 GiB.
fn ram_needed_for(end: u64) -> u64 {
    if end > HIGH_RAM_START {
        end - (HIGH_RAM_START - MMIO_HOLE_START)
    } else {
        end.min(MMIO_HOLE_START)
    }
}

/// Checks every segment against the layout of a `mem_size`-byte guest: no overlap with
/// reserved ranges, all inside RAM.
pub fn check_segments(path: &Path, img: &ElfImage, mem_size: u64) -> Result<(), BootError> {
    for s in &img.segments {
        for (start, end, what) in FORBIDDEN {
            if s.paddr < end && start < s.end() {
                return Err(BootError::KernelOverlap {
                    path: path.to_path_buf(),
                    start: s.paddr,
                    end: s.end(),
                    what,
                    area_start: start,
                    area_end: end,
                });
            }
        }
        let needed = ram_needed_for(s.end());
        if needed > mem_size {
            return Err(BootError::MemoryTooSmall {
                mem_size,
                needed,
                what: format!(
                    "kernel {} segment [{:#x}, {:#x})",
                    path.display(),
                    s.paddr,
                    s.end()
                ),
            });
        }
    }
    Ok(())
}

/// Parses the PVH ELF in `file`, checks it fits the layout, and copies its segments to
/// guest memory (zeroing each segment's tail beyond its file bytes, i.e. `.bss`).
/// Returns the PVH entry point and the end of the highest segment.
pub fn load_pvh_elf(
    mem: &GuestMemoryMmap,
    path: &Path,
    file: &mut File,
    mem_size: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let invalid = |source| BootError::InvalidElf {
        path: path.to_path_buf(),
        source,
    };
    let img = elf::parse(file).map_err(invalid)?;
    let entry = img.pvh_entry.ok_or_else(|| BootError::NoPvhNote {
        path: path.to_path_buf(),
    })?;
    check_segments(path, &img, mem_size)?;
    for s in &img.segments {
        file.seek(SeekFrom::Start(s.offset))
            .map_err(|e| invalid(e.into()))?;
        mem.read_exact_volatile_from(GuestAddress(s.paddr), file, s.filesz as usize)
            .map_err(|source| BootError::GuestMemory {
                what: "kernel segment",
                addr: s.paddr,
                source,
            })?;
        // The RAM may be reused (reboot), so `.bss` is zeroed rather than assumed zero.
        write_zeroes(mem, s.paddr + s.filesz, s.memsz - s.filesz, "kernel .bss")?;
    }
    let end = img.segments.iter().map(|s| s.end()).max().unwrap_or(0);
    Ok((GuestAddress(entry), end))
}

/// Writes `hvm_start_info` at `PVH_START_INFO_ADDR`, with the memory map of a
/// `mem_size`-byte guest at `PVH_MEMMAP_ADDR` and, with an initramfs, a one-module list
/// at `PVH_MODLIST_ADDR`. The command line must already be at `cmdline`.
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cmdline: GuestAddress,
    rsdp: Option<GuestAddress>,
    initramfs: Option<(GuestAddress, u64)>,
) -> Result<GuestAddress, BootError> {
    let write_err = |what, addr: GuestAddress| {
        move |source| BootError::GuestMemory {
            what,
            addr: addr.0,
            source,
        }
    };
    let map = layout::memory_map(mem_size);
    // The layout has at most four entries; the table has room for many more.
    assert!(map.len() <= PVH_MEMMAP_MAX_ENTRIES);
    for (i, e) in map.iter().enumerate() {
        let addr =
            GuestAddress(PVH_MEMMAP_ADDR.0 + (i * size_of::<hvm_memmap_table_entry>()) as u64);
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        };
        mem.write_obj(entry, addr)
            .map_err(write_err("PVH memory map", addr))?;
    }

    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: cmdline.0,
        rsdp_paddr: rsdp.map_or(0, |a| a.0),
        memmap_paddr: PVH_MEMMAP_ADDR.0,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initramfs {
        let module = hvm_modlist_entry {
            paddr: addr.0,
            size,
            ..Default::default()
        };
        mem.write_obj(module, PVH_MODLIST_ADDR)
            .map_err(write_err("PVH module list", PVH_MODLIST_ADDR))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR.0;
    }
    mem.write_obj(info, PVH_START_INFO_ADDR)
        .map_err(write_err("PVH start info", PVH_START_INFO_ADDR))?;
    Ok(PVH_START_INFO_ADDR)
}

/// General registers at the PVH entry: %eip = entry, %ebx = start_info, flags clear.
pub fn pvh_regs(entry: GuestAddress, start_info: GuestAddress) -> kvm_regs {
    kvm_regs {
        rip: entry.0,
        rbx: start_info.0,
        rflags: EFLAGS_RESERVED,
        ..Default::default()
    }
}

/// Patches `sregs` (as read from the vCPU, so APIC base and friends survive) for the PVH
/// entry: protected mode, paging off, flat 32-bit segments from the boot GDT, a busy
/// 32-bit TSS in TR, CR4 and EFER clear.
pub fn setup_sregs_pvh(sregs: &mut kvm_sregs) {
    gdt::load_boot_segments(sregs, CODE32_SELECTOR);
    // PVH: "bit 0 (PE) must be set. All the other writeable bits are cleared."
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

#[cfg(test)]
mod tests {
    use super::super::elf::build::{elf, pvh_note};
    use super::super::layout::{MemoryType, ZERO_PAGE_ADDR};
    use super::*;
    use std::io::Write;

    const MEM: u64 = 64 << 20;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&layout::ram_regions(size)).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("ferry-pvh-{}-{name}", std::process::id()));
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn start_info_reads_back() {
        let m = mem(MEM);
        let si = write_start_info(
            &m,
            MEM,
            GuestAddress(0x1_0000),
            Some(GuestAddress(0xe_0000)),
            Some((GuestAddress(0x300_0000), 0x1234)),
        )
        .unwrap();
        assert_eq!(si, PVH_START_INFO_ADDR);
        let info: hvm_start_info = m.read_obj(si).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.flags, 0);
        assert_eq!(info.cmdline_paddr, 0x1_0000);
        assert_eq!(info.rsdp_paddr, 0xe_0000);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x1234));

        let map = layout::memory_map(MEM);
        assert_eq!(info.memmap_entries as usize, map.len());
        for (i, want) in map.iter().enumerate() {
            let e: hvm_memmap_table_entry = m
                .read_obj(GuestAddress(info.memmap_paddr + 24 * i as u64))
                .unwrap();
            assert_eq!(
                (e.addr, e.size, e.type_),
                (want.addr, want.size, want.kind as u32)
            );
        }
        let first: hvm_memmap_table_entry = m.read_obj(PVH_MEMMAP_ADDR).unwrap();
        assert_eq!((first.addr, first.size, first.type_), (0, 0x9_fc00, 1));
        let ebda: hvm_memmap_table_entry =
            m.read_obj(GuestAddress(PVH_MEMMAP_ADDR.0 + 24)).unwrap();
        assert_eq!(ebda.type_, MemoryType::Reserved as u32);
    }

    #[test]
    fn start_info_without_initramfs_or_acpi() {
        let m = mem(MEM);
        write_start_info(&m, MEM, GuestAddress(0x1_0000), None, None).unwrap();
        let info: hvm_start_info = m.read_obj(PVH_START_INFO_ADDR).unwrap();
        assert_eq!(
            (info.nr_modules, info.modlist_paddr, info.rsdp_paddr),
            (0, 0, 0)
        );
    }

    #[test]
    fn loads_segments_and_zeroes_bss() {
        let code: Vec<u8> = (1..=200u8).collect();
        let path = temp_file(
            "load",
            &elf(32, 0x2_0000, &code, 0x2000, &[pvh_note(0x2_0010)]),
        );
        let m = mem(MEM);
        // Dirty the .bss range first: loading must clear it.
        m.write_slice(&[0xaa; 0x2000], GuestAddress(0x2_0000 + 200))
            .unwrap();
        let (entry, end) = load_pvh_elf(&m, &path, &mut File::open(&path).unwrap(), MEM).unwrap();
        assert_eq!(entry, GuestAddress(0x2_0010));
        assert_eq!(end, 0x2_0000 + 200 + 0x2000);
        let mut back = vec![0u8; 200];
        m.read_slice(&mut back, GuestAddress(0x2_0000)).unwrap();
        assert_eq!(back, code);
        let mut bss = vec![1u8; 0x2000];
        m.read_slice(&mut bss, GuestAddress(0x2_0000 + 200))
            .unwrap();
        assert!(bss.iter().all(|&b| b == 0));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn segments_must_fit_the_layout() {
        let check = |paddr: u64, len: u64, size: u64| {
            let img = ElfImage {
                bits: 64,
                segments: vec![elf::Segment {
                    offset: 0,
                    paddr,
                    filesz: 0,
                    memsz: len,
                }],
                pvh_entry: Some(paddr),
            };
            check_segments(Path::new("/k"), &img, size).map_err(|e| e.to_string())
        };
        assert!(check(0x2_0000, 0x7_f000, MEM).is_ok());
        assert!(check(0x10_0000, 0x10_0000, MEM).is_ok());
        assert!(check(HIGH_RAM_START, 0x1000, 5 << 30).is_ok());
        let e = check(ZERO_PAGE_ADDR.0, 0x100, MEM).unwrap_err();
        assert!(e.contains("boot structures") && e.contains("0x7000"), "{e}");
        let e = check(0x9_f000, 0x1000, MEM).unwrap_err();
        assert!(e.contains("EBDA"), "{e}");
        let e = check(0xfec0_0000, 0x1000, 8 << 30).unwrap_err();
        assert!(e.contains("MMIO hole"), "{e}");
        let e = check(0x10_0000, 64 << 20, MEM).unwrap_err();
        assert!(e.contains("0x4000000") && e.contains("0x4100000"), "{e}");
        // Above 4 GiB the hole does not count as needed RAM.
        let e = check(HIGH_RAM_START, 0x1000, 3 << 30).unwrap_err();
        assert!(e.contains("0xc0001000"), "{e}");
    }

    #[test]
    fn elf_without_note_is_rejected_by_path() {
        let path = temp_file("nonote", &elf(64, 0x10_0000, &[0; 16], 0, &[]));
        let e = load_pvh_elf(&mem(MEM), &path, &mut File::open(&path).unwrap(), MEM).unwrap_err();
        assert!(matches!(e, BootError::NoPvhNote { .. }));
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn registers_follow_the_pvh_abi() {
        let regs = pvh_regs(GuestAddress(0x2_0010), PVH_START_INFO_ADDR);
        assert_eq!((regs.rip, regs.rbx, regs.rflags), (0x2_0010, 0x2000, 2));
        let mut s = kvm_sregs {
            cr0: 0x6000_0010,
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        s.cs.selector = 0xf000;
        setup_sregs_pvh(&mut s);
        assert_eq!(s.cr0, 0x11);
        assert_eq!((s.cr3, s.cr4, s.efer), (0, 0, 0));
        assert_eq!(s.apic_base, 0xfee0_0900, "unrelated state is kept");
        assert_eq!(
            (s.cs.base, s.cs.limit, s.cs.db, s.cs.l, s.cs.type_),
            (0, 0xffff_ffff, 1, 0, 0xb)
        );
        for seg in [s.ds, s.es, s.ss] {
            assert_eq!(
                (seg.base, seg.limit, seg.type_, seg.db),
                (0, 0xffff_ffff, 3, 1)
            );
        }
        assert_eq!(
            (s.tr.base, s.tr.limit, s.tr.type_, s.tr.present),
            (0, 0x67, 0xb, 1)
        );
        assert_eq!(s.gdt.base, layout::BOOT_GDT_ADDR.0);
    }
}

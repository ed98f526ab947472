//! Linux bzImage direct boot through the 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst): the protected-mode kernel at 1 MiB, `boot_params`
//! filled in by the VMM, and the vCPU already in long mode on an identity map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_sregs};
use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::gdt::{self, CODE64_SELECTOR};
use super::layout::{
    self, BOOT_STACK_POINTER, CMDLINE_MAX_SIZE, HIMEM_START, IDENTITY_MAP_GIB, KERNEL_LOAD_ADDR,
    PDPT_ADDR, PD_ADDR, PML4_ADDR, ZERO_PAGE_ADDR,
};
use super::BootError;
use crate::memory::GuestMemoryMmap;

/// File offset of the setup header.
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// `boot_flag`: the boot sector signature.
const BOOT_FLAG: u16 = 0xaa55;
/// `header`: "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// First protocol version with `xloadflags` (and so a declared 64-bit entry).
const MIN_PROTOCOL: u16 = 0x020c;
/// `loadflags.LOADED_HIGH`: the protected-mode kernel is loaded at 1 MiB.
const LOADED_HIGH: u8 = 0x01;
/// `xloadflags.XLF_KERNEL_64`: the kernel has the 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 0x01;
/// Offset of the 64-bit entry point from the load address.
const ENTRY_64_OFFSET: u64 = 0x200;
/// `type_of_loader` for a boot loader without an assigned id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFLAGS_RESERVED: u64 = 1 << 1;

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;

/// Reads the setup header if `file` looks like a bzImage (boot sector signature and
/// "HdrS"); `None` for anything else, including files too short to have one.
pub fn read_setup_header(file: &mut File) -> std::io::Result<Option<setup_header>> {
    let mut hdr = setup_header::default();
    file.seek(SeekFrom::Start(SETUP_HEADER_OFFSET))?;
    match file.read_exact(hdr.as_mut_slice()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let (flag, magic) = (hdr.boot_flag, hdr.header);
    Ok((flag == BOOT_FLAG && magic == HDRS_MAGIC).then_some(hdr))
}

/// Where the kernel will run and how far its early footprint reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFootprint {
    /// Address the decompressor moves the kernel to (before any KASLR choice).
    pub runtime_start: u64,
    /// End of the memory the kernel needs before it reads the memory map.
    pub end: u64,
}

/// Checks the header is one we can boot (64-bit entry, loads high) and computes the
/// kernel's early footprint when loaded at `KERNEL_LOAD_ADDR`, `payload` bytes long.
pub fn check_header(
    path: &Path,
    hdr: &setup_header,
    payload: u64,
) -> Result<KernelFootprint, BootError> {
    let invalid = |reason: String| BootError::InvalidBzImage {
        path: path.to_path_buf(),
        reason,
    };
    let version = hdr.version;
    if version < MIN_PROTOCOL {
        return Err(invalid(format!(
            "boot protocol {}.{:02} is older than 2.12, the first with a 64-bit entry",
            version >> 8,
            version & 0xff
        )));
    }
    let xloadflags = hdr.xloadflags;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(invalid(format!(
            "no 64-bit entry point (xloadflags {xloadflags:#x} lacks XLF_KERNEL_64)"
        )));
    }
    let loadflags = hdr.loadflags;
    if loadflags & LOADED_HIGH == 0 {
        return Err(invalid(format!(
            "not a bzImage: loadflags {loadflags:#x} lacks LOADED_HIGH"
        )));
    }
    // The decompressor moves itself to max(load address aligned up to kernel_alignment,
    // pref_address) (or to pref_address when not relocatable) and needs init_size there.
    let load = KERNEL_LOAD_ADDR.0;
    let pref = hdr.pref_address;
    let align = u64::from(hdr.kernel_alignment).max(1);
    let runtime_start = if hdr.relocatable_kernel != 0 {
        load.next_multiple_of(align).max(pref)
    } else {
        pref
    };
    let end = runtime_start
        .checked_add(u64::from(hdr.init_size))
        .ok_or_else(|| invalid(format!("init_size {:#x} overflows", { hdr.init_size })))?
        .max(load + payload);
    Ok(KernelFootprint { runtime_start, end })
}

/// Longest command line the kernel accepts, without the NUL.
pub fn cmdline_limit(hdr: &setup_header) -> usize {
    (hdr.cmdline_size as usize).min(CMDLINE_MAX_SIZE - 1)
}

/// End (exclusive) of the range an initramfs may occupy for this kernel in a
/// `mem_size`-byte guest.
pub fn initramfs_limit(hdr: &setup_header, mem_size: u64) -> u64 {
    (u64::from(hdr.initrd_addr_max) + 1).min(layout::low_ram_size(mem_size))
}

/// Checks the bzImage in `file` fits a `mem_size`-byte guest and copies its protected-mode
/// part to `KERNEL_LOAD_ADDR`. Returns the header (as the loader updated it) and the
/// kernel's footprint.
pub fn load_bzimage(
    mem: &GuestMemoryMmap,
    path: &Path,
    file: &mut File,
    hdr: &setup_header,
    mem_size: u64,
) -> Result<(setup_header, KernelFootprint), BootError> {
    let file_len = file
        .metadata()
        .map_err(|source| BootError::KernelIo {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let setup_sects = match hdr.setup_sects {
        0 => 4, // the boot protocol's meaning of 0
        n => u64::from(n),
    };
    let payload = file_len
        .checked_sub((setup_sects + 1) * 512)
        .ok_or_else(|| BootError::InvalidBzImage {
            path: path.to_path_buf(),
            reason: format!("{file_len} bytes is shorter than its {setup_sects} setup sectors"),
        })?;
    let footprint = check_header(path, hdr, payload)?;
    let low_ram = layout::low_ram_size(mem_size);
    if footprint.end > low_ram {
        return Err(BootError::MemoryTooSmall {
            mem_size,
            needed: footprint.end,
            what: format!(
                "bzImage {} (runs at {:#x} and needs init_size {:#x} there)",
                path.display(),
                footprint.runtime_start,
                { hdr.init_size }
            ),
        });
    }
    let loaded = BzImage::load(
        mem,
        Some(KERNEL_LOAD_ADDR),
        file,
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|source| BootError::Loader {
        path: path.to_path_buf(),
        source,
    })?;
    // The loader returns the header it read, with code32_start set to the load address.
    Ok((loaded.setup_header.unwrap_or(*hdr), footprint))
}

/// Writes `boot_params` at `ZERO_PAGE_ADDR`: the kernel's own setup header (with the
/// loader fields filled in), the e820 map of a `mem_size`-byte guest, the command line
/// pointer, the initramfs and the RSDP.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    hdr: setup_header,
    mem_size: u64,
    cmdline: GuestAddress,
    rsdp: Option<GuestAddress>,
    initramfs: Option<(GuestAddress, u64)>,
) -> Result<GuestAddress, BootError> {
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = cmdline.0 as u32;
    params.ext_cmd_line_ptr = (cmdline.0 >> 32) as u32;
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr.0 >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.acpi_rsdp_addr = rsdp.map_or(0, |a| a.0);
    let map = layout::memory_map(mem_size);
    let mut table = params.e820_table;
    for (slot, e) in table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_table = table;
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, ZERO_PAGE_ADDR)
        .map_err(|source| BootError::GuestMemory {
            what: "boot_params",
            addr: ZERO_PAGE_ADDR.0,
            source,
        })?;
    Ok(ZERO_PAGE_ADDR)
}

/// Builds the identity map of the first `IDENTITY_MAP_GIB` GiB with 2 MiB pages:
/// PML4[0] -> PDPT, PDPT[0..n] -> n page directories.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let err = |what, addr: GuestAddress| {
        move |source| BootError::GuestMemory {
            what,
            addr: addr.0,
            source,
        }
    };
    let table = PTE_PRESENT | PTE_WRITABLE;
    let mut pml4 = [0u64; 512];
    pml4[0] = PDPT_ADDR.0 | table;
    let mut pdpt = [0u64; 512];
    for (i, e) in pdpt.iter_mut().take(IDENTITY_MAP_GIB as usize).enumerate() {
        *e = (PD_ADDR.0 + 0x1000 * i as u64) | table;
    }
    let mut pds = vec![0u64; 512 * IDENTITY_MAP_GIB as usize];
    for (i, e) in pds.iter_mut().enumerate() {
        *e = ((i as u64) << 21) | table | PTE_HUGE;
    }
    let bytes = |t: &[u64]| t.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<u8>>();
    mem.write_slice(&bytes(&pml4), PML4_ADDR)
        .map_err(err("PML4", PML4_ADDR))?;
    mem.write_slice(&bytes(&pdpt), PDPT_ADDR)
        .map_err(err("PDPT", PDPT_ADDR))?;
    mem.write_slice(&bytes(&pds), PD_ADDR)
        .map_err(err("page directories", PD_ADDR))
}

/// The 64-bit entry of a kernel loaded at `load`.
pub fn entry_64(load: GuestAddress) -> GuestAddress {
    GuestAddress(load.0 + ENTRY_64_OFFSET)
}

/// General registers at the 64-bit entry: %rip = entry, %rsi = boot_params, a scratch
/// stack, interrupts off.
pub fn linux64_regs(entry: GuestAddress, boot_params: GuestAddress) -> kvm_regs {
    kvm_regs {
        rip: entry.0,
        rsi: boot_params.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rflags: EFLAGS_RESERVED,
        ..Default::default()
    }
}

/// Patches `sregs` (as read from the vCPU) for the 64-bit entry: long mode with paging
/// on the identity map, CS = `__BOOT_CS` (0x10), DS/ES/SS = `__BOOT_DS` (0x18) as the boot
/// protocol asks, a busy TSS in TR.
pub fn setup_sregs_long_mode(sregs: &mut kvm_sregs) {
    gdt::load_boot_segments(sregs, CODE64_SELECTOR);
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR.0;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    const MEM: u64 = 256 << 20;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&layout::ram_regions(size)).unwrap()
    }

    /// A fake bzImage: a boot sector + `setup_sects` sectors with a 2.15 header, then
    /// `payload` bytes of "kernel".
    pub(crate) fn fake_bzimage(setup_sects: u8, payload: &[u8], init_size: u32) -> Vec<u8> {
        let hdr = setup_header {
            setup_sects,
            boot_flag: BOOT_FLAG,
            header: HDRS_MAGIC,
            version: 0x020f,
            loadflags: LOADED_HIGH,
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags: XLF_KERNEL_64 | 0x02,
            cmdline_size: 2047,
            pref_address: 0x100_0000,
            init_size,
            ..Default::default()
        };
        let mut v = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        let at = SETUP_HEADER_OFFSET as usize;
        v[at..at + size_of::<setup_header>()].copy_from_slice(hdr.as_slice());
        v.extend(payload);
        v
    }

    pub(crate) fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("ferry-bz-{}-{name}", std::process::id()));
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn header_detection() {
        let p = temp_file("detect", &fake_bzimage(4, &[0x90; 100], 0x100_0000));
        let hdr = read_setup_header(&mut File::open(&p).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!({ hdr.version }, 0x020f);
        let q = temp_file("short", b"tiny");
        assert!(read_setup_header(&mut File::open(&q).unwrap())
            .unwrap()
            .is_none());
        let r = temp_file("zeros", &[0u8; 4096]);
        assert!(read_setup_header(&mut File::open(&r).unwrap())
            .unwrap()
            .is_none());
        for f in [p, q, r] {
            std::fs::remove_file(f).unwrap();
        }
    }

    #[test]
    fn footprint_follows_the_decompressor() {
        let img = fake_bzimage(4, &[], 0x200_0000);
        let hdr: setup_header = *setup_header::from_slice(
            &img[SETUP_HEADER_OFFSET as usize..][..size_of::<setup_header>()],
        )
        .unwrap();
        let fp = check_header(Path::new("/k"), &hdr, 0x80_0000).unwrap();
        // Relocatable, loaded at 1 MiB: runs at pref_address (16 MiB) and needs init_size.
        assert_eq!(
            fp,
            KernelFootprint {
                runtime_start: 0x100_0000,
                end: 0x300_0000
            }
        );

        let mut old = hdr;
        old.version = 0x020b;
        let e = check_header(Path::new("/k"), &old, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2.11") && e.contains("/k"), "{e}");
        let mut no64 = hdr;
        no64.xloadflags = 0x2;
        let e = check_header(Path::new("/k"), &no64, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("XLF_KERNEL_64") && e.contains("0x2"), "{e}");
    }

    #[test]
    fn loads_kernel_and_checks_memory() {
        let payload: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        let p = temp_file("load", &fake_bzimage(2, &payload, 0x400_0000));
        let m = mem(MEM);
        let mut f = File::open(&p).unwrap();
        let hdr = read_setup_header(&mut f).unwrap().unwrap();
        let (h, fp) = load_bzimage(&m, &p, &mut f, &hdr, MEM).unwrap();
        assert_eq!({ h.code32_start }, 0x10_0000);
        assert_eq!(fp.end, 0x500_0000);
        let mut back = vec![0u8; payload.len()];
        m.read_slice(&mut back, KERNEL_LOAD_ADDR).unwrap();
        assert_eq!(back, payload);

        let small = 64 << 20;
        let e = load_bzimage(&mem(small), &p, &mut f, &hdr, small).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("0x4000000") && msg.contains("0x5000000"),
            "{msg}"
        );
        assert!(matches!(e, BootError::MemoryTooSmall { .. }));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn boot_params_read_back() {
        let m = mem(MEM);
        let img = fake_bzimage(4, &[], 0x100_0000);
        let hdr: setup_header = *setup_header::from_slice(
            &img[SETUP_HEADER_OFFSET as usize..][..size_of::<setup_header>()],
        )
        .unwrap();
        let at = write_boot_params(
            &m,
            hdr,
            MEM,
            layout::CMDLINE_ADDR,
            Some(layout::ACPI_START),
            Some((GuestAddress(0x700_0000), 0x1_2345)),
        )
        .unwrap();
        let bp: boot_params = m.read_obj(at).unwrap();
        assert_eq!(at, ZERO_PAGE_ADDR);
        assert_eq!({ bp.hdr.type_of_loader }, 0xff);
        assert_eq!({ bp.hdr.cmd_line_ptr }, 0x1_0000);
        assert_eq!({ bp.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ bp.hdr.ramdisk_size }, 0x1_2345);
        assert_eq!({ bp.hdr.header }, HDRS_MAGIC);
        assert_eq!({ bp.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!(bp.sentinel, 0);
        let map = layout::memory_map(MEM);
        assert_eq!(usize::from(bp.e820_entries), map.len());
        let table = bp.e820_table;
        for (got, want) in table.iter().zip(&map) {
            assert_eq!(
                ({ got.addr }, { got.size }, { got.r#type }),
                (want.addr, want.size, want.kind as u32)
            );
        }
        assert_eq!(cmdline_limit(&hdr), 2047);
        assert_eq!(initramfs_limit(&hdr, MEM), MEM);
        assert_eq!(initramfs_limit(&hdr, 4 << 30), 0x8000_0000);
    }

    #[test]
    fn identity_map_covers_4g() {
        let m = mem(MEM);
        write_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(PML4_ADDR).unwrap();
        assert_eq!(pml4, PDPT_ADDR.0 | 3);
        // Walk a few addresses through the tables.
        for va in [
            0u64,
            0x10_0000,
            0x3fff_ffff,
            0x4000_0000,
            0xbfe0_0000,
            0xffff_ffff,
        ] {
            let pdpte: u64 = m
                .read_obj(GuestAddress(PDPT_ADDR.0 + 8 * (va >> 30)))
                .unwrap();
            assert_eq!(pdpte & 3, 3);
            let pd = pdpte & !0xfff;
            let pde: u64 = m
                .read_obj(GuestAddress(pd + 8 * ((va >> 21) & 511)))
                .unwrap();
            assert_eq!(pde & 0x83, 0x83, "{va:#x}");
            assert_eq!((pde & !0x1f_ffff) | (va & 0x1f_ffff), va);
        }
        let beyond: u64 = m.read_obj(GuestAddress(PDPT_ADDR.0 + 8 * 4)).unwrap();
        assert_eq!(beyond, 0);
    }

    #[test]
    fn long_mode_registers() {
        let regs = linux64_regs(entry_64(KERNEL_LOAD_ADDR), ZERO_PAGE_ADDR);
        assert_eq!((regs.rip, regs.rsi, regs.rflags), (0x10_0200, 0x7000, 2));
        let mut s = kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        setup_sregs_long_mode(&mut s);
        assert_eq!(s.cr0, 0x8000_0011);
        assert_eq!((s.cr3, s.cr4, s.efer), (0x9000, 0x20, 0x500));
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db), (0x10, 1, 0));
        assert_eq!((s.ds.selector, s.ss.selector), (0x18, 0x18));
        assert_eq!(s.apic_base, 0xfee0_0900);
    }
}

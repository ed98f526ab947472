//! Everything that prepares guest memory and the boot vCPU's registers before the first
//! instruction: the memory layout, ACPI tables, and the two boot protocols (PVH ELF and
//! Linux bzImage through the 64-bit boot protocol).
//!
//! All of it is plain data in, guest memory and register values out; only
//! [`BootEntry::configure_vcpu`] talks to KVM, and it is a thin wrapper over
//! [`BootEntry::regs`] and [`BootEntry::setup_sregs`].

pub mod acpi;
mod aml;
pub mod bzimage;
pub mod elf;
pub mod gdt;
pub mod layout;
pub mod pvh;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_regs, kvm_sregs};
use linux_loader::cmdline::Cmdline;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion};

use crate::memory::GuestMemoryMmap;
use layout::{CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START};

/// Why a guest cannot be booted. Every message names the value at fault.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel image {path}: {source}")]
    KernelIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel image {path} is neither an ELF with a PVH entry note nor a Linux bzImage")]
    UnknownKernelFormat { path: PathBuf },
    #[error("ELF kernel {path} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): only PVH ELF kernels boot directly (Linux: CONFIG_PVH=y, or boot its bzImage)")]
    NoPvhNote { path: PathBuf },
    #[error("ELF kernel {path} is invalid: {source}")]
    InvalidElf {
        path: PathBuf,
        #[source]
        source: elf::ElfError,
    },
    #[error("bzImage {path} cannot be booted: {reason}")]
    InvalidBzImage { path: PathBuf, reason: String },
    #[error("loading bzImage {path}: {source}")]
    Loader {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("kernel {path} segment [{start:#x}, {end:#x}) overlaps {what} [{area_start:#x}, {area_end:#x})")]
    KernelOverlap {
        path: PathBuf,
        start: u64,
        end: u64,
        what: &'static str,
        area_start: u64,
        area_end: u64,
    },
    #[error("guest memory of {mem_size:#x} bytes ({} MiB) is too small: {what} needs {needed:#x} bytes ({} MiB)", mem_size >> 20, needed.div_ceil(1 << 20))]
    MemoryTooSmall {
        mem_size: u64,
        needed: u64,
        what: String,
    },
    #[error("guest memory size {mem_size:#x} is not a multiple of {align:#x}")]
    MemorySizeUnaligned { mem_size: u64, align: u64 },
    #[error("guest memory of {mem_size:#x} bytes does not map [{start:#x}, {end:#x}), which the layout puts RAM in")]
    MemoryLayoutMismatch { mem_size: u64, start: u64, end: u64 },
    #[error("kernel command line is {len} bytes, longer than the limit of {max} bytes")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line is invalid ({reason}): {cmdline:?}")]
    InvalidCmdline { cmdline: String, reason: String },
    #[error("cannot read initramfs {path}: {source}")]
    InitramfsIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initramfs {path} is {size:#x} bytes, but only {available:#x} bytes are free between the kernel's end {lowest:#x} and {limit:#x}")]
    InitramfsTooBig {
        path: PathBuf,
        size: u64,
        available: u64,
        lowest: u64,
        limit: u64,
    },
    #[error("{ncpus} vCPUs cannot be described with xAPIC IDs (accepted: 1 to 255)")]
    VcpuCount { ncpus: u32 },
    #[error("ACPI tables end at {end:#x}, past the end of their area {limit:#x}")]
    AcpiTooBig { end: u64, limit: u64 },
    #[error("writing {what} at {addr:#x} to guest memory: {source}")]
    GuestMemory {
        what: &'static str,
        addr: u64,
        #[source]
        source: GuestMemoryError,
    },
    #[error("setting the boot vCPU's registers ({what}): {source}")]
    Vcpu {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, %ebx = `start_info`.
    Pvh {
        entry: GuestAddress,
        start_info: GuestAddress,
    },
    /// Linux 64-bit boot protocol: long mode on the boot identity map, %rsi =
    /// `boot_params`.
    Linux64 {
        entry: GuestAddress,
        boot_params: GuestAddress,
    },
}

impl BootEntry {
    /// The boot vCPU's general registers.
    pub fn regs(&self) -> kvm_regs {
        match *self {
            BootEntry::Pvh { entry, start_info } => pvh::pvh_regs(entry, start_info),
            BootEntry::Linux64 { entry, boot_params } => bzimage::linux64_regs(entry, boot_params),
        }
    }

    /// Patches special registers read from the boot vCPU (KVM_GET_SREGS) for this entry.
    pub fn setup_sregs(&self, sregs: &mut kvm_sregs) {
        match self {
            BootEntry::Pvh { .. } => pvh::setup_sregs_pvh(sregs),
            BootEntry::Linux64 { .. } => bzimage::setup_sregs_long_mode(sregs),
        }
    }

    /// Puts the boot vCPU at the entry: KVM_GET_SREGS, patch, KVM_SET_SREGS, KVM_SET_REGS.
    /// For `Linux64` the vCPU's CPUID must already advertise long mode, or KVM refuses
    /// EFER.LME.
    pub fn configure_vcpu(&self, vcpu: &kvm_ioctls::VcpuFd) -> Result<(), BootError> {
        let err = |what| move |source| BootError::Vcpu { what, source };
        let mut sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        self.setup_sregs(&mut sregs);
        vcpu.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs()).map_err(err("KVM_SET_REGS"))
    }
}

/// The kernel formats `load_kernel` recognises.
#[derive(Clone, Copy, Debug)]
enum KernelFormat {
    Elf,
    BzImage(linux_loader::bootparam::setup_header),
}

fn detect_format(path: &Path, file: &mut File) -> Result<KernelFormat, BootError> {
    let io = |source| BootError::KernelIo {
        path: path.to_path_buf(),
        source,
    };
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(io)?;
    if elf::is_elf(&magic[..n]) {
        return Ok(KernelFormat::Elf);
    }
    match bzimage::read_setup_header(file).map_err(io)? {
        Some(hdr) => Ok(KernelFormat::BzImage(hdr)),
        None => Err(BootError::UnknownKernelFormat {
            path: path.to_path_buf(),
        }),
    }
}

/// Total RAM in `mem`, after checking it is laid out as [`layout::ram_regions`] says
/// (the memory map given to the guest is computed from the size).
pub fn guest_mem_size(mem: &GuestMemoryMmap) -> Result<u64, BootError> {
    let mem_size: u64 = mem.iter().map(|r| r.len()).sum();
    for (start, len) in layout::ram_regions(mem_size) {
        if !mem.check_range(start, len) {
            return Err(BootError::MemoryLayoutMismatch {
                mem_size,
                start: start.0,
                end: start.0 + len as u64,
            });
        }
    }
    Ok(mem_size)
}

/// Writes `len` zero bytes at `addr`.
pub(crate) fn write_zeroes(
    mem: &GuestMemoryMmap,
    addr: u64,
    len: u64,
    what: &'static str,
) -> Result<(), BootError> {
    const CHUNK: u64 = 64 << 10;
    let zeroes = [0u8; CHUNK as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        mem.write_slice(&zeroes[..n as usize], GuestAddress(addr + done))
            .map_err(|source| BootError::GuestMemory {
                what,
                addr: addr + done,
                source,
            })?;
        done += n;
    }
    Ok(())
}

/// Writes `cmdline` (NUL-terminated) at `CMDLINE_ADDR`; `max` is the longest accepted
/// length without the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<(), BootError> {
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let invalid = |reason: String| BootError::InvalidCmdline {
        cmdline: cmdline.to_string(),
        reason,
    };
    if let Some(pos) = cmdline.find('\0') {
        return Err(invalid(format!("NUL byte at offset {pos}")));
    }
    let cl = Cmdline::try_from(cmdline, max + 1).map_err(|e| invalid(e.to_string()))?;
    linux_loader::loader::load_cmdline(mem, CMDLINE_ADDR, &cl).map_err(|e| invalid(e.to_string()))
}

/// Copies the initramfs at `path` to the highest page-aligned address where it ends at or
/// below `limit` and starts at or above `lowest`.
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    lowest: u64,
    limit: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let io = |source| BootError::InitramfsIo {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !(layout::MEM_SIZE_ALIGN - 1))
        .filter(|a| *a >= lowest)
        .ok_or_else(|| BootError::InitramfsTooBig {
            path: path.to_path_buf(),
            size,
            available: limit.saturating_sub(lowest),
            lowest,
            limit,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| BootError::GuestMemory {
            what: "initramfs",
            addr,
            source,
        })?;
    Ok((GuestAddress(addr), size))
}

/// Loads `kernel` (a PVH ELF, else a bzImage) with `cmdline` and an optional initramfs
/// into `mem` (laid out by [`layout::ram_regions`]), writes the ACPI tables for `ncpus`
/// vCPUs, the boot GDT and the protocol's boot structures, and says how to enter it.
/// For a VM without a virtio-iommu: [`load_kernel_with_viot`] with no VIOT.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    cmdline: &str,
    initramfs: Option<&Path>,
    ncpus: u32,
) -> Result<BootEntry, BootError> {
    load_kernel_with_viot(mem, kernel, cmdline, initramfs, ncpus, None)
}

/// [`load_kernel`], with `viot` describing the VM's virtio-iommu and its endpoints in
/// the ACPI tables when it has one ([`acpi::create_acpi_tables`]).
pub fn load_kernel_with_viot(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    cmdline: &str,
    initramfs: Option<&Path>,
    ncpus: u32,
    viot: Option<&acpi::Viot>,
) -> Result<BootEntry, BootError> {
    let mem_size = guest_mem_size(mem)?;
    layout::check_mem_size(mem_size)?;
    let ncpus = u8::try_from(ncpus)
        .ok()
        .filter(|n| *n > 0)
        .ok_or(BootError::VcpuCount { ncpus })?;
    let mut file = File::open(kernel).map_err(|source| BootError::KernelIo {
        path: kernel.to_path_buf(),
        source,
    })?;
    let format = detect_format(kernel, &mut file)?;
    let low_ram_end = layout::low_ram_size(mem_size);

    let entry = match format {
        KernelFormat::Elf => {
            // Cheap checks before the copy.
            if cmdline.len() > CMDLINE_MAX_SIZE - 1 {
                return Err(BootError::CmdlineTooLong {
                    len: cmdline.len(),
                    max: CMDLINE_MAX_SIZE - 1,
                });
            }
            let (entry, kernel_end) = pvh::load_pvh_elf(mem, kernel, &mut file, mem_size)?;
            write_cmdline(mem, cmdline, CMDLINE_MAX_SIZE - 1)?;
            let lowest = kernel_end
                .next_multiple_of(layout::MEM_SIZE_ALIGN)
                .max(HIMEM_START);
            let initrd = initramfs
                .map(|p| load_initramfs(mem, p, lowest, low_ram_end))
                .transpose()?;
            let rsdp = acpi::create_acpi_tables(mem, ncpus, viot)?;
            gdt::write_gdt(mem)?;
            let start_info =
                pvh::write_start_info(mem, mem_size, CMDLINE_ADDR, Some(rsdp), initrd)?;
            BootEntry::Pvh { entry, start_info }
        }
        KernelFormat::BzImage(hdr) => {
            let max = bzimage::cmdline_limit(&hdr);
            if cmdline.len() > max {
                return Err(BootError::CmdlineTooLong {
                    len: cmdline.len(),
                    max,
                });
            }
            let (hdr, footprint) = bzimage::load_bzimage(mem, kernel, &mut file, &hdr, mem_size)?;
            write_cmdline(mem, cmdline, max)?;
            let initrd = initramfs
                .map(|p| {
                    load_initramfs(
                        mem,
                        p,
                        footprint.end.next_multiple_of(layout::MEM_SIZE_ALIGN),
                        bzimage::initramfs_limit(&hdr, mem_size),
                    )
                })
                .transpose()?;
            let rsdp = acpi::create_acpi_tables(mem, ncpus, viot)?;
            gdt::write_gdt(mem)?;
            bzimage::write_page_tables(mem)?;
            let boot_params =
                bzimage::write_boot_params(mem, hdr, mem_size, CMDLINE_ADDR, Some(rsdp), initrd)?;
            BootEntry::Linux64 {
                entry: bzimage::entry_64(layout::KERNEL_LOAD_ADDR),
                boot_params,
            }
        }
    };
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::elf::build::{elf, pvh_note};
    use super::*;
    use linux_loader::start_info::hvm_start_info;
    use std::io::Write;

    const MEM: u64 = 128 << 20;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&layout::ram_regions(size)).unwrap()
    }

    /// A file under the temp dir, removed on drop.
    struct Temp(PathBuf);
    impl Temp {
        fn new(name: &str, bytes: &[u8]) -> Self {
            let p = std::env::temp_dir().join(format!("ferry-boot-{}-{name}", std::process::id()));
            File::create(&p).unwrap().write_all(bytes).unwrap();
            Temp(p)
        }
    }
    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let p = std::env::temp_dir().join("ferry-boot-does-not-exist/vmlinux");
        let e = load_kernel(&mem(MEM), &p, "", None, 1).unwrap_err();
        assert!(matches!(e, BootError::KernelIo { .. }));
        assert!(
            e.to_string().contains("ferry-boot-does-not-exist/vmlinux"),
            "{e}"
        );
    }

    #[test]
    fn garbage_is_neither_elf_nor_bzimage() {
        for (name, bytes) in [
            ("garbage", b"this is not a kernel at all".repeat(100)),
            ("empty", Vec::new()),
            ("zeros", vec![0u8; 8192]),
        ] {
            let k = Temp::new(name, &bytes);
            let e = load_kernel(&mem(MEM), &k.0, "", None, 1).unwrap_err();
            assert!(
                matches!(e, BootError::UnknownKernelFormat { .. }),
                "{name}: {e}"
            );
            assert!(e.to_string().contains(&k.0.display().to_string()), "{e}");
        }
    }

    #[test]
    fn elf_without_pvh_note_is_named() {
        let k = Temp::new("nonote", &elf(64, 0x100_0000, &[0x90; 32], 0, &[]));
        let e = load_kernel(&mem(MEM), &k.0, "", None, 1).unwrap_err();
        assert!(matches!(e, BootError::NoPvhNote { .. }), "{e}");
        assert!(e.to_string().contains(&k.0.display().to_string()), "{e}");
    }

    #[test]
    fn pvh_elf_boots_with_cmdline_initramfs_and_acpi() {
        let code: Vec<u8> = (0..0x400u32).map(|i| i as u8).collect();
        let k = Temp::new(
            "pvh",
            &elf(32, 0x2_0000, &code, 0x1_0000, &[pvh_note(0x2_0100)]),
        );
        let initrd = Temp::new("pvh-initrd", &[0x5a; 0x3001]);
        let m = mem(MEM);
        let entry = load_kernel(&m, &k.0, "console=ttyS0 quiet", Some(&initrd.0), 2).unwrap();
        assert_eq!(
            entry,
            BootEntry::Pvh {
                entry: GuestAddress(0x2_0100),
                start_info: layout::PVH_START_INFO_ADDR
            }
        );
        let regs = entry.regs();
        assert_eq!(
            (regs.rip, regs.rbx),
            (0x2_0100, layout::PVH_START_INFO_ADDR.0)
        );
        let mut sregs = kvm_sregs::default();
        entry.setup_sregs(&mut sregs);
        assert_eq!((sregs.cr0 & 1, sregs.cr0 >> 31, sregs.efer), (1, 0, 0));

        let info: hvm_start_info = m.read_obj(layout::PVH_START_INFO_ADDR).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.rsdp_paddr, layout::ACPI_START.0);
        let mut sig = [0u8; 8];
        m.read_slice(&mut sig, GuestAddress(info.rsdp_paddr))
            .unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let mut cl = [0u8; 20];
        m.read_slice(&mut cl, GuestAddress(info.cmdline_paddr))
            .unwrap();
        assert_eq!(&cl, b"console=ttyS0 quiet\0");
        // The initramfs sits page-aligned at the top of RAM.
        assert_eq!(info.nr_modules, 1);
        let module: linux_loader::start_info::hvm_modlist_entry =
            m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(module.size, 0x3001);
        assert_eq!(module.paddr, (MEM - 0x3001) & !0xfff);
        let b: u8 = m.read_obj(GuestAddress(module.paddr + 0x3000)).unwrap();
        assert_eq!(b, 0x5a);
        // The GDT the registers point at is in memory.
        let cs: u64 = m
            .read_obj(GuestAddress(sregs.gdt.base + u64::from(sregs.cs.selector)))
            .unwrap();
        assert_eq!(cs, gdt::GDT[1]);
    }

    #[test]
    fn pvh_elf_too_big_for_memory() {
        let k = Temp::new(
            "big",
            &elf(64, 0x10_0000, &[0; 16], 0x200_0000, &[pvh_note(0x10_0000)]),
        );
        let size = 16 << 20;
        let e = load_kernel(&mem(size), &k.0, "", None, 1).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, BootError::MemoryTooSmall { .. }), "{msg}");
        assert!(
            msg.contains("0x1000000") && msg.contains("0x2100010"),
            "{msg}"
        );
    }

    #[test]
    fn cmdline_limits() {
        let k = Temp::new("cl", &elf(64, 0x2_0000, &[0; 16], 0, &[pvh_note(0x2_0000)]));
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        let e = load_kernel(&mem(MEM), &k.0, &long, None, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&CMDLINE_MAX_SIZE.to_string()), "{e}");
        assert!(e.contains(&(CMDLINE_MAX_SIZE - 1).to_string()), "{e}");
        let e = load_kernel(&mem(MEM), &k.0, "a\0b", None, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("NUL") && e.contains("offset 1"), "{e}");
    }

    #[test]
    fn initramfs_errors_name_the_file() {
        let k = Temp::new(
            "ird",
            &elf(64, 0x2_0000, &[0; 16], 0, &[pvh_note(0x2_0000)]),
        );
        let missing = std::env::temp_dir().join("ferry-boot-no-such-initrd");
        let e = load_kernel(&mem(MEM), &k.0, "", Some(&missing), 1).unwrap_err();
        assert!(matches!(e, BootError::InitramfsIo { .. }));
        assert!(e.to_string().contains("ferry-boot-no-such-initrd"), "{e}");

        let size = 4 << 20;
        let big = Temp::new("big-initrd", &vec![1u8; 3 << 20 | 1]);
        let e = load_kernel(&mem(size), &k.0, "", Some(&big.0), 1).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, BootError::InitramfsTooBig { .. }), "{msg}");
        assert!(
            msg.contains("0x300001") && msg.contains("0x300000"),
            "{msg}"
        );
    }

    #[test]
    fn bzimage_boots_in_long_mode() {
        let payload = vec![0x90u8; 0x2000];
        let k = Temp::new("bz", &bzimage::tests::fake_bzimage(4, &payload, 0x80_0000));
        let initrd = Temp::new("bz-initrd", &[7u8; 0x1800]);
        let m = mem(MEM);
        let entry = load_kernel(&m, &k.0, "console=ttyS0", Some(&initrd.0), 4).unwrap();
        assert_eq!(
            entry,
            BootEntry::Linux64 {
                entry: GuestAddress(0x10_0200),
                boot_params: layout::ZERO_PAGE_ADDR
            }
        );
        let regs = entry.regs();
        assert_eq!((regs.rip, regs.rsi), (0x10_0200, 0x7000));
        let mut sregs = kvm_sregs::default();
        entry.setup_sregs(&mut sregs);
        assert_eq!(
            (sregs.cr3, sregs.efer & 0x500),
            (layout::PML4_ADDR.0, 0x500)
        );

        let bp: linux_loader::bootparam::boot_params = m.read_obj(layout::ZERO_PAGE_ADDR).unwrap();
        assert_eq!({ bp.hdr.cmd_line_ptr }, CMDLINE_ADDR.0 as u32);
        assert_eq!({ bp.acpi_rsdp_addr }, layout::ACPI_START.0);
        assert_eq!({ bp.hdr.ramdisk_size }, 0x1800);
        assert_eq!({ bp.hdr.ramdisk_image }, ((MEM - 0x1800) & !0xfff) as u32);
        assert_eq!(bp.e820_entries, 3);
        let pml4: u64 = m.read_obj(layout::PML4_ADDR).unwrap();
        assert_eq!(pml4 & !0xfff, layout::PDPT_ADDR.0);
        let mut k0 = [0u8; 4];
        m.read_slice(&mut k0, layout::KERNEL_LOAD_ADDR).unwrap();
        assert_eq!(k0, [0x90; 4]);
    }

    #[test]
    fn bzimage_cmdline_limit_comes_from_the_header() {
        let k = Temp::new(
            "bzcl",
            &bzimage::tests::fake_bzimage(4, &[0; 512], 0x80_0000),
        );
        let e = load_kernel(&mem(MEM), &k.0, &"y".repeat(3000), None, 1).unwrap_err();
        assert!(
            matches!(
                e,
                BootError::CmdlineTooLong {
                    len: 3000,
                    max: 2047
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn memory_checks() {
        let k = Temp::new(
            "memck",
            &elf(64, 0x2_0000, &[0; 16], 0, &[pvh_note(0x2_0000)]),
        );
        // Not laid out by ram_regions: a single region above 4 GiB.
        let odd = GuestMemoryMmap::from_ranges(&[(GuestAddress(1 << 32), 1 << 20)]).unwrap();
        let e = load_kernel(&odd, &k.0, "", None, 1).unwrap_err();
        assert!(matches!(e, BootError::MemoryLayoutMismatch { .. }), "{e}");
        let e = load_kernel(&mem(0x8_0000), &k.0, "", None, 1).unwrap_err();
        assert!(matches!(e, BootError::MemoryTooSmall { .. }), "{e}");
        let e = load_kernel(&mem(MEM), &k.0, "", None, 0).unwrap_err();
        assert!(e.to_string().contains("0 vCPUs"), "{e}");
        let e = load_kernel(&mem(MEM), &k.0, "", None, 256).unwrap_err();
        assert!(e.to_string().contains("256 vCPUs"), "{e}");
        // Memory above 4 GiB is accepted and shown to the guest.
        let big = 4 << 30;
        let m = mem(big);
        load_kernel(&m, &k.0, "", None, 1).unwrap();
        let info: hvm_start_info = m.read_obj(layout::PVH_START_INFO_ADDR).unwrap();
        assert_eq!(info.memmap_entries, 4);
    }
}
